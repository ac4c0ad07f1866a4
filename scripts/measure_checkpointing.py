"""Gradient checkpointing: same loss and gradients, lower peak memory. Measure one training step both ways.

    python scripts/measure_checkpointing.py                                   # mamba-130m shape, CUDA, bf16
    python scripts/measure_checkpointing.py --hidden-size 2048 --layers 48 --seqlen 2048 --batch 4
    python scripts/measure_checkpointing.py --device cpu --hidden-size 64 --layers 2 --seqlen 64 --dtype float32

Builds a random hf_mamba model of the given shape, runs forward + backward on the same batch without and
with activation checkpointing (`hf_mamba.compat.enable_activation_checkpointing`), and prints the loss, the
largest gradient difference and the peak memory of each run (CUDA: torch.cuda.max_memory_allocated; CPU:
the bytes autograd saves for backward).
"""

import argparse

import torch

import hf_mamba
from hf_mamba.compat import enable_activation_checkpointing


def one_step(model, input_ids, device):
    """Loss, gradients and peak memory (bytes) of one forward + backward."""
    model.zero_grad(set_to_none=True)
    saved = 0

    def pack(tensor):
        nonlocal saved
        saved += tensor.numel() * tensor.element_size()
        return tensor

    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = model(input_ids=input_ids, labels=input_ids).loss
    loss.backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - baseline
    else:
        peak = saved
    grads = {name: p.grad.float().clone() for name, p in model.named_parameters() if p.grad is not None}
    return loss.item(), grads, peak


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden-size", type=int, default=768)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--state-size", type=int, default=16)
    parser.add_argument("--vocab-size", type=int, default=50280)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seqlen", type=int, default=1024)
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="bfloat16")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    torch.manual_seed(0)
    config = hf_mamba.MambaConfig(
        vocab_size=args.vocab_size,
        hidden_size=args.hidden_size,
        num_hidden_layers=args.layers,
        state_size=args.state_size,
    )
    model = hf_mamba.MambaForCausalLM(config).to(device=device, dtype=getattr(torch, args.dtype)).train()
    input_ids = torch.randint(args.vocab_size, (args.batch, args.seqlen), device=device)

    loss_plain, grads_plain, peak_plain = one_step(model, input_ids, device)
    enable_activation_checkpointing(model)
    loss_ckpt, grads_ckpt, peak_ckpt = one_step(model, input_ids, device)
    max_grad_diff = max((grads_plain[n] - grads_ckpt[n]).abs().max().item() for n in grads_plain)

    memory = "peak CUDA memory" if device.type == "cuda" else "saved for backward"
    print(f"model: {args.layers} x d_model {args.hidden_size}, batch {args.batch} x {args.seqlen}, {args.dtype}")
    print(f"{'':<26}{'loss':>12}{memory:>22}")
    print(f"{'without checkpointing':<26}{loss_plain:>12.6f}{peak_plain / 2**20:>18.1f} MiB")
    print(f"{'with checkpointing':<26}{loss_ckpt:>12.6f}{peak_ckpt / 2**20:>18.1f} MiB")
    print(f"max |grad difference| {max_grad_diff:.3e}; memory ratio {peak_ckpt / peak_plain:.3f}")


if __name__ == "__main__":
    main()
