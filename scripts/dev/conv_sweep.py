"""Developer tool: the causal conv's launch tiles (ConvTuning: channels x steps per program) on the input the
model gives it, a channels-last view of in_proj's output, beside causal_conv1d's CUDA kernel (CUDA only).

    python scripts/dev/conv_sweep.py

Forward (channels-last output, as the model asks) and forward + backward, do_bench medians in ms, bf16.
"""

import torch
import triton
from hf_mamba.kernels.causal_conv1d.triton_conv import DEFAULT_TUNING, ConvTuning, causal_conv1d_triton

SHAPES = [(1, 1536, 65536), (4, 1536, 1024), (1, 4096, 8192), (8, 1536, 2048)]
TILES = [(16, 128), (32, 64), (32, 128), (64, 32), (64, 64), (128, 16), (128, 32)]


def peer_conv():
    try:
        from causal_conv1d import causal_conv1d_fn
    except Exception:  # noqa: BLE001 - not installed
        return None
    return causal_conv1d_fn


def time_row(conv, inputs):
    """(forward ms, forward + backward ms) of conv(*inputs)."""
    with torch.no_grad():
        fwd = triton.testing.do_bench(lambda: conv(*inputs))
    grad = torch.randn_like(conv(*inputs))
    f_b = triton.testing.do_bench(lambda: torch.autograd.grad(conv(*inputs), inputs, grad))
    return fwd, f_b


def main():
    device = torch.device("cuda")
    peer = peer_conv()
    print(f"{torch.cuda.get_device_name(device)}, bf16, x a channels-last view of (batch, seqlen, 2 d_inner); "
          f"default tiles {DEFAULT_TUNING}")
    print("| shape (batch, d_inner, seqlen) | tiles (channels x steps) | fwd ms | fwd+bwd ms |\n|---|---|---|---|")
    for batch, d_inner, seqlen in SHAPES:
        xz = torch.randn(batch, seqlen, 2 * d_inner, device=device, dtype=torch.bfloat16)
        x = xz[..., :d_inner].transpose(1, 2).requires_grad_()
        weight = torch.randn(d_inner, 4, device=device, dtype=torch.bfloat16, requires_grad=True)
        bias = torch.randn(d_inner, device=device, dtype=torch.bfloat16, requires_grad=True)
        convs = {
            f"{bd} x {bl}": lambda x, w, b, t=ConvTuning(bd, bl): causal_conv1d_triton(  # noqa: B008
                x, w, b, "silu", channels_last_out=True, tuning=t
            )
            for bd, bl in TILES
        }
        if peer is not None:
            convs["causal_conv1d (peer)"] = lambda x, w, b: peer(x, w, b, activation="silu")
        for label, conv in convs.items():
            fwd, f_b = time_row(conv, (x, weight, bias))
            print(f"| {(batch, d_inner, seqlen)} | {label} | {fwd:.4f} | {f_b:.4f} |", flush=True)


if __name__ == "__main__":
    main()
