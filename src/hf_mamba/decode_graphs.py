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

Two kinds of graph: a step's logits (what the forward replays for one token), and a chunk of greedy steps
(`GreedyChunk`: each step selects its token on the GPU and feeds it to the next, so generate() launches one
replay and reads the device once per chunk instead of once per token; `greedy_decode.py` drives it).
"""

import math
import sys
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .cache import MambaCache
from .kernels._launch import device_guard

Step = Callable[[torch.Tensor, MambaCache], torch.Tensor]


@dataclass(frozen=True)
class GreedyChunk:
    """A chunk of `steps` greedy decode steps, as Transformers' greedy loop selects tokens: the argmax of the
    fp32 logits, suppressed ids (min_new_tokens' EOS) at -inf; with `eos` ids, a finished row gets `pad`."""

    steps: int
    vocab: int  # the logits' size
    eos: tuple[int, ...] = ()
    pad: int = 0


def greedy_steps(step: Step, cache: MambaCache, ids, unfinished, suppressed, chunk: GreedyChunk, eos, pad):
    """Runs `chunk.steps` greedy decode steps from `ids` (batch, 1) on `cache`, each step's token the next
    one's input; returns the tokens and the rows still unfinished after each step, both (batch, steps).
    `suppressed` is a (vocab,) bool mask; `eos` and `pad` the chunk's ids as tensors on the device."""
    tokens, flags = [], []
    for _ in range(chunk.steps):
        scores = torch.where(suppressed, -math.inf, step(ids, cache)[:, -1].float())
        next_ids = scores.argmax(-1)
        if chunk.eos:
            next_ids = next_ids * unfinished + pad * (1 - unfinished)
            unfinished = unfinished & ~torch.isin(next_ids, eos)
        tokens.append(next_ids)
        flags.append(unfinished)
        ids = next_ids[:, None]
    return torch.stack(tokens, 1), torch.stack(flags, 1)


@dataclass(frozen=True)
class Prefill:
    """A new sequence's prefill of `length` positions (prompts left-padded to it, the padding masked), the
    last position's logits."""

    length: int


class DecodeGraph:
    """A CUDA graph on one set of state tensors: one decode step's logits (`chunk` None), or a GreedyChunk.

    The states never move (every update is in place), so the graph stays valid for as long as they live.
    """

    def __init__(self, step: Step, cache: MambaCache, input_ids: torch.Tensor, chunk: GreedyChunk | None = None):
        self.static_ids = input_ids.clone()
        self.states_ptr = cache.ssm_states[0].data_ptr()
        self.chunk = chunk
        if chunk is None:
            body = lambda: step(self.static_ids, cache)  # noqa: E731
        elif isinstance(chunk, Prefill):
            self.static_mask = torch.ones_like(input_ids)
            body = lambda: step(self.static_ids, self.static_mask, cache)  # noqa: E731
        else:
            device, batch = input_ids.device, input_ids.shape[0]
            self.unfinished = torch.ones(batch, dtype=torch.long, device=device)
            self.suppressed = torch.zeros(chunk.vocab, dtype=torch.bool, device=device)
            # Held by the graph object: a replay reads them, and memory freed after capture is reused.
            self.eos = torch.tensor(chunk.eos, dtype=torch.long, device=device)
            self.pad = torch.tensor(chunk.pad, dtype=torch.long, device=device)
            body = lambda: greedy_steps(  # noqa: E731
                step, cache, self.static_ids, self.unfinished, self.suppressed, chunk, self.eos, self.pad
            )
        saved_states = [state.clone() for state in cache.conv_states + cache.ssm_states]
        # Streams and capture belong to the current GPU: make it the model's (say, cuda:1 of a process whose
        # current device is cuda:0).
        with device_guard(input_ids):
            # Warm up on a side stream (compiles kernels, creates library handles), as capture requires.
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                body()
            torch.cuda.current_stream().wait_stream(stream)
            for state, saved in zip(cache.conv_states + cache.ssm_states, saved_states, strict=True):
                state.copy_(saved)  # undo the warm-up steps
            if isinstance(chunk, Prefill):
                # A new version of the mask: what the forward derives from a mask and keeps by its version
                # (the padding bias) is then derived again inside the capture, so a replay derives it too.
                self.static_mask.add_(0)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.static_out = body()

    def prefill(self, input_ids, attention_mask):
        """The last position's logits of a prefill graph, for `input_ids` and `attention_mask` of its length."""
        self.static_ids.copy_(input_ids)
        self.static_mask.copy_(attention_mask)
        with device_guard(input_ids):
            self.graph.replay()
        return self.static_out.clone()

    def __call__(self, input_ids, unfinished=None, suppressed=None):
        """A logits graph: the step's logits. A chunk graph: (tokens, unfinished flags), each (batch, steps),
        from rows `unfinished` (batch,) long and the (vocab,) bool mask `suppressed`."""
        self.static_ids.copy_(input_ids)
        if self.chunk is not None:
            self.unfinished.copy_(unfinished)
            self.suppressed.copy_(suppressed)
        with device_guard(input_ids):  # a replay runs on the current device's stream
            self.graph.replay()
        if self.chunk is None:
            return self.static_out.clone()
        return tuple(out.clone() for out in self.static_out)


@dataclass(eq=False)
class _PooledStates:
    """State tensors a decode graph is captured on, the graph, and the cache now using the tensors."""

    key: tuple  # (batch, conv-state dtype, device, inference mode)
    conv_states: tuple
    ssm_states: tuple
    holder: weakref.ref  # dead once that cache is gone: then the next new sequence may take the tensors
    graphs: dict = field(default_factory=dict)  # GreedyChunk (None: the logits graph) -> DecodeGraph
    fingerprint: tuple | None = None  # the model's fingerprint when `graphs` were captured

    @property
    def graph(self):
        """The logits graph."""
        return self.graphs.get(None)


class DecodeGraphs:
    """A model's decode graphs: the pool of reusable states with their graphs, and the graph of each live cache.

    Memory: at most MAX_ENTRIES pool entries, the least recently used evicted (its cache, if alive, keeps
    its states and graphs). Each holds its states (2.8B model at batch 64: 1.5 GB) and its graphs' memory,
    also after generate() returns: per graph the activations its capture allocated (a chunk frees each
    step's before the next) and its outputs; a greedy generate() adds up to three chunk graphs (16, 4 and
    1 steps) per EOS setting.
    """

    MAX_ENTRIES = 2
    graph_class = DecodeGraph  # what captures a step (tests put a CPU stand-in here)

    def __init__(self):
        self.entries = []  # least recently used first
        self._graphs_of_cache = weakref.WeakKeyDictionary()  # each live cache's graphs, by kind, chosen at first use

    def __reduce__(self):
        return DecodeGraphs, ()  # copied or pickled empty: the graphs read this model's memory

    def graph_of(self, cache: MambaCache, chunk: GreedyChunk | None = None) -> DecodeGraph | None:
        """The graph of that kind `cache` decodes with, None before its first use."""
        return self._graphs_of_cache.get(cache, {}).get(chunk)

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
        return self._graph(step, fingerprint, cache, input_ids, None)(input_ids)

    def decode_greedy(self, step: Step, fingerprint, cache: MambaCache, input_ids, unfinished, suppressed, chunk):
        """(tokens, unfinished flags), each (batch, chunk.steps), of a chunk of greedy steps on `cache` from
        `input_ids` (batch, 1), by replaying the cache's graph of that chunk (captured at its first use)."""
        return self._graph(step, fingerprint, cache, input_ids, chunk)(input_ids, unfinished, suppressed)

    def prefill(self, step, fingerprint, cache: MambaCache, input_ids, attention_mask) -> torch.Tensor:
        """Logits of the last position of a new sequence's prefill on `cache` (fresh states), by replaying the
        cache's graph of that length (captured at its first use)."""
        graph = self._graph(step, fingerprint, cache, input_ids, Prefill(input_ids.shape[1]))
        return graph.prefill(input_ids, attention_mask)

    def _graph(self, step, fingerprint, cache, input_ids, chunk):
        graphs = self._graphs_of_cache.setdefault(cache, {})
        graph = graphs.get(chunk)
        # A cache whose tensors were swapped since (a user's `cache.ssm_states[0] = ...`) gets a new graph.
        if graph is None or graph.states_ptr != cache.ssm_states[0].data_ptr():
            graph = graphs[chunk] = self._graph_for(step, fingerprint, cache, input_ids, chunk)
        return graph

    def _graph_for(self, step, fingerprint, cache, input_ids, chunk):
        """The pool entry's graph of that kind if captured with the model as it is now, else a new one (kept in
        the entry). A cache from outside the pool (the user's, or evicted) gets its own."""
        entry = next((entry for entry in self.entries if entry.holder() is cache), None)
        if entry is None:
            return self._capture(step, cache, input_ids, chunk)
        now = fingerprint()
        moved = any(graph.states_ptr != cache.ssm_states[0].data_ptr() for graph in entry.graphs.values())
        if entry.fingerprint != now or moved:
            entry.graphs, entry.fingerprint = {}, now
        if chunk not in entry.graphs:
            entry.graphs[chunk] = self._capture(step, cache, input_ids, chunk)
        return entry.graphs[chunk]

    def _capture(self, step, cache, input_ids, chunk):
        if chunk is None:  # the call the test stand-ins of graph_class know
            return self.graph_class(step, cache, input_ids)
        return self.graph_class(step, cache, input_ids, chunk)


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


__all__ = ["DecodeGraph", "DecodeGraphs", "GreedyChunk", "Prefill", "greedy_steps"]
