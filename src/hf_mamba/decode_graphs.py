"""CUDA-graph decoding: one captured graph per decode state, replayed for every new token.

The model offers one step callable, `step(input_ids, cache) -> logits` (embedding -> blocks -> norm ->
lm_head for one token, advancing the cache's states in place), and a fingerprint of what a step reads
besides the cache. This module captures the step on a cache's state tensors, replays it, and keeps
graphs across generate() calls. The cache knows nothing of graphs.

Why a pool: every generate() creates a new cache, and a graph per cache would cost each call a warm-up
step and a capture (mamba_ssm keeps its graph across calls too). So a cache the model creates for a new
sequence takes the states, zeroed, of a pool entry of its kind (batch, dtype, ...) that no live cache
holds, and at its first decode step the entry's graph, if the model's fingerprint is still the one the
graph was captured with (else a new capture replaces it). A cache still alive (say, returned by
return_dict_in_generate) keeps its states: the next sequence gets fresh ones in a new entry.
"""

import sys
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .cache import MambaCache
from .kernels._launch import device_guard

Step = Callable[[torch.Tensor, MambaCache], torch.Tensor]


class DecodeGraph:
    """A CUDA graph of one decode step on one set of state tensors.

    The states never move (every update is in place), so the graph stays valid for as long as they live.
    """

    def __init__(self, step: Step, cache: MambaCache, input_ids: torch.Tensor):
        self.static_ids = input_ids.clone()
        self.states_ptr = cache.ssm_states[0].data_ptr()
        saved_states = [state.clone() for state in cache.conv_states + cache.ssm_states]
        # Streams and capture belong to the current GPU: make it the model's (say, cuda:1 of a process whose
        # current device is cuda:0).
        with device_guard(input_ids):
            # Warm up on a side stream (compiles kernels, creates library handles), as capture requires.
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                step(self.static_ids, cache)
            torch.cuda.current_stream().wait_stream(stream)
            for state, saved in zip(cache.conv_states + cache.ssm_states, saved_states, strict=True):
                state.copy_(saved)  # undo the warm-up step
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.static_logits = step(self.static_ids, cache)

    def __call__(self, input_ids):
        self.static_ids.copy_(input_ids)
        with device_guard(input_ids):  # a replay runs on the current device's stream
            self.graph.replay()
        return self.static_logits.clone()


@dataclass(eq=False)
class _PooledStates:
    """State tensors a decode graph is captured on, the graph, and the cache now using the tensors."""

    key: tuple  # (batch, conv-state dtype, device, inference mode)
    conv_states: tuple
    ssm_states: tuple
    holder: weakref.ref  # dead once that cache is gone: then the next new sequence may take the tensors
    graph: DecodeGraph | None = None
    fingerprint: tuple | None = None  # the model's fingerprint when `graph` was captured


class DecodeGraphs:
    """A model's decode graphs: the pool of reusable states with their graphs, and the graph of each live cache.

    Memory: at most MAX_ENTRIES pool entries, the least recently used evicted (its cache, if alive, keeps
    its states and graph). Each holds its states (2.8B model at batch 64: 1.5 GB) and its graph's
    activations of one step, also after generate() returns.
    """

    MAX_ENTRIES = 2
    graph_class = DecodeGraph  # what captures a step (tests put a CPU stand-in here)

    def __init__(self):
        self.entries = []  # least recently used first
        self._graph_of_cache = weakref.WeakKeyDictionary()  # each live cache's graph, chosen at its first step

    def __reduce__(self):
        return DecodeGraphs, ()  # copied or pickled empty: the graphs read this model's memory

    def graph_of(self, cache: MambaCache) -> DecodeGraph | None:
        """The graph `cache` decodes with, None before its first graph-replayed step."""
        return self._graph_of_cache.get(cache)

    def new_cache(self, config, batch: int, dtype, device) -> MambaCache:
        """A cache for a new sequence: a free entry's states (zeroed), else fresh states in a new entry."""
        # Tensors made under inference_mode are inference tensors, which only inference_mode may update.
        key = (batch, dtype, torch.device(device), torch.is_inference_mode_enabled())
        # An entry whose states someone still holds (a tensor or a view of it kept beyond its cache)
        # leaves the pool: its next sequence would overwrite them.
        self.entries = [entry for entry in self.entries if entry.holder() is not None or not _held_elsewhere(entry)]
        free = [entry for entry in self.entries if entry.key == key and entry.holder() is None]
        if free:
            entry = free[-1]
            self.entries.remove(entry)
            cache = MambaCache._reusing(entry.conv_states, entry.ssm_states)
        else:
            cache = MambaCache(config, batch, dtype=dtype, device=device)
            entry = _PooledStates(key, tuple(cache.conv_states), tuple(cache.ssm_states), None)
        entry.holder = weakref.ref(cache)
        self.entries = [*self.entries, entry][-self.MAX_ENTRIES :]
        return cache

    def decode(self, step: Step, fingerprint: Callable[[], tuple], cache: MambaCache, input_ids) -> torch.Tensor:
        """Logits of one decode step on `cache`, by replaying its graph (captured at its first step)."""
        graph = self._graph_of_cache.get(cache)
        # A cache whose tensors were swapped since (a user's `cache.ssm_states[0] = ...`) gets a new graph.
        if graph is None or graph.states_ptr != cache.ssm_states[0].data_ptr():
            graph = self._graph_of_cache[cache] = self._graph_for(step, fingerprint, cache, input_ids)
        return graph(input_ids)

    def _graph_for(self, step, fingerprint, cache, input_ids):
        """The pool entry's graph if captured with the model as it is now, else a new one (kept in the entry).
        A cache from outside the pool (the user's, or evicted) gets its own."""
        entry = next((entry for entry in self.entries if entry.holder() is cache), None)
        if entry is None:
            return self.graph_class(step, cache, input_ids)
        now = fingerprint()
        if entry.fingerprint != now or entry.graph.states_ptr != cache.ssm_states[0].data_ptr():
            entry.graph, entry.fingerprint = self.graph_class(step, cache, input_ids), now
        return entry.graph


def _held_elsewhere(entry):
    """Whether anything besides `entry` refers to one of its state tensors or their storage (a view)."""
    probe = torch.empty(0)  # held exactly as the states are: one name, plus the tuple below
    counts = [_references(t) for t in (probe, *entry.conv_states, *entry.ssm_states)]
    return any(count != counts[0] for count in counts[1:])


# References to a storage, one per tensor viewing it (a private torch API; without it views go unseen).
_STORAGE_USE_COUNT = getattr(torch._C, "_storage_Use_Count", None)


def _references(tensor):
    """(Python references to the tensor object, references to its storage)."""
    storage_refs = _STORAGE_USE_COUNT(tensor.untyped_storage()._cdata) if _STORAGE_USE_COUNT else 0
    return sys.getrefcount(tensor), storage_refs


__all__ = ["DecodeGraph", "DecodeGraphs"]
