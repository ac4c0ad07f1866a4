"""The segment chain of a segmented backward (`chain`): the adjoints leaving each segment, against the
recurrence written as a loop."""

import pytest
import torch
from hf_mamba.kernels.selective_scan.chain import ChainTuning, chain_adjoints, segment_count

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize("block_s", [1, 4, 16])
def test_chain_adjoints(block_s):
    """37 segments, so several loop steps of block_s segments and a partial last one, and elements
    (state, channel) past a program's end."""
    torch.manual_seed(3)
    batch, d_inner, d_state, n_seg = 2, 5, 3, 37
    tuning = ChainTuning(block_e=8, block_s=block_s)
    PQ = torch.randn(batch, n_seg, 2, d_state, d_inner, device=DEVICE)
    x = torch.full((batch, n_seg, d_state, d_inner), float("nan"), device=DEVICE)
    x[:, -1] = torch.randn(batch, d_state, d_inner, device=DEVICE)
    chain_adjoints(PQ, x, tuning)
    carry = x[:, -1].clone()
    for s in range(n_seg - 1, 0, -1):
        carry = PQ[:, s, 1] + PQ[:, s, 0] * carry
        torch.testing.assert_close(x[:, s - 1], carry, rtol=1e-5, atol=1e-6)


def test_segment_count():
    """Doubled while the launch is short of warps per multiprocessor, within the tile and cap limits."""
    sms = 4 if DEVICE.type == "cpu" else torch.cuda.get_device_properties(DEVICE).multi_processor_count
    assert segment_count(16 * sms, 16, DEVICE, 1000, 16, 1000) == 1  # enough programs already
    assert segment_count(2 * sms, 16, DEVICE, 1000, 16, 1000) == 8  # 2 x 8 = 16 warps per multiprocessor
    assert segment_count(2 * sms, 16, DEVICE, 64, 16, 1000) == 4  # each segment keeps 16 tiles
    assert segment_count(2 * sms, 16, DEVICE, 1000, 16, 2) == 2  # the cap (1 with document ids)
