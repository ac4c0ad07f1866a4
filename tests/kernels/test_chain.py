"""The segment chains (`chain`): the states entering each segment of a segmented forward and the
adjoints leaving each segment of a segmented backward, against the recurrences written as loops."""

import pytest
import torch
from hf_mamba.kernels.selective_scan.chain import ChainTuning, chain_adjoints, chain_segments, segment_count

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize("initial_state", [False, True])
@pytest.mark.parametrize("block_s", [1, 4, 16])
def test_chain_kernels(block_s, initial_state):
    """37 segments, so several loop steps of block_s segments and a partial last one, and elements
    (channel, state) past a program's end."""
    torch.manual_seed(3)
    batch, d_inner, d_state, n_seg = 2, 5, 3, 37
    tuning = ChainTuning(block_e=8, block_s=block_s)
    A_log = torch.randn(d_inner, d_state, device=DEVICE)
    A = -torch.exp(A_log)
    h_end = torch.randn(batch, d_inner, n_seg, d_state, device=DEVICE)
    dtsum = torch.rand(batch, d_inner, n_seg - 1, device=DEVICE)
    h0 = torch.randn(batch, d_inner, d_state, device=DEVICE) if initial_state else None
    h_in = torch.full_like(h_end, float("nan"))
    chain_segments(h_end, dtsum, A_log, h0, h_in, A_is_log=True, tuning=tuning)
    h = h0 if initial_state else torch.zeros(batch, d_inner, d_state, device=DEVICE)
    expected = [h]
    for s in range(n_seg - 1):
        h = torch.exp(dtsum[:, :, s, None] * A) * h + h_end[:, :, s]
        expected.append(h)
    torch.testing.assert_close(h_in, torch.stack(expected, dim=2), rtol=1e-5, atol=1e-6)

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
