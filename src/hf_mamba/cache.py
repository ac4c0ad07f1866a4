"""MambaCache: the fixed-size recurrent state of every layer, so decoding costs O(1) per token.

Per layer it holds
    conv_states[i]  (batch, d_inner, d_conv)   the last d_conv inputs of the causal conv, newest last
    ssm_states[i]   (batch, d_inner, d_state)  the SSM state h, always fp32
allocated once; every update writes into these tensors in place, so their addresses never
change (what CUDA-graph capture of the decode step needs). A cache that MambaForCausalLM creates
may be given the tensors of an earlier cache of the model that is gone (so the earlier cache's
decode graph is reused), never while anything still refers to them or to a view of them.
"""

import torch


class MambaCache:
    """Recurrent cache of a Mamba model; `generate()` creates one, or pass your own as `cache_params`.

    Args:
        config: the model's MambaConfig.
        batch_size: number of sequences.
        dtype: dtype of the conv states (the model's activation dtype); SSM states are fp32.
        device: where to allocate.
    """

    # generate() auto-compiles the forward for caches that say they are compileable; we decide ourselves.
    is_compileable = False
    # Transformers >= 5.24 asks whether a cache can be cut back to fewer tokens (assisted decoding, mps):
    # a recurrent state cannot.
    is_croppable = False

    def __init__(self, config, batch_size: int, dtype=torch.float32, device=None):
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        d_inner = config.intermediate_size
        layers = range(config.num_hidden_layers)
        self._set_states(
            [torch.zeros(batch_size, d_inner, config.conv_kernel, dtype=dtype, device=device) for _ in layers],
            [torch.zeros(batch_size, d_inner, config.state_size, dtype=torch.float32, device=device) for _ in layers],
        )

    @classmethod
    def _reusing(cls, conv_states, ssm_states):
        """A cache for a new sequence on existing state tensors, which it zeroes: MambaForCausalLM hands the
        tensors a decode graph was captured on to its next sequence (`_DecodeGraphPool` in modeling_mamba.py)."""
        cache = cls.__new__(cls)
        cache._set_states(list(conv_states), list(ssm_states))
        cache.reset()
        return cache

    def _set_states(self, conv_states, ssm_states):
        self.batch_size = ssm_states[0].shape[0]
        self.dtype = conv_states[0].dtype
        self.conv_states = conv_states
        self.ssm_states = ssm_states
        # Number of positions already folded into the states (same for every row; left padding counts).
        self.seqlen_offset = 0
        # CUDA graph of the model's decode step on these tensors, captured on first use (CUDA only).
        self.decode_graph = None

    @property
    def is_linear(self) -> list[bool]:
        """Per layer: a fixed-size recurrent state, not a growing key/value cache (Transformers >= 5.24 asks)."""
        return [True] * len(self.ssm_states)

    def __len__(self):
        return len(self.ssm_states)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seqlen_offset

    def update_conv_state(self, layer_idx: int, new_conv_state: torch.Tensor) -> None:
        self.conv_states[layer_idx].copy_(new_conv_state)

    def update_ssm_state(self, layer_idx: int, new_ssm_state: torch.Tensor) -> None:
        self.ssm_states[layer_idx].copy_(new_ssm_state)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Select the rows of every state by `beam_idx` (beam search), in place."""
        for states in (self.conv_states, self.ssm_states):
            for state in states:
                state.copy_(state.index_select(0, beam_idx.to(state.device)))

    def reset(self) -> None:
        """Zero every state, keeping the allocations."""
        torch._foreach_zero_(self.conv_states + self.ssm_states)  # a few launches on CUDA, not one per tensor
        self.seqlen_offset = 0


__all__ = ["MambaCache"]
