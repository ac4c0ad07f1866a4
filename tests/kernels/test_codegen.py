"""The code-generation helpers of the recurrent scan kernels (`selective_scan/codegen.py`): the emitters
that split and join tiles, the loader of generated modules, and the rule for reading bf16 in pairs."""

import pytest
import torch
from hf_mamba.kernels.selective_scan import codegen

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize("k", [2, 4, 8])
def test_unpack_then_pack_round_trips(k, tmp_path, monkeypatch):
    """A [rows, k] tile split into k column vectors (`unpack`) and joined back (`pack`), with a helper of
    triton_utils called from the generated module (its namespace has them)."""
    monkeypatch.setenv("HF_MAMBA_KERNEL_CACHE", str(tmp_path))
    lines = []
    names = [f"c_{i}" for i in range(k)]
    codegen.unpack("tile", names, lines, "    ", "s", rows="ROWS")
    for name in names:
        lines.append(f"    {name} = log2_rate({name}, False)")
    joined = codegen.pack(names, lines, "    ", "p", rows="ROWS")
    src = codegen.HEADER + f"""@triton.jit
def kernel(p_x, p_y, ROWS: tl.constexpr):
    o = tl.arange(0, ROWS)[:, None] * {k} + tl.arange(0, {k})[None, :]
    tile = tl.load(p_x + o)
""" + "\n".join(lines) + f"\n    tl.store(p_y + o, {joined})\n"
    kernel = codegen.generated_kernel(src, f"test_round_trip_{k}", "kernel")
    assert codegen.generated_kernel(src, f"test_round_trip_{k}", "kernel") is not None
    assert len(list(tmp_path.glob(f"test_round_trip_{k}_*.py"))) == 1  # one cache file per source
    x = torch.randn(4, k, device=DEVICE)
    y = torch.empty_like(x)
    kernel[(1,)](x, y, ROWS=4)
    torch.testing.assert_close(y, x * 1.4426950408889634)


def test_bf16_pairs():
    """bf16 with unit stride along the axis, an even length there and 4-byte aligned rows."""
    t = torch.zeros(2, 8, 6, dtype=torch.bfloat16)
    assert codegen.bf16_pairs(t, axis=2) and not codegen.bf16_pairs(t, axis=1)
    assert codegen.bf16_pairs(t.transpose(1, 2).contiguous().transpose(1, 2), axis=1)
    assert not codegen.bf16_pairs(t.float(), axis=2)  # not bf16
    assert not codegen.bf16_pairs(t[..., :5], axis=2)  # an odd length
    assert not codegen.bf16_pairs(torch.zeros(2, 8, 7, dtype=torch.bfloat16)[..., 1:], axis=2)  # odd row stride
    assert not codegen.bf16_pairs(torch.zeros(2, 8, 8, dtype=torch.bfloat16)[..., 1:7], axis=2)  # unaligned start
