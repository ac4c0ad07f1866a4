"""Developer tool: the GPU kernel launches of one decode step (`_decode_step_logits`), counted on CPU.

    python scripts/dev/decode_step_launches.py              # this tree's code
    python scripts/dev/decode_step_launches.py --ops        # also each counted aten op and Triton kernel
    PYTHONPATH=/tmp/other_pkg python scripts/dev/decode_step_launches.py   # another copy of the package

What it counts: a CUDA-graph decode step replays every kernel the eager step launches, each costing a
few microseconds on the GPU, so fewer launches is a shorter step. Here the step runs on CPU under the
Triton interpreter (TRITON_INTERPRET=1, HF_MAMBA_BACKEND=triton, set by this script), on a warm cache
(a prompt prefilled, one step already run), without gradients as in generate(), and:

- aten ops that would launch a kernel on CUDA, seen by a TorchDispatchMode: views, allocations,
  other metadata-only ops and ops returning no tensor are left out (they launch nothing);
- Triton launches, counted by wrapping `hf_mamba.kernels._launch.launch` where each kernel module
  imported it. The interpreter's own tensor traffic inside a launch (copies to and from its buffers) is
  not counted as aten ops.

A count, not a time: nothing here says how long a step takes on a GPU (scripts/benchmark_model.py does).

Model: saved and reloaded with from_pretrained(dtype=torch.bfloat16) (the A_log, D and Δ-bias
parameters stay fp32), 24 layers, hidden_size 64, vocab 1024, batch 1.
"""

import argparse
import collections
import os
import sys
import tempfile

os.environ["TRITON_INTERPRET"] = "1"  # before Triton is imported
os.environ["HF_MAMBA_BACKEND"] = "triton"

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_leaves  # noqa: E402

# Ops that launch no kernel on CUDA: allocations (a CUDA graph replays no allocation) and metadata.
NO_KERNEL_OPS = {
    "aten.empty.memory_format", "aten.empty_like.default", "aten.empty_strided.default",
    "aten.new_empty.default", "aten.new_empty_strided.default", "aten.detach.default", "aten.lift_fresh.default",
    "aten.alias.default", "aten._unsafe_view.default", "aten.set_.source_Storage_storage_offset",
    "aten.set_.source_Storage", "aten.set_.source_Tensor", "aten.sym_size.int", "aten.sym_stride.int",
    "aten.sym_numel.default", "aten.sym_storage_offset.default", "aten.is_contiguous.default",
}


class LaunchCounter(TorchDispatchMode):
    """Counts aten ops that launch a kernel, except while a Triton launch runs (the interpreter's own ops)."""

    def __init__(self):
        super().__init__()
        self.aten = collections.Counter()
        self.triton = collections.Counter()
        self.in_launch = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = str(func)
        # Ops returning no tensor (torch.promote_types, sizes) run on the host.
        returns_tensor = any(isinstance(t, torch.Tensor) for t in tree_leaves(out))
        if not self.in_launch and returns_tensor and not func.is_view and name not in NO_KERNEL_OPS:
            self.aten[name] += 1
        return out

    def wrap_launches(self):
        """Wrap `launch` in every kernel module that imported it."""
        from hf_mamba.kernels import _launch

        original = _launch.launch

        def counted_launch(kernel, grid, *args, **constexprs):
            self.triton[getattr(getattr(kernel, "fn", kernel), "__name__", repr(kernel))] += 1
            self.in_launch += 1
            try:
                return original(kernel, grid, *args, **constexprs)
            finally:
                self.in_launch -= 1

        for module in list(sys.modules.values()):
            if (getattr(module, "__name__", None) or "").startswith("hf_mamba.kernels") and (
                getattr(module, "launch", None) is original
            ):
                module.launch = counted_launch


def build(folder):
    from hf_mamba import MambaConfig, MambaForCausalLM

    torch.manual_seed(0)
    config = MambaConfig(vocab_size=1024, hidden_size=64, num_hidden_layers=24, state_size=16)
    MambaForCausalLM(config).save_pretrained(folder)
    return MambaForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ops", action="store_true", help="list each counted aten op and Triton kernel")
    args = parser.parse_args()

    # Import every kernel module the step launches from before wrapping their `launch`.
    from hf_mamba.kernels.causal_conv1d import triton_conv_update  # noqa: F401
    from hf_mamba.kernels.rms_norm import triton_rms_norm  # noqa: F401
    from hf_mamba.kernels.selective_scan import triton_state_update  # noqa: F401

    import hf_mamba
    from hf_mamba import MambaCache

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as folder:
        model = build(folder)
    cache = MambaCache(model.config, batch_size=1, dtype=torch.bfloat16)
    prompt = torch.randint(0, 1024, (1, 5))
    token = torch.randint(0, 1024, (1, 1))
    with torch.no_grad():
        model(input_ids=prompt, cache_params=cache, use_cache=True)
        model._decode_step_logits(token, cache)  # the first step compiles the kernels
        counter = LaunchCounter()
        counter.wrap_launches()
        with counter:
            model._decode_step_logits(token, cache)

    layers = model.config.num_hidden_layers
    aten, triton = sum(counter.aten.values()), sum(counter.triton.values())
    print(f"package: {os.path.dirname(hf_mamba.__file__)}")
    print(f"model: {layers} layers, hidden 64, vocab 1024, bf16, batch 1; one decode step")
    if args.ops:
        for name, n in sorted(counter.aten.items()):
            print(f"  aten   {n:4d}  {name}")
        for name, n in sorted(counter.triton.items()):
            print(f"  triton {n:4d}  {name}")
    print(f"{'aten ops (kernels)':<22}{aten:6d}")
    print(f"{'Triton launches':<22}{triton:6d}")
    print(f"{'launches per step':<22}{aten + triton:6d}")


if __name__ == "__main__":
    main()
