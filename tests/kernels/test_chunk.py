"""The chunk scan kernels (`chunk`), which serve the forward above d_state 64 and the backward above 16:
short chunks, several channels per program, document resets, a large d_state."""

import pytest
import torch
from hf_mamba.kernels.selective_scan.chunk import ChunkTuning
from hf_mamba.kernels.selective_scan.triton_scan import ScanTuning
from scan_testing import FP32_BF16, ON_GPU, check_scan, document_ids

# Both directions on the chunk kernels whatever the d_state.
CHUNK_ONLY = dict(recurrent_fwd_max_d_state=0, recurrent_bwd_max_d_state=0)


@pytest.mark.parametrize("dtype", FP32_BF16)
@pytest.mark.parametrize("block_d", [1, 4])
def test_many_chunks(block_d, dtype, nan_fill_empty):
    """Short chunks: checkpoints, the state carried between chunks, the adjoint carried back; several
    channels per program (d_inner 5 is not a multiple of 4: masked rows)."""
    torch.manual_seed(9)
    tuning = ScanTuning(**CHUNK_ONLY, chunk=ChunkTuning(max_chunk=16, block_d=block_d))
    case = dict(cpu=(2, 5, 37, 6), gpu=(2, 100, 499, 16), D=True, z=True, bias=True, h0=True)
    check_scan("triton", case, dtype, tuning=tuning)


@pytest.mark.parametrize("dtype", FP32_BF16)
def test_seq_idx(dtype, nan_fill_empty):
    """seq_idx resets the state at document boundaries, forward and backward, across chunks."""
    torch.manual_seed(10)
    tuning = ScanTuning(**CHUNK_ONLY, chunk=ChunkTuning(max_chunk=16))
    case = dict(cpu=(3, 5, 45, 6), gpu=(3, 100, 750, 16), D=True, z=True, bias=True, h0=True)
    batch, _, seqlen, _ = case["gpu" if ON_GPU else "cpu"]
    check_scan("triton", case, dtype, seq_idx=document_ids(batch, seqlen, 4, seed=0), tuning=tuning)


def test_large_d_state(nan_fill_empty):
    """Above d_state 64 the chunk forward runs by default; a state size that is not a power of two."""
    torch.manual_seed(11)
    case = dict(cpu=(1, 3, 20, 65), gpu=(2, 64, 300, 65), D=True, z=True, bias=True, h0=True)
    check_scan("triton", case, torch.float32)
