"""MambaCache: the fixed-size recurrent state of every layer, so decoding costs O(1) per token.

Per layer it holds
    conv_states[i]  (batch, d_inner, d_conv)   the last d_conv inputs of the causal conv, newest last
    ssm_states[i]   (batch, d_inner, d_state)  the SSM state h, fp32 (fp64 in an fp64 model)
allocated once; every update writes into these tensors in place, so their addresses never
change (what CUDA-graph capture of the decode step needs). Read a layer's states as
`cache.conv_states[i]` / `cache.ssm_states[i]` (plain list indexing, no copy), or through
Transformers' Cache API: `cache.get_conv_state(i)`, `cache.get_recurrent_state(i)`.

It is a `transformers.Cache`, so generation utilities and user code that check the cache type
find one; it keeps its own storage (two lists of tensors) rather than Cache's layer objects,
which allocate lazily and replace tensors on reorder.
"""

import torch
from transformers.cache_utils import Cache


class MambaCache(Cache):
    """Recurrent cache of a Mamba model; `generate()` creates one, or pass your own as `cache`.

    Args:
        config: the model's MambaConfig.
        batch_size: number of sequences.
        dtype: dtype of the conv states (the model's activation dtype); SSM states are fp32 (fp64 for an fp64
            model, as its scans compute).
        device: where to allocate (a layer that runs elsewhere, in a model split over devices by device_map,
            moves its states to its own device at its first call).
    """

    # generate() auto-compiles the forward for caches that say they are compileable; we decide ourselves.
    is_compileable = False
    # A recurrent state cannot be cut back to fewer tokens (assisted decoding, deferred stop checks).
    is_croppable = False

    def __init__(self, config, batch_size: int, dtype=torch.float32, device=None):
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 0:
            raise ValueError(f"batch_size must be a non-negative integer, got {batch_size!r}")
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            # The conv states hold the layer's activations: an integer copy would truncate them silently.
            raise ValueError(f"dtype must be a floating-point torch.dtype (the model's activations'), got {dtype!r}")
        d_inner = config.intermediate_size
        layers = range(config.num_hidden_layers)
        state_dtype = torch.promote_types(dtype, torch.float32)
        self._set_states(
            [torch.zeros(batch_size, d_inner, config.conv_kernel, dtype=dtype, device=device) for _ in layers],
            [torch.zeros(batch_size, d_inner, config.state_size, dtype=state_dtype, device=device) for _ in layers],
        )

    @classmethod
    def _reusing(cls, conv_states, ssm_states):
        """A cache for a new sequence on existing state tensors, which it zeroes (the decode-graph pool hands
        the tensors a graph was captured on to the next sequence: hf_mamba.decode_graphs)."""
        cache = cls.__new__(cls)
        cache._set_states(list(conv_states), list(ssm_states))
        cache.reset()
        return cache

    def _set_states(self, conv_states, ssm_states):
        # Cache's own storage stays empty: its methods that walk `layers` have nothing to walk.
        super().__init__(layers=[])
        self.dtype = conv_states[0].dtype
        self.conv_states = conv_states
        self.ssm_states = ssm_states
        # Number of positions already folded into the states (same for every row; left padding counts).
        self.seqlen_offset = 0

    def place_layer(self, layer_idx: int, device) -> None:
        """Keep layer `layer_idx`'s states on `device`, where the layer runs: a model split over devices
        (`from_pretrained(..., device_map=...)`) runs each layer on its own, as Transformers' own caches allow.
        Moves them once, at the layer's first call (such a model decodes without CUDA graphs)."""
        if self.ssm_states[layer_idx].device != device:
            self.conv_states[layer_idx] = self.conv_states[layer_idx].to(device)
            self.ssm_states[layer_idx] = self.ssm_states[layer_idx].to(device)

    def __repr__(self):
        conv, ssm = self.conv_states[0], self.ssm_states[0]
        return (
            f"MambaCache(layers={len(self)}, batch_size={self.batch_size}, seqlen_offset={self.seqlen_offset}, "
            f"conv_state={tuple(conv.shape)} {conv.dtype}, ssm_state={tuple(ssm.shape)} {ssm.dtype}, "
            f"device={self._devices_text()})"
        )

    def _devices_text(self):
        """One device, or each layer's where a model split over devices placed them differently."""
        devices = [str(state.device) for state in self.ssm_states]
        return devices[0] if len(set(devices)) == 1 else "[" + ", ".join(devices) + "]"

    def __len__(self):
        return len(self.ssm_states)

    @property
    def batch_size(self) -> int:
        return self.ssm_states[0].shape[0]

    @property
    def is_linear(self) -> list[bool]:
        """Per layer: a fixed-size recurrent state, not a growing key/value cache."""
        return [True] * len(self)

    @property
    def is_sliding(self) -> list[bool]:
        return [False] * len(self)

    @property
    def is_initialized(self) -> bool:
        return True  # allocated in full at construction

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seqlen_offset

    def has_previous_state(self, layer_idx: int | None = None, state_idx: int | None = None) -> bool:
        return self.seqlen_offset > 0

    def get_conv_state(self, layer_idx: int, state_idx: int = 0) -> torch.Tensor | None:
        """Layer `layer_idx`'s conv state (the tensor itself, not a copy), None before any token was seen."""
        return self.conv_states[layer_idx] if self.seqlen_offset > 0 else None

    def get_recurrent_state(self, layer_idx: int, state_idx: int = 0) -> torch.Tensor | None:
        """Layer `layer_idx`'s SSM state h (the tensor itself, not a copy), None before any token was seen."""
        return self.ssm_states[layer_idx] if self.seqlen_offset > 0 else None

    def update_conv_state(self, conv_state, layer_idx, state_idx: int = 0, **kwargs) -> torch.Tensor:
        """Copy `conv_state` into layer `layer_idx`'s conv state, in place (Cache's argument order; the older
        Mamba-cache order (layer_idx, conv_state) is accepted too)."""
        conv_state, layer_idx = _state_then_layer(conv_state, layer_idx, len(self))
        return self.conv_states[layer_idx].copy_(conv_state.detach())  # states carry no autograd history

    def update_recurrent_state(self, ssm_state, layer_idx, state_idx: int = 0, **kwargs) -> torch.Tensor:
        """Copy `ssm_state` into layer `layer_idx`'s SSM state, in place (argument order as update_conv_state)."""
        ssm_state, layer_idx = _state_then_layer(ssm_state, layer_idx, len(self))
        return self.ssm_states[layer_idx].copy_(ssm_state.detach())

    update_ssm_state = update_recurrent_state  # the name of Transformers' earlier Mamba cache

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Select the rows of every state by `beam_idx` (beam search), in place."""
        for states in (self.conv_states, self.ssm_states):
            for state in states:
                state.copy_(state.index_select(0, beam_idx.to(state.device)))

    def reset(self) -> None:
        """Zero every state, keeping the allocations."""
        torch._foreach_zero_(self.conv_states + self.ssm_states)  # a few launches on CUDA, not one per tensor
        self.seqlen_offset = 0

    def crop(self, max_length: int) -> None:
        """Only crop(0) (drop states a fixed-size cache does not hold: nothing to do); a recurrent state cannot
        be cut back to fewer tokens."""
        if max_length != 0:
            raise NotImplementedError("MambaCache holds a recurrent state, which cannot be cut back to fewer tokens")

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("MambaCache has a fixed batch size; build a new cache for another batch")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise NotImplementedError("MambaCache has a fixed batch size; build a new cache for another batch")


def check_cache(cache, past_key_values=None, config=None) -> None:
    """ValueError naming the argument for a cache a Mamba forward cannot continue from: anything but a MambaCache
    as `cache`, a cache under attention models' name `past_key_values` (which would otherwise be ignored), and,
    given the model's config, a cache of another number of layers or other state sizes."""
    if past_key_values is not None:
        raise ValueError(
            "past_key_values: an hf_mamba model keeps its state in a MambaCache, passed as `cache` (what a forward "
            f"with use_cache=True returns); got a {type(past_key_values).__name__} as past_key_values"
        )
    if cache is not None and not isinstance(cache, MambaCache):
        raise ValueError(
            "cache must be an hf_mamba MambaCache (what a forward with use_cache=True returns, or "
            f"MambaCache(config, batch_size, ...)); got a {type(cache).__name__}"
        )
    if cache is not None and config is not None:
        expected = (config.num_hidden_layers, config.intermediate_size, config.conv_kernel, config.state_size)
        conv, ssm = cache.conv_states, cache.ssm_states
        found = (len(ssm), *(conv[0].shape[1:] if conv else (None, None)), ssm[0].shape[-1] if ssm else None)
        if found != expected:
            raise ValueError(
                "cache was made for another model: (layers, d_inner, d_conv, d_state) = "
                f"{tuple(found)}, this model's are {expected}"
            )


def _state_then_layer(first, second, layers):
    if isinstance(first, int) and isinstance(second, torch.Tensor):
        first, second = second, first
    if not isinstance(second, int):
        raise ValueError(f"layer_idx must be an int, got {type(second).__name__}")
    if not 0 <= second < layers:
        raise ValueError(f"layer_idx must lie in [0, {layers}) for this cache's {layers} layers, got {second}")
    return first, second


__all__ = ["MambaCache", "check_cache"]
