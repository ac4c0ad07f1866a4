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

Three kinds of graph: a step's logits (what the forward replays for one token); a selecting step
(`SelectStep`: it selects its token on the GPU and feeds it to the next replay, so generate() queues a
chunk of replays and reads the device once per chunk instead of once per token; `graph_decode.py`); and a
short prompt's prefill (`Prefill`, one per power-of-two length: there a forward's host work outlasts the
GPU's).
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
class SelectStep:
    """A decode step that selects its token as Transformers' `_sample` does: the fp32 logits, suppressed ids
    (min_new_tokens' EOS) at -inf, then the `warpers` (Transformers' temperature, top-k, top-p and min-p
    processors, called as they are) in order; the argmax, or with `sample` a draw from the softmax
    (torch.multinomial); with `eos` ids, a finished row gets `pad`."""

    vocab: int  # the logits' size
    eos: tuple[int, ...] = ()
    pad: int = 0
    sample: bool = False
    warpers: tuple = field(default=(), compare=False)  # the processor objects (alike where their keys are)
    # What tells warpers apart, the step's key in their place: (class, settings) of each (plain numbers).
    warper_key: tuple = field(init=False)

    def __post_init__(self):
        key = tuple((type(warper), tuple(sorted(vars(warper).items()))) for warper in self.warpers)
        object.__setattr__(self, "warper_key", key)


def select_step(step: Step, cache: MambaCache, ids, unfinished, suppressed, kind: SelectStep, eos, pad):
    """One decode step from `ids` (batch, 1) on `cache` that selects its tokens on the device. Updates `ids`
    to the chosen tokens and `unfinished` (batch,) to the rows still unfinished, in place, so the next replay
    continues from them; returns (batch, 2): each row's token and unfinished flag. `suppressed` is a (vocab,)
    bool mask; `eos` and `pad` the ids as tensors on the device."""
    scores = torch.where(suppressed, -math.inf, step(ids, cache)[:, -1].float())
    for warper in kind.warpers:
        scores = warper(ids, scores)  # they read only the scores
    next_ids = select_tokens(scores, kind.sample)
    if kind.eos:
        next_ids = next_ids * unfinished + pad * (1 - unfinished)
        unfinished.copy_(unfinished & ~torch.isin(next_ids, eos))
    ids.copy_(next_ids[:, None])
    return torch.stack([next_ids, unfinished], 1)


def select_tokens(scores, sample: bool):
    """The tokens Transformers' `_sample` selects from processed scores (batch, vocab): a draw from their
    softmax, or their argmax."""
    if sample:
        return torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1).squeeze(1)
    return scores.argmax(-1)


@dataclass(frozen=True)
class Prefill:
    """A new sequence's prefill of `length` positions (prompts left-padded to it, the padding masked), the
    last position's logits."""

    length: int


class DecodeGraph:
    """A CUDA graph on one set of state tensors, of one of three kinds: a decode step's logits (`kind`
    None); a decode step that selects the token on the GPU (`SelectStep`) and feeds it to the next replay;
    a new sequence's prefill (`Prefill`).

    The states never move (every update is in place), so the graph stays valid for as long as they live.
    """

    def __init__(
        self, step: Step, cache: MambaCache, input_ids: torch.Tensor, kind: SelectStep | Prefill | None = None
    ):
        self.static_ids = input_ids.clone()
        self.states_ptr = cache.ssm_states[0].data_ptr()
        self.kind = kind
        if kind is None:
            body = lambda: step(self.static_ids, cache)  # noqa: E731
        elif isinstance(kind, Prefill):
            self.static_mask = torch.ones_like(input_ids)
            body = lambda: step(self.static_ids, self.static_mask, cache)  # noqa: E731
        else:
            select = kind
            device, batch = input_ids.device, input_ids.shape[0]
            # Held by the graph object: a replay reads them, and memory freed after capture is reused.
            self.unfinished = torch.ones(batch, dtype=torch.long, device=device)
            self.suppressed = torch.zeros(select.vocab, dtype=torch.bool, device=device)
            self.eos = torch.tensor(select.eos, dtype=torch.long, device=device)
            self.pad = torch.tensor(select.pad, dtype=torch.long, device=device)
            body = lambda: select_step(  # noqa: E731
                step, cache, self.static_ids, self.unfinished, self.suppressed, select, self.eos, self.pad
            )
        saved = [t.clone() for t in self._mutated(cache)]
        # Streams and capture belong to the current GPU: make it the model's (say, cuda:1 of a process whose
        # current device is cuda:0).
        with device_guard(input_ids):
            # Warm up on a side stream (compiles kernels, creates library handles), as capture requires.
            rng = torch.cuda.get_rng_state(input_ids.device)
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                body()
            torch.cuda.current_stream().wait_stream(stream)
            for t, old in zip(self._mutated(cache), saved, strict=True):
                t.copy_(old)  # undo the warm-up step
            # A sampling warm-up drew random numbers: the replays draw those the eager loop would have drawn.
            torch.cuda.set_rng_state(rng, input_ids.device)
            if isinstance(kind, Prefill):
                # A new version of the mask: what the forward derives from a mask and keeps by its version
                # (the padding bias) is then derived again inside the capture, so a replay derives it too.
                self.static_mask.add_(0)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.static_out = body()

    def _mutated(self, cache):
        """What a step updates in place: the states, and a selecting step's ids and unfinished rows."""
        extra = [self.static_ids, self.unfinished] if isinstance(self.kind, SelectStep) else []
        return [*cache.conv_states, *cache.ssm_states, *extra]

    def __call__(self, input_ids):
        """The logits of one decode step of `input_ids` (batch, 1)."""
        self.static_ids.copy_(input_ids)
        with device_guard(input_ids):  # a replay runs on the current device's stream
            self.graph.replay()
        return self.static_out.clone()

    def prefill(self, input_ids, attention_mask):
        """The last position's logits of a prefill graph, for `input_ids` and `attention_mask` of its length."""
        self.static_ids.copy_(input_ids)
        self.static_mask.copy_(attention_mask)
        with device_guard(input_ids):
            self.graph.replay()
        return self.static_out.clone()

    def start(self, input_ids, unfinished):
        """Selecting steps continue from tokens `input_ids` (batch, 1) and rows `unfinished` (batch,) long."""
        self.static_ids.copy_(input_ids)
        self.unfinished.copy_(unfinished)

    def run_steps(self, steps: int, suppressed) -> torch.Tensor:
        """(batch, 2, steps): tokens and unfinished flags of `steps` selecting steps, each one replay queued
        behind the last (no wait for the GPU), with the (vocab,) bool mask `suppressed`."""
        out = torch.empty(self.static_ids.shape[0], 2, steps, dtype=torch.long, device=self.static_ids.device)
        self.suppressed.copy_(suppressed)
        with device_guard(out):
            for i in range(steps):
                self.graph.replay()
                out[:, :, i].copy_(self.static_out)
        return out


@dataclass(eq=False)
class _PooledStates:
    """State tensors a decode graph is captured on, the graph, and the cache now using the tensors."""

    key: tuple  # (batch, conv-state dtype, device, inference mode)
    conv_states: tuple
    ssm_states: tuple
    holder: weakref.ref  # dead once that cache is gone: then the next new sequence may take the tensors
    graphs: dict = field(default_factory=dict)  # SelectStep (None: the logits graph) -> DecodeGraph
    fingerprint: tuple | None = None  # the model's fingerprint when `graphs` were captured

    @property
    def graph(self):
        """The logits graph."""
        return self.graphs.get(None)


class DecodeGraphs:
    """A model's decode graphs: the pool of reusable states with their graphs, and the graph of each live cache.

    Memory: at most MAX_ENTRIES pool entries, the least recently used evicted (its cache, if alive, keeps
    its states and graphs). Each holds its states (2.8B model at batch 64: 1.5 GB) and its graphs' memory,
    also after generate() returns: per graph the activations its capture allocated and its outputs; a
    generate() that selects its tokens on the GPU adds one graph per kind (`SelectStep`: EOS setting,
    greedy or sampled, warpers) and a prefill graph per prompt bucket; at most MAX_GRAPHS_PER_ENTRY of each.
    """

    MAX_ENTRIES = 2
    MAX_GRAPHS_PER_ENTRY = 8  # graphs of one type (SelectStep, Prefill) kept per entry, the oldest dropped first
    graph_class = DecodeGraph  # what captures a step (tests put a CPU stand-in here)

    def __init__(self):
        self.entries = []  # least recently used first
        self._graphs_of_cache = weakref.WeakKeyDictionary()  # each live cache's graphs, by kind, chosen at first use

    def __reduce__(self):
        return DecodeGraphs, ()  # copied or pickled empty: the graphs read this model's memory

    def graph_of(self, cache: MambaCache, kind: SelectStep | None = None) -> DecodeGraph | None:
        """The graph of that kind `cache` decodes with, None before its first use."""
        return self._graphs_of_cache.get(cache, {}).get(kind)

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

    def select_graph(self, step: Step, fingerprint, cache: MambaCache, input_ids, kind: SelectStep) -> DecodeGraph:
        """The cache's selecting-step graph of that kind (captured at its first use)."""
        return self._graph(step, fingerprint, cache, input_ids, kind)

    def prefill(self, step, fingerprint, cache: MambaCache, input_ids, attention_mask) -> torch.Tensor:
        """Logits of the last position of a new sequence's prefill on `cache` (fresh states), by replaying the
        cache's graph of that length (captured at its first use)."""
        graph = self._graph(step, fingerprint, cache, input_ids, Prefill(input_ids.shape[1]))
        return graph.prefill(input_ids, attention_mask)

    def _graph(self, step, fingerprint, cache, input_ids, kind):
        graphs = self._graphs_of_cache.setdefault(cache, {})
        graph = graphs.get(kind)
        # A cache whose tensors were swapped since (a user's `cache.ssm_states[0] = ...`) gets a new graph.
        if graph is None or graph.states_ptr != cache.ssm_states[0].data_ptr():
            graph = graphs[kind] = self._graph_for(step, fingerprint, cache, input_ids, kind)
        return graph

    def _graph_for(self, step, fingerprint, cache, input_ids, kind):
        """The pool entry's graph of that kind if captured with the model as it is now, else a new one (kept in
        the entry). A cache from outside the pool (the user's, or evicted) gets its own."""
        entry = next((entry for entry in self.entries if entry.holder() is cache), None)
        if entry is None:
            return self._capture(step, cache, input_ids, kind)
        now = fingerprint()
        moved = any(graph.states_ptr != cache.ssm_states[0].data_ptr() for graph in entry.graphs.values())
        if entry.fingerprint != now or moved:
            entry.graphs, entry.fingerprint = {}, now
        if kind not in entry.graphs:
            alike = [other for other in entry.graphs if type(other) is type(kind)]
            if len(alike) >= self.MAX_GRAPHS_PER_ENTRY:  # say, a sweep over temperatures
                del entry.graphs[alike[0]]  # the oldest capture of that type
            entry.graphs[kind] = self._capture(step, cache, input_ids, kind)
        return entry.graphs[kind]

    def _capture(self, step, cache, input_ids, kind):
        if kind is None:  # the call the test stand-ins of graph_class know
            return self.graph_class(step, cache, input_ids)
        return self.graph_class(step, cache, input_ids, kind)


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


__all__ = ["DecodeGraph", "DecodeGraphs", "Prefill", "SelectStep", "select_step", "select_tokens"]
