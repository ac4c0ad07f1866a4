"""Helpers the benchmark scripts share (benchmark_model.py, benchmark_large.py): timing that waits for the
device, the next-token loss of a training step, and greedy decoding with hf_mamba and with mamba_ssm."""

import time

import torch
import torch.nn.functional as F


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device):
    """(seconds, result) of fn(), with the device idle before and after (kernels run asynchronously)."""
    sync(device)
    start = time.perf_counter()
    result = fn()
    sync(device)
    return time.perf_counter() - start, result


def next_token_loss(logits, ids):
    """Cross-entropy of each position's logits against the next token, in fp32."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())


# Sampling settings both sides take (SAMPLING["top_k"] etc.), for --sample.
SAMPLING = dict(top_k=50, top_p=0.9, temperature=0.8)


def hf_generate(model, sample=False):
    """generate(prompt, new_tokens): greedy decoding (or sampling with SAMPLING) of exactly new_tokens tokens
    with a Transformers model."""
    how = dict(do_sample=True, **SAMPLING) if sample else dict(do_sample=False)

    def generate(prompt, new_tokens):
        with torch.no_grad():
            return model.generate(
                prompt,
                attention_mask=torch.ones_like(prompt),
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                pad_token_id=0,
                **how,
            )

    return generate


def peer_generate(model, cg, sample=False):
    """generate(prompt, new_tokens) for mamba_ssm's MambaLMHeadModel (greedy, or sampling with SAMPLING; with
    its CUDA graphs where cg), and generate.reset(), which drops its decode graphs."""
    how = SAMPLING if sample else dict(top_k=1)

    def generate(prompt, new_tokens):
        out = model.generate(prompt, max_length=prompt.shape[1] + new_tokens, cg=cg, **how)
        return out if torch.is_tensor(out) else out.sequences

    def reset():
        # mamba_ssm keeps one graph cache per model; going back to an earlier batch size after another
        # fails its capture ("conv_state must have shape ..."), so each measurement starts afresh.
        model._decoding_cache = None

    generate.reset = reset
    return generate
