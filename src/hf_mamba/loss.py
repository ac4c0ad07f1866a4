"""The causal-LM loss without an fp32 copy of the logits: cross-entropy a block of rows at a time.

Transformers' ForCausalLMLoss upcasts the whole (batch, seqlen, vocab) logits to fp32 and
F.cross_entropy keeps their fp32 log-softmax for the backward, whose gradient is fp32 again before
it is cast back: at 4 x 1024 tokens and vocab 50280, three 785 MiB tensors, the largest of a
training step. Here each block of rows is upcast, reduced to its log-sum-exp (kept, one fp32 per
row) and dropped; the backward recomputes each block's softmax and writes the gradient in the
logits' dtype. Same arithmetic in fp32 as F.cross_entropy, up to the order of the final sum.

A block holds at most 2^25 logits (128 MiB in fp32: 667 rows at vocab 50280), and the backward works on
one fp32 copy of it in place. At 4 x 1024 tokens and vocab 50280 (bf16 logits, peak RSS on CPU beyond
the inputs), the forward needs 0.26 GiB and the backward 0.57 GiB (0.38 of it the gradient itself),
where the whole batch as one block needs 1.54 GiB for either. The forward's part comes when every
activation of the step is held, so it adds to the step's peak.
"""

import torch
import torch.nn.functional as F
from transformers.loss.loss_utils import ForCausalLMLoss

LOGITS_PER_BLOCK = 2**25


class _BlockedCrossEntropy(torch.autograd.Function):
    """Sum over rows of -log softmax(logits)[target], targets equal to ignore_index skipped."""

    @staticmethod
    def forward(ctx, logits, targets, ignore_index, rows_per_block):
        acc_dtype = torch.promote_types(logits.dtype, torch.float32)  # fp32 (fp64 stays fp64, for gradchecks)
        lse = torch.empty(logits.shape[0], dtype=acc_dtype, device=logits.device)
        picked = torch.empty_like(lse)
        valid = targets != ignore_index
        safe_targets = torch.where(valid, targets, 0)[:, None]
        for start in range(0, logits.shape[0], rows_per_block):
            rows = slice(start, start + rows_per_block)
            block = logits[rows].to(acc_dtype)  # (rows, vocab)
            lse[rows] = torch.logsumexp(block, dim=-1)
            picked[rows] = block.gather(1, safe_targets[rows])[:, 0]
        ctx.save_for_backward(logits, safe_targets, valid, lse)
        ctx.rows_per_block = rows_per_block
        return torch.where(valid, lse - picked, 0.0).sum()

    @staticmethod
    def backward(ctx, grad_loss):
        logits, safe_targets, valid, lse = ctx.saved_tensors
        grad = torch.empty_like(logits)
        scale = valid.to(lse.dtype)[:, None] * grad_loss  # (rows, 1)
        for start in range(0, logits.shape[0], ctx.rows_per_block):
            rows = slice(start, start + ctx.rows_per_block)
            # softmax, (rows, vocab): one fp32 block, worked on in place
            probs = logits[rows].to(lse.dtype, copy=True).sub_(lse[rows, None]).exp_()
            probs.scatter_add_(1, safe_targets[rows], torch.full_like(probs[:, :1], -1.0))
            grad[rows] = probs.mul_(scale[rows])
        return grad, None, None, None  # targets, ignore_index and the block size get none


def causal_lm_loss(
    logits,
    labels,
    vocab_size: int,
    num_items_in_batch=None,
    ignore_index: int = -100,
    shift_labels=None,
    rows_per_block: int | None = None,
    **kwargs,
):
    """ForCausalLMLoss's contract (labels shifted inside; mean over non-ignored targets, or the sum divided by
    num_items_in_batch, as Trainer passes under gradient accumulation), computed by `_BlockedCrossEntropy`.
    Under torch.compile, Transformers' own function (traced as ops)."""
    if torch.compiler.is_compiling():
        return ForCausalLMLoss(logits, labels, vocab_size, num_items_in_batch, ignore_index, shift_labels, **kwargs)
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]  # tokens < n predict n
    targets = shift_labels.reshape(-1).to(logits.device)
    if rows_per_block is None:
        rows_per_block = max(1, LOGITS_PER_BLOCK // vocab_size)
    total = _BlockedCrossEntropy.apply(logits.reshape(-1, vocab_size), targets, ignore_index, rows_per_block)
    if num_items_in_batch is None:
        return total / (targets != ignore_index).sum()
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


__all__ = ["causal_lm_loss"]
