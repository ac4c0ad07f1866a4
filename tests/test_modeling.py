"""Model tests: parity with Transformers' built-in Mamba, every scan path against the reference,
cache continuation, padding, save/load, Auto classes, bad input."""

import copy
import functools
import weakref
from types import SimpleNamespace

import pytest
import torch
import transformers
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    GenerationConfig,
)

import hf_mamba
from hf_mamba import (
    MambaCache,
    MambaConfig,
    MambaForCausalLM,
    MambaForSequenceClassification,
    MambaModel,
    modeling_mamba,
)
from hf_mamba.compat import enable_activation_checkpointing
from hf_mamba.decode_graphs import DecodeGraphs, Prefill, SelectStep, select_step
from hf_mamba.modeling_mamba import CACHE_FIELD

LOGITS_RTOL = 1e-5  # fp32: relative to the largest logit


def max_rel_diff(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture
def builtin_pair(tiny_kwargs, tmp_path):
    """Transformers' built-in MambaForCausalLM and ours loaded from the folder it saved."""
    builtin = transformers.MambaForCausalLM(transformers.MambaConfig(**tiny_kwargs)).eval()
    builtin.save_pretrained(tmp_path)
    ours, info = MambaForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    return builtin, ours.eval(), info


@pytest.fixture
def model(tiny_kwargs):
    return MambaForCausalLM(MambaConfig(**tiny_kwargs)).eval()


# ---- parity with Transformers' built-in Mamba -------------------------------------------------


def test_builtin_checkpoint_loads_without_missing_or_unexpected_keys(builtin_pair):
    _, _, info = builtin_pair
    assert info["missing_keys"] == set() or info["missing_keys"] == []
    assert info["unexpected_keys"] == set() or info["unexpected_keys"] == []
    assert list(info["mismatched_keys"]) == []


def test_parameter_names_and_shapes_match_builtin(builtin_pair):
    builtin, ours, _ = builtin_pair
    theirs = {k: v.shape for k, v in builtin.state_dict().items()}
    mine = {k: v.shape for k, v in ours.state_dict().items()}
    assert mine == theirs


def test_logits_and_loss_match_builtin(builtin_pair):
    builtin, ours, _ = builtin_pair
    ids = torch.randint(0, 97, (3, 21))
    with torch.no_grad():
        expected, actual = builtin(ids, labels=ids), ours(ids, labels=ids)
    assert max_rel_diff(actual.logits, expected.logits) < LOGITS_RTOL
    torch.testing.assert_close(actual.loss, expected.loss, rtol=1e-6, atol=1e-6)


def test_greedy_generation_matches_builtin(builtin_pair):
    builtin, ours, _ = builtin_pair
    ids = torch.randint(1, 97, (2, 9))
    mask = torch.ones_like(ids)
    expected = builtin.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False)
    actual = ours.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False)
    assert torch.equal(actual, expected)


def test_left_padded_generation_matches_builtin(builtin_pair):
    builtin, ours, _ = builtin_pair
    ids = torch.randint(1, 97, (2, 8))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    ids[0, :3] = 0
    expected = builtin.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    actual = ours.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    assert torch.equal(actual, expected)


# ---- scan paths ------------------------------------------------------------------------------


@pytest.mark.parametrize("seqlen", [1, 7, 64, 129])
def test_torch_path_matches_reference_logits_and_gradients(tiny_kwargs, seqlen, monkeypatch):
    model = MambaForCausalLM(MambaConfig(**tiny_kwargs))
    ids = torch.randint(0, 97, (2, seqlen))
    results = {}
    for backend in ("reference", "torch"):
        monkeypatch.setenv("HF_MAMBA_BACKEND", backend)
        model.zero_grad()
        out = model(ids, labels=ids if seqlen > 1 else None, use_cache=False)
        (out.loss if out.loss is not None else out.logits.sum()).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results[backend] = (out.logits.detach(), grads)
    ref_logits, ref_grads = results["reference"]
    logits, grads = results["torch"]
    assert max_rel_diff(logits, ref_logits) < LOGITS_RTOL
    assert grads.keys() == ref_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_config_scan_backend_is_used(tiny_kwargs, monkeypatch):
    monkeypatch.delenv("HF_MAMBA_BACKEND", raising=False)
    calls = []
    original = hf_mamba.block.selective_scan

    def spy(*args, backend=None, **kwargs):
        calls.append(backend)
        return original(*args, backend=backend, **kwargs)

    monkeypatch.setattr(hf_mamba.block, "selective_scan", spy)
    model = MambaForCausalLM(MambaConfig(scan_backend="reference", **tiny_kwargs))
    model(torch.randint(0, 97, (1, 5)))
    monkeypatch.setenv("HF_MAMBA_BACKEND", "torch")
    model(torch.randint(0, 97, (1, 5)))
    assert calls == ["reference"] * 2 + ["torch"] * 2


def test_gradients_match_finite_differences(tiny_kwargs, monkeypatch):
    """Autograd through the model (torch path) against central differences in float64."""
    monkeypatch.setenv("HF_MAMBA_BACKEND", "torch")
    model = MambaForCausalLM(MambaConfig(**{**tiny_kwargs, "num_hidden_layers": 1})).double()
    ids = torch.randint(0, 97, (1, 6))

    def loss_fn():  # in float64 (Transformers' loss upcasts to fp32 only)
        return torch.nn.functional.cross_entropy(model(ids).logits[0, :-1], ids[0, 1:])

    loss_fn().backward()
    for name in ("backbone.layers.0.mixer.A_log", "backbone.layers.0.mixer.dt_proj.bias", "backbone.layers.0.mixer.D"):
        param = dict(model.named_parameters())[name]
        # The entry with the largest gradient: some entries' gradients (~1e-10) are below what central
        # differences resolve (rounding ~1e-16 x loss / eps ~ 5e-12), which made the check depend on the build.
        index = tuple(int(i) for i in torch.unravel_index(param.grad.abs().argmax(), param.shape))
        eps = 1e-4  # float64: truncation error ~eps^2, rounding ~1e-16 / eps
        with torch.no_grad():
            param[index] += eps
            plus = loss_fn().item()
            param[index] -= 2 * eps
            minus = loss_fn().item()
            param[index] += eps
        numeric = (plus - minus) / (2 * eps)
        # abs: a few times the differences' rounding (1e-16 x loss ~5 / eps)
        assert param.grad[index].item() == pytest.approx(numeric, rel=1e-6, abs=2e-11), name


# ---- cache and generation --------------------------------------------------------------------


def test_step_by_step_decoding_equals_full_forward(model):
    ids = torch.randint(0, 97, (2, 11))
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        out = model(ids[:, :4], use_cache=True)
        cache = out.cache_params
        assert isinstance(cache, MambaCache)
        steps = [out.logits]
        for t in range(4, 11):
            out = model(ids[:, t : t + 1], cache_params=cache, use_cache=True)
            steps.append(out.logits)
    assert cache.seqlen_offset == 11
    assert max_rel_diff(torch.cat(steps, dim=1), full) < LOGITS_RTOL


def test_chunked_prefill_continues_exactly(model):
    """Several new tokens on top of an existing cache (chunked prefill, continuing a conversation)."""
    ids = torch.randint(0, 97, (2, 30))
    with torch.no_grad():
        full = model(ids, use_cache=True)
        cache = MambaCache(model.config, batch_size=2)
        chunks = [model(ids[:, a:b], cache_params=cache, use_cache=True).logits for a, b in [(0, 7), (7, 8), (8, 30)]]
    assert max_rel_diff(torch.cat(chunks, dim=1), full.logits) < LOGITS_RTOL
    for mine, theirs in zip(
        cache.ssm_states + cache.conv_states, full.cache_params.ssm_states + full.cache_params.conv_states, strict=True
    ):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-6)


def test_cached_greedy_equals_recomputing_every_step(model):
    ids = torch.randint(1, 97, (2, 6))
    cached = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False)
    seq = ids
    with torch.no_grad():
        for _ in range(10):
            next_token = model(seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, next_token], dim=1)
    assert torch.equal(cached, seq)


def test_generate_uses_our_cache_with_one_token_per_step(model, monkeypatch):
    seen = []
    original = MambaForCausalLM.forward

    @functools.wraps(original)  # generate() reads the forward's signature (position_ids, logits_to_keep)
    def spy(self, *args, **kwargs):
        seen.append((type(kwargs.get(CACHE_FIELD)).__name__, kwargs["input_ids"].shape[1]))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(MambaForCausalLM, "forward", spy)
    ids = torch.randint(1, 97, (2, 9))
    model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False)
    assert seen == [("NoneType", 9)] + [("MambaCache", 1)] * 3


def test_cache_argument_under_either_name(model):
    """`cache_params` and Transformers 5.24's `cache` are one argument; outputs name it as the release does."""
    ids = torch.randint(1, 97, (2, 9))
    with torch.no_grad():
        out = model(ids[:, :5], use_cache=True)
        cache = out[CACHE_FIELD]
        assert isinstance(cache, MambaCache)
        states = cache.ssm_states + cache.conv_states
        saved = [state.clone() for state in states]
        by_old_name = model(ids[:, 5:], cache_params=cache, use_cache=True).logits
        for state, old in zip(states, saved, strict=True):
            state.copy_(old)
        cache.seqlen_offset = 5
        by_new_name = model(ids[:, 5:], cache=cache, use_cache=True).logits
        assert torch.equal(by_old_name, by_new_name)
        other = MambaCache(model.config, batch_size=2)
        with pytest.raises(ValueError, match="Both `cache_params` and `cache` are set"):
            model(ids[:, 5:], cache_params=cache, cache=other)
        with pytest.raises(ValueError, match="Both `cache_params` and `cache` are set"):
            model.backbone(ids[:, 5:], cache_params=cache, cache=other)


def test_generate_continues_from_a_user_cache(model):
    ids = torch.randint(1, 97, (1, 12))
    with torch.no_grad():
        cache = model(ids[:, :8], use_cache=True).cache
    continued = model.generate(ids, cache=cache, max_new_tokens=5, do_sample=False)
    fresh = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert torch.equal(continued, fresh)


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_gives_same_result_as_unpadded_rows(model, side):
    lengths = [9, 5]
    width = max(lengths)
    rows = [torch.randint(1, 97, (n,)) for n in lengths]
    ids = torch.zeros(2, width, dtype=torch.long)
    mask = torch.zeros(2, width, dtype=torch.long)
    for i, row in enumerate(rows):
        span = slice(width - len(row), width) if side == "left" else slice(0, len(row))
        ids[i, span], mask[i, span] = row, 1
    with torch.no_grad():
        padded = model(ids, attention_mask=mask, use_cache=True)
        for i, row in enumerate(rows):
            single = model(row[None], use_cache=True)
            span = slice(width - len(row), width) if side == "left" else slice(0, len(row))
            assert max_rel_diff(padded.logits[i, span], single.logits[0]) < LOGITS_RTOL
            torch.testing.assert_close(
                padded.cache_params.ssm_states[-1][i], single.cache_params.ssm_states[-1][0], rtol=1e-5, atol=1e-6
            )


def test_padding_is_respected_in_training_loss(model):
    row = torch.randint(1, 97, (6,))
    ids = torch.cat([torch.zeros(3, dtype=torch.long), row])[None]
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1, 1]])
    labels = ids.masked_fill(mask == 0, -100)
    labels[0, 3] = -100  # the first real token has no prediction in the unpadded row either
    model.train()
    padded = model(ids, attention_mask=mask, labels=labels).loss
    single = model(row[None], labels=row[None]).loss
    torch.testing.assert_close(padded, single, rtol=1e-5, atol=1e-6)


def test_left_padded_batch_generation_equals_single_rows(model):
    rows = [torch.randint(1, 97, (7,)), torch.randint(1, 97, (4,))]
    ids = torch.zeros(2, 7, dtype=torch.long)
    mask = torch.zeros(2, 7, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, 7 - len(row) :], mask[i, 7 - len(row) :] = row, 1
    batched = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    for i, row in enumerate(rows):
        single = model.generate(row[None], max_new_tokens=6, do_sample=False)
        assert torch.equal(batched[i, 7:], single[0, len(row) :])


def test_beam_search_matches_builtin(builtin_pair):
    builtin, ours, _ = builtin_pair
    ids = torch.randint(1, 97, (2, 5))
    mask = torch.ones_like(ids)
    kwargs = dict(attention_mask=mask, max_new_tokens=6, num_beams=3, do_sample=False, num_return_sequences=2)
    assert torch.equal(ours.generate(ids, **kwargs), builtin.generate(ids, **kwargs))


def test_sampling_runs_and_is_reproducible(model):
    ids = torch.randint(1, 97, (2, 5))
    torch.manual_seed(1)
    a = model.generate(ids, max_new_tokens=5, do_sample=True, top_k=20)
    torch.manual_seed(1)
    b = model.generate(ids, max_new_tokens=5, do_sample=True, top_k=20)
    assert a.shape == (2, 10) and torch.equal(a, b)


def test_cache_reorder_and_reset(model):
    cache = MambaCache(model.config, batch_size=3)
    for i, state in enumerate(cache.ssm_states):
        state.copy_(torch.arange(3.0)[:, None, None] + i)
    cache.reorder_cache(torch.tensor([2, 2, 0]))
    assert cache.ssm_states[0][:, 0, 0].tolist() == [2.0, 2.0, 0.0]
    cache.seqlen_offset = 5
    cache.reset()
    assert cache.seqlen_offset == 0 and all(not s.any() for s in cache.ssm_states)


# ---- decode graphs kept across generate() calls (on CPU, a fake graph) --------------------------


class FakeGraph:
    """Stands in for DecodeGraph on CPU: replays the decode step on the tensors it was captured on, as a
    CUDA graph does, so a cache decoding with another cache's graph gives wrong tokens."""

    def __init__(self, step, cache, input_ids, kind=None):
        self.step, self.kind = step, kind
        # Weak references: a CUDA graph holds none to the tensors it reads, and the pool counts references.
        self.captured_on = [weakref.ref(state) for state in cache.conv_states + cache.ssm_states]
        self.states_ptr = cache.ssm_states[0].data_ptr()
        self.layers = len(cache.conv_states)

    def prefill(self, input_ids, attention_mask):
        states = [ref() for ref in self.captured_on]
        conv, ssm = states[: self.layers], states[self.layers :]
        captured = SimpleNamespace(conv_states=conv, ssm_states=ssm, seqlen_offset=0, place_layer=lambda *_: None,
                                   update_conv_state=lambda state, i: conv[i].copy_(state),
                                   update_recurrent_state=lambda state, i: ssm[i].copy_(state))
        return self.step(input_ids, attention_mask, captured)

    def _captured(self):
        states = [ref() for ref in self.captured_on]
        conv, ssm = states[: self.layers], states[self.layers :]
        # What the step reads of a cache; a replay runs no Python, so placing layers is a no-op.
        return SimpleNamespace(conv_states=conv, ssm_states=ssm, seqlen_offset=1, place_layer=lambda *_: None)

    def __call__(self, input_ids):
        return self.step(input_ids, self._captured())

    def start(self, input_ids, unfinished):
        self.ids, self.unfinished = input_ids.clone(), unfinished.clone()

    def run_steps(self, steps, suppressed):
        eos, pad = torch.tensor(self.kind.eos, dtype=torch.long), torch.tensor(self.kind.pad)
        outs = [
            select_step(self.step, self._captured(), self.ids, self.unfinished, suppressed, self.kind, eos, pad)
            for _ in range(steps)
        ]
        return torch.stack(outs, 2)


@pytest.fixture
def graphs(monkeypatch):
    """Forces the graph path on CPU with FakeGraph. `captured`: every graph made; `steps`: per forward, the
    cache's graph and the ids of its state tensors (not the cache or the tensors, which must be free to go)."""
    record = SimpleNamespace(captured=[], steps=[])

    class Recording(FakeGraph):
        def __init__(self, *args):
            super().__init__(*args)
            record.captured.append(self)

    original = MambaForCausalLM.forward

    @functools.wraps(original)  # generate() reads the forward's signature (position_ids, logits_to_keep)
    def spy(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        cache = out[CACHE_FIELD]
        graph = self._decode_graphs.graph_of(cache)
        record.steps.append((graph, [id(state) for state in cache.conv_states + cache.ssm_states]))
        return out

    monkeypatch.setattr(DecodeGraphs, "graph_class", Recording)
    monkeypatch.setattr(MambaForCausalLM, "_cuda_graphs_on", lambda self, device: self.config.use_cuda_graph)
    monkeypatch.setattr(MambaForCausalLM, "forward", spy)
    # These tests are about the forward's replays, one per token: greedy chunks (tested below) replay no forward.
    monkeypatch.setattr(MambaForCausalLM, "decode_chunk_size", 1)
    monkeypatch.setattr(MambaForCausalLM, "PREFILL_GRAPH_MAX", 0)  # prefill graphs: tested on their own
    return record


def greedy(model, ids, **kwargs):
    return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False, **kwargs)


def eager_greedy(model, ids):
    model.config.use_cuda_graph = False
    try:
        return greedy(model, ids)
    finally:
        model.config.use_cuda_graph = True


def test_generate_walks_the_module_tree_once_per_call(model, graphs, monkeypatch):
    """The decode graphs' checks in one generate() (the prompt's prefill graph, the new cache, the selecting
    step's graph) share one walk of the module tree; the next call walks again and sees what changed between."""
    monkeypatch.setattr(MambaForCausalLM, "decode_chunk_size", 16)
    monkeypatch.setattr(MambaForCausalLM, "PREFILL_GRAPH_MAX", 2048)
    walks = []
    real_walk = MambaForCausalLM._modules_and_weights
    monkeypatch.setattr(MambaForCausalLM, "_modules_and_weights", lambda self: walks.append(1) or real_walk(self))
    ids = torch.randint(1, 97, (2, 6))
    expected = eager_greedy(model, ids)
    walks.clear()
    assert torch.equal(greedy(model, ids), expected)
    kinds = [type(graph.kind).__name__ for graph in graphs.captured]
    assert kinds == ["Prefill", "SelectStep"] and len(walks) == 1
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())  # moved: graphs read old memory
    assert torch.equal(greedy(model, ids), expected)
    assert len(walks) == 2 and len(graphs.captured) == 4  # both captured again
    assert "_tree_walk_memo" not in model.__dict__


def test_the_fingerprints_walk_takes_every_module_in_modules_order(model):
    walked = list(model._modules_and_weights())
    assert [module for module, _ in walked] == list(model.modules())
    for module, own in walked:
        assert own == [*module.parameters(recurse=False), *module.buffers(recurse=False)]


class Wrapped(nn.Module):
    """A module from outside torch.nn, Transformers and hf_mamba: one the decode graphs' fingerprint cannot see."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x)


def test_an_eager_forward_builds_no_fingerprint(model, graphs, monkeypatch):
    """Outside generate() a forward making a new cache takes it from the graphs' pool after asking only whether the
    fingerprint sees every module: it builds no fingerprint, and a module the fingerprint cannot see ends that walk."""
    walks, pooled = [], []
    real_walk, real_new_cache = MambaForCausalLM._tree_walk, DecodeGraphs.new_cache
    monkeypatch.setattr(MambaForCausalLM, "_tree_walk", lambda self: walks.append(1) or real_walk(self))
    monkeypatch.setattr(DecodeGraphs, "new_cache", lambda self, *a: pooled.append(1) or real_new_cache(self, *a))
    ids = torch.randint(1, 97, (2, 6))
    with torch.no_grad():
        model(ids, use_cache=True)
        assert walks == [] and pooled == [1]
        seen = []
        real_sees = modeling_mamba._fingerprint_sees
        monkeypatch.setattr(modeling_mamba, "_fingerprint_sees", lambda m, own: seen.append(m) or real_sees(m, own))
        model.backbone.layers[0].mixer.in_proj = Wrapped(model.backbone.layers[0].mixer.in_proj)
        model(ids, use_cache=True)
    assert walks == [] and pooled == [1] and isinstance(seen[-1], Wrapped)


def test_second_generate_replays_the_first_graph_on_the_same_states(model, graphs):
    prompts = [torch.randint(1, 97, (2, 6)) for _ in range(2)]
    eager = [eager_greedy(model, ids) for ids in prompts]
    graphs.steps.clear()
    for ids, expected in zip(prompts, eager, strict=True):
        assert torch.equal(greedy(model, ids), expected)
    assert len(graphs.captured) == 1
    assert len(graphs.steps) == 2 * 4  # per generate(): the prefill and three decode steps
    assert [graph for graph, _ in graphs.steps] == [None, *graphs.captured * 3] * 2
    first_states = graphs.steps[0][1]
    for _, states in graphs.steps:
        assert states == first_states


def test_a_cache_still_held_is_never_adopted(model, graphs):
    prompts = [torch.randint(1, 97, (2, 6)) for _ in range(2)]
    eager = [eager_greedy(model, ids) for ids in prompts]
    held = greedy(model, prompts[0], return_dict_in_generate=True)
    cache = held["cache"] if "cache" in held else held["past_key_values"]
    kept = [state.clone() for state in cache.conv_states + cache.ssm_states]
    graphs.steps.clear()
    assert torch.equal(greedy(model, prompts[1]), eager[1])
    assert torch.equal(held.sequences, eager[0])
    assert len(graphs.captured) == 2 and model._decode_graphs.graph_of(cache) is graphs.captured[0]
    held_states = cache.conv_states + cache.ssm_states
    assert not {id(state) for state in held_states} & {i for _, states in graphs.steps for i in states}
    for state, old in zip(held_states, kept, strict=True):
        assert torch.equal(state, old)


@pytest.mark.parametrize("keep", ["tensor", "view", "list"])
def test_states_kept_beyond_their_cache_are_never_overwritten(model, graphs, keep):
    prompts = [torch.randint(1, 97, (2, 6)) for _ in range(2)]
    eager = eager_greedy(model, prompts[1])
    held = greedy(model, prompts[0], return_dict_in_generate=True)
    cache = held["cache"] if "cache" in held else held["past_key_values"]
    kept = {"tensor": cache.ssm_states[1], "view": cache.conv_states[0][1:], "list": cache.ssm_states}[keep]
    expected = [t.clone() for t in kept] if keep == "list" else kept.clone()
    del cache, held
    graphs.steps.clear()
    assert torch.equal(greedy(model, prompts[1]), eager)
    assert len(graphs.captured) == 2  # fresh states, so a graph of their own
    if keep == "list":
        assert all(torch.equal(t, e) for t, e in zip(kept, expected, strict=True))
    else:
        assert torch.equal(kept, expected)


def hook_in_proj(model):
    model.backbone.layers[0].mixer.in_proj.register_forward_hook(lambda *args: None)


def assign_copies(model):
    model.load_state_dict({name: t.clone() for name, t in model.state_dict().items()}, assign=True)


@pytest.mark.parametrize(
    "change",
    [hook_in_proj, assign_copies, lambda model: model.to(torch.float64)],
    ids=["forward-hook", "load_state_dict-assign", "to-float64"],
)
def test_a_changed_model_gets_a_new_graph(model, graphs, change):
    ids = torch.randint(1, 97, (2, 6))
    greedy(model, ids)
    change(model)
    assert torch.equal(greedy(model, ids), eager_greedy(model, ids))
    assert len(graphs.captured) == 2
    assert model._decode_graphs.entries[-1].graph is graphs.captured[1]
    assert graphs.captured[1].captured_on[0]().dtype == model.backbone.embeddings.weight.dtype


def test_inference_mode_states_stay_in_inference_mode(model, graphs):
    """States made under inference_mode are inference tensors, which only inference_mode may update."""
    ids = torch.randint(1, 97, (2, 6))
    with torch.inference_mode():
        greedy(model, ids)
    assert torch.equal(greedy(model, ids), eager_greedy(model, ids))
    assert len(graphs.captured) == 2


def test_each_batch_size_has_its_entry_and_the_pool_stays_bounded(model, graphs):
    pool = model._decode_graphs
    sizes = list(range(1, pool.MAX_ENTRIES + 2))
    for batch in sizes:
        greedy(model, torch.randint(1, 97, (batch, 6)))
    assert len(graphs.captured) == len(sizes)
    assert [entry.key[0] for entry in pool.entries] == sizes[-pool.MAX_ENTRIES :]
    greedy(model, torch.randint(1, 97, (sizes[-1], 6)))  # kept: replayed
    assert len(graphs.captured) == len(sizes)
    greedy(model, torch.randint(1, 97, (sizes[0], 6)))  # evicted: captured again
    assert len(graphs.captured) == len(sizes) + 1


def test_a_users_cache_gets_a_graph_of_its_own(model, graphs):
    ids = torch.randint(1, 97, (2, 6))
    greedy(model, ids)
    cache = MambaCache(model.config, batch_size=2)
    assert torch.equal(greedy(model, ids, **{CACHE_FIELD: cache}), eager_greedy(model, ids))
    assert len(graphs.captured) == 2 and model._decode_graphs.graph_of(cache) is graphs.captured[1]
    assert [entry.graph for entry in model._decode_graphs.entries] == graphs.captured[:1]


def test_wrapped_modules_get_no_pooled_graph(model, graphs):
    """LoRA keeps Python state (merged, adapters disabled) that a replayed graph would bake in."""
    from peft import LoraConfig, get_peft_model

    lora = get_peft_model(model, LoraConfig(r=2, target_modules=["x_proj"], init_lora_weights=False))
    ids = torch.randint(1, 97, (2, 6))
    for _ in range(2):
        greedy(lora, ids)
    assert len(graphs.captured) == 2 and model._decode_graphs.entries == []


@pytest.mark.parametrize("bad", [97, -1], ids=["too-large", "negative"])
def test_a_replayed_decode_step_still_refuses_ids_outside_the_vocabulary(model, graphs, bad):
    """The replayed step checks its ids after launching the replay (no wait for the GPU before it), with the
    forward's error; the step reads them clamped, so the embedding never reads out of bounds."""
    with torch.no_grad():
        cache = model(torch.randint(1, 97, (2, 6)), use_cache=True)[CACHE_FIELD]
        model(torch.tensor([[3], [4]]), **{CACHE_FIELD: cache})
        message = rf"input_ids must lie in \[0, vocab_size=97\), found {bad} \(this decode step already ran"
        with pytest.raises(ValueError, match=message):
            model(torch.tensor([[5], [bad]]), **{CACHE_FIELD: cache})
    assert len(graphs.captured) == 1 and model._decode_graphs.graph_of(cache) is graphs.captured[0]
    assert cache.seqlen_offset == 7


def test_a_replayed_decode_step_of_an_empty_batch(model, graphs):
    with torch.no_grad():
        cache = model(torch.zeros(0, 5, dtype=torch.long), use_cache=True)[CACHE_FIELD]
        step = model(torch.zeros(0, 1, dtype=torch.long), **{CACHE_FIELD: cache})
    assert step.logits.shape == (0, 1, 97) and model._decode_graphs.graph_of(cache) is graphs.captured[0]


def test_a_copied_model_starts_with_no_graphs(model, graphs):
    greedy(model, torch.randint(1, 97, (2, 6)))
    assert len(copy.deepcopy(model)._decode_graphs.entries) == 0
    assert len(model._decode_graphs.entries) == 1


# ---- greedy generate() in graph chunks (on CPU, the fake graph) --------------------------------


@pytest.fixture
def lively(tiny_kwargs):
    """A tiny model whose greedy tokens vary for tens of steps (the tied one repeats its last prompt token)."""
    torch.manual_seed(0)
    model = MambaForCausalLM(MambaConfig(**tiny_kwargs, tie_word_embeddings=False)).eval()
    nn.init.normal_(model.lm_head.weight, std=1.0)
    nn.init.normal_(model.backbone.embeddings.weight, std=1.0)
    return model


@pytest.fixture
def chunked(graphs, monkeypatch):
    """Greedy decoding in chunks of up to 16 tokens; `graphs.captured` records each graph, `chunked_runs`
    whether each generate() with graphs took the chunked loop."""
    monkeypatch.setattr(MambaForCausalLM, "decode_chunk_size", 16)
    runs = []
    original = MambaForCausalLM._sample

    def spy(self, *args, **kwargs):
        if self.config.use_cuda_graph:  # not the reference runs without graphs
            runs.append(greedy_decode_plan(self, *args, **kwargs) is not None)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(MambaForCausalLM, "_sample", spy)
    graphs.chunked_runs = runs
    return graphs


def greedy_decode_plan(model, input_ids, logits_processor, stopping_criteria, generation_config, synced_gpus=False,
                       streamer=None, **model_kwargs):
    from hf_mamba.graph_decode import decode_plan

    args = (logits_processor, stopping_criteria, generation_config, synced_gpus, model_kwargs)
    return decode_plan(model, input_ids, *args)


def both_ways(model, ids, **kwargs):
    """generate(**kwargs) through the chunked loop and through Transformers' loop without graphs."""
    chunked = model.generate(ids, do_sample=False, **kwargs)
    model.config.use_cuda_graph = False
    try:
        eager = model.generate(ids, do_sample=False, **kwargs)
    finally:
        model.config.use_cuda_graph = True
    return chunked, eager


def eos_seen_at(model, ids, step):
    """(token, s): the first token row 0 generates without EOS at a step s >= `step` that it did not generate
    before; as EOS, it stops that row at step s."""
    _, free = both_ways(model, ids, attention_mask=torch.ones_like(ids), max_new_tokens=40, eos_token_id=None)
    new = free[0, ids.shape[1] :].tolist()
    s = next(s for s in range(step, len(new)) if new[s] not in new[:s])
    return new[s], s


@pytest.mark.parametrize("new_tokens", [1, 2, 21, 40])
def test_greedy_chunks_give_transformers_tokens(lively, chunked, new_tokens):
    ids = torch.randint(1, 97, (3, 7))
    mask = torch.ones_like(ids)
    out, eager = both_ways(lively, ids, attention_mask=mask, max_new_tokens=new_tokens, eos_token_id=None)
    assert torch.equal(out, eager) and out.shape == (3, 7 + new_tokens)
    assert chunked.chunked_runs == [True]
    # The first token comes from the prefill, the others from one greedy-step graph.
    assert [type(graph.kind) for graph in chunked.captured] == ([SelectStep] if new_tokens > 1 else [])


def test_greedy_chunks_stop_each_row_at_eos_and_pad_it(lively, chunked):
    torch.manual_seed(0)
    ids = torch.randint(1, 97, (3, 7))
    eos, at = eos_seen_at(lively, ids, 5)
    chunked.chunked_runs.clear()
    out, eager = both_ways(lively, ids, attention_mask=torch.ones_like(ids), max_new_tokens=30, eos_token_id=eos,
                           pad_token_id=96)
    assert torch.equal(out, eager) and chunked.chunked_runs == [True]
    assert out[0, 7 + at] == eos and (out[0, 7 + at + 1 :] == 96).all()


def test_greedy_chunks_stop_when_every_row_is_done(lively, chunked):
    ids = torch.randint(1, 97, (1, 7))
    eos, at = eos_seen_at(lively, ids, 9)
    chunked.chunked_runs.clear()
    out, eager = both_ways(lively, ids, attention_mask=torch.ones_like(ids), max_new_tokens=40, eos_token_id=eos)
    assert torch.equal(out, eager) and out.shape == (1, 7 + at + 1) and chunked.chunked_runs == [True]


@pytest.mark.parametrize("minimum", [dict(min_new_tokens=12), dict(min_length=7 + 9)])
def test_greedy_chunks_hold_eos_back_until_min_new_tokens(lively, chunked, minimum):
    ids = torch.randint(1, 97, (2, 7))
    eos, at = eos_seen_at(lively, ids, 2)
    chunked.chunked_runs.clear()
    out, eager = both_ways(lively, ids, attention_mask=torch.ones_like(ids), max_new_tokens=30, eos_token_id=eos,
                           **minimum)
    assert torch.equal(out, eager) and chunked.chunked_runs == [True]
    assert at < 9 and out.shape[1] > 7 + at + 1  # the EOS was suppressed


def test_greedy_chunks_with_left_padding_and_a_streamer(lively, chunked):
    ids = torch.randint(1, 97, (2, 7))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    streamed = {}
    for name in ("chunked", "eager"):
        class Collect:
            def __init__(self):
                self.puts, self.ended = [], False

            def put(self, value):
                self.puts.append(value.clone())

            def end(self):
                self.ended = True

        streamed[name] = Collect()
    out = lively.generate(ids, attention_mask=mask, max_new_tokens=22, do_sample=False, eos_token_id=None,
                         streamer=streamed["chunked"])
    lively.config.use_cuda_graph = False
    eager = lively.generate(ids, attention_mask=mask, max_new_tokens=22, do_sample=False, eos_token_id=None,
                           streamer=streamed["eager"])
    lively.config.use_cuda_graph = True
    assert torch.equal(out, eager) and chunked.chunked_runs == [True]
    chunked_puts, eager_puts = streamed["chunked"].puts, streamed["eager"].puts
    assert len(chunked_puts) == len(eager_puts) == 23  # the prompt, then each new token
    assert all(torch.equal(a, b) for a, b in zip(chunked_puts, eager_puts, strict=True))
    assert streamed["chunked"].ended


def test_greedy_chunks_from_inputs_embeds(lively, chunked):
    ids = torch.randint(1, 97, (2, 7))
    embeds = lively.get_input_embeddings()(ids)
    out, eager = both_ways(lively, None, inputs_embeds=embeds, max_new_tokens=20, eos_token_id=None)
    assert torch.equal(out, eager) and out.shape == (2, 20) and chunked.chunked_runs == [True]


def test_greedy_chunks_return_the_cache_transformers_leaves(lively, chunked):
    ids = torch.randint(1, 97, (2, 7))
    out, eager = both_ways(lively, ids, attention_mask=torch.ones_like(ids), max_new_tokens=19, eos_token_id=None,
                           return_dict_in_generate=True)
    assert torch.equal(out.sequences, eager.sequences) and chunked.chunked_runs == [True]
    mine, theirs = out[CACHE_FIELD] if CACHE_FIELD in out else out["past_key_values"], None
    theirs = eager[CACHE_FIELD] if CACHE_FIELD in eager else eager["past_key_values"]
    assert mine.seqlen_offset == theirs.seqlen_offset == 7 + 18
    for a, b in zip(mine.conv_states + mine.ssm_states, theirs.conv_states + theirs.ssm_states, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(repetition_penalty=1.3),
        dict(return_dict_in_generate=True, output_scores=True),
        dict(return_dict_in_generate=True),  # EOS could stop it early and the cache is returned
        dict(max_time=30.0),
    ],
    ids=["another-processor", "scores", "returned-cache-with-eos", "another-criterion"],
)
def test_greedy_chunks_leave_the_rest_to_transformers_loop(lively, chunked, kwargs):
    ids = torch.randint(1, 97, (2, 7))
    torch.manual_seed(0)
    out = lively.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, **kwargs)
    assert chunked.chunked_runs == [False]
    assert not any(isinstance(graph.kind, SelectStep) for graph in chunked.captured)
    if not kwargs.get("do_sample"):
        lively.config.use_cuda_graph = False
        eager = lively.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, **kwargs)
        lively.config.use_cuda_graph = True
        if hasattr(out, "sequences"):
            out, eager = out.sequences, eager.sequences
        assert torch.equal(out, eager)


@pytest.mark.parametrize(
    "kwargs",
    [dict(top_k=5), dict(top_k=0, top_p=0.8, temperature=0.7), dict(top_k=20, min_p=0.1), dict(min_new_tokens=10)],
    ids=["top-k", "top-p-temperature", "min-p", "min-new-tokens"],
)
def test_sampled_chunks_draw_what_transformers_loop_draws_with_the_same_seed(lively, chunked, kwargs):
    """The chunk draws each token with the same ops in the same order as Transformers' loop (processors,
    softmax, torch.multinomial), so on CPU the same seed gives the same tokens (CUDA: tests/test_model_triton.py)."""
    ids = torch.randint(1, 97, (3, 7))
    eos = int(ids[0, 0])
    runs = []
    for graphs_on in (True, False):
        lively.config.use_cuda_graph = graphs_on
        torch.manual_seed(5)
        runs.append(lively.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=30, do_sample=True,
                                    eos_token_id=eos, **kwargs))
    lively.config.use_cuda_graph = True
    assert torch.equal(runs[0], runs[1]) and chunked.chunked_runs == [True]
    assert len({tuple(row) for row in runs[0][:, 7:].tolist()}) == 3  # the rows drew different tokens


def test_greedy_chunks_leave_a_passed_cache_and_wrapped_models_to_transformers_loop(lively, chunked):
    """A cache passed in has no pooled graphs (each call would capture the chunks afresh), nor does LoRA."""
    from peft import LoraConfig, get_peft_model

    ids = torch.randint(1, 97, (2, 7))
    with torch.no_grad():
        cache = lively(ids[:, :-1], use_cache=True)[CACHE_FIELD]
    out = lively.generate(ids, **{CACHE_FIELD: cache}, max_new_tokens=6, do_sample=False, eos_token_id=None)
    lora = get_peft_model(lively, LoraConfig(r=2, target_modules=["x_proj"], init_lora_weights=False))
    lora.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False)
    assert out.shape == (2, 13) and chunked.chunked_runs == [False, False]


def test_a_chunk_size_of_one_is_transformers_loop(lively, chunked):
    lively.decode_chunk_size = 1
    ids = torch.randint(1, 97, (2, 7))
    out, eager = both_ways(lively, ids, attention_mask=torch.ones_like(ids), max_new_tokens=6)
    assert torch.equal(out, eager) and chunked.chunked_runs == [False]


@pytest.mark.parametrize("bad", [0, -4, 2.5, True])
def test_a_bad_decode_chunk_size_is_refused_by_name(lively, chunked, bad):
    lively.decode_chunk_size = bad
    ids = torch.randint(1, 97, (1, 5))
    with pytest.raises(ValueError, match=r"decode_chunk_size must be a positive integer"):
        lively.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False)


def test_greedy_chunk_graphs_are_kept_across_generate_calls(lively, chunked):
    for _ in range(3):
        ids = torch.randint(1, 97, (2, 7))
        out, eager = both_ways(lively, ids, attention_mask=torch.ones_like(ids), max_new_tokens=22, eos_token_id=None)
        assert torch.equal(out, eager)
    assert [type(graph.kind) for graph in chunked.captured] == [SelectStep]



def test_sampling_graphs_per_entry_are_capped_oldest_first(lively, chunked, monkeypatch):
    """A sweep over temperatures captures a graph per setting; an entry keeps the newest few."""
    monkeypatch.setattr(DecodeGraphs, "MAX_GRAPHS_PER_ENTRY", 3)
    ids = torch.randint(1, 97, (2, 7))
    for temperature in (0.5, 0.6, 0.7, 0.8, 0.9):
        lively.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=True,
                        temperature=temperature, eos_token_id=None)
    kinds = [kind for kind in lively._decode_graphs.entries[-1].graphs if kind is not None]
    settings = [dict(key[1]) for kind in kinds for key in kind.warper_key]
    temperatures = [setting["temperature"] for setting in settings if "temperature" in setting]
    assert len(chunked.captured) == 5 and temperatures == [0.7, 0.8, 0.9]


def test_a_warper_whose_settings_are_not_numbers_is_left_to_transformers_loop():
    from transformers.generation.logits_process import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper

    from hf_mamba.graph_decode import _processors

    plain = LogitsProcessorList([TopKLogitsWarper(5), TemperatureLogitsWarper(0.7)])
    assert _processors(plain) == ([], list(plain))
    odd = TopKLogitsWarper(5)
    odd.top_k = torch.tensor(5)  # a graph keyed by it could not tell two settings apart
    assert _processors(LogitsProcessorList([odd])) is None

# ---- first generate(): its kernels compiled ahead, side by side (on CPU, the dry pass run for real) ----


def test_first_generate_of_a_kind_compiles_its_prefill_and_step_ahead(lively, graphs, monkeypatch):
    """The dry pass runs once per (device, dtype, batch), on a scratch cache (never the decode-graph pool's),
    and leaves the tokens as they were."""
    from hf_mamba import modeling_mamba

    passes = []

    def run_dry_pass(fn, *args):  # on CUDA, compile_ahead runs fn with every launch compiling only
        pool = list(lively._decode_graphs.entries)
        with torch.no_grad():
            fn(*args)
        passes.append(lively._decode_graphs.entries == pool)  # the pool untouched
        return True

    ids = torch.randint(1, 97, (2, 7))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    expected = lively.generate(ids, attention_mask=mask, max_new_tokens=9, do_sample=False)
    monkeypatch.setattr(MambaForCausalLM, "_compiles_ahead_on", staticmethod(lambda device: True))
    monkeypatch.setattr(modeling_mamba, "compile_ahead", run_dry_pass)
    for _ in range(2):
        assert torch.equal(lively.generate(ids, attention_mask=mask, max_new_tokens=9, do_sample=False), expected)
    lively.generate(ids[:1], attention_mask=mask[:1], max_new_tokens=3, do_sample=False)  # another batch size
    assert passes == [True, True]


# ---- a new sequence's prefill replayed as a graph of its bucket length (on CPU, the fake graph) ----------


@pytest.fixture
def prefill_graphs(graphs, monkeypatch):
    monkeypatch.setattr(MambaForCausalLM, "PREFILL_GRAPH_MAX", 2048)
    return graphs


def test_prefill_graph_gives_the_forwards_logits_and_states(lively, prefill_graphs):
    ids = torch.randint(1, 97, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    with torch.no_grad():
        lively.config.use_cuda_graph = False
        expected = lively(ids, attention_mask=mask, use_cache=True, logits_to_keep=1)
        lively.config.use_cuda_graph = True
        out = lively(ids, attention_mask=mask, use_cache=True, logits_to_keep=1)
    assert [graph.kind for graph in prefill_graphs.captured] == [Prefill(64)]
    torch.testing.assert_close(out.logits, expected.logits, rtol=1e-5, atol=1e-5)
    mine, theirs = out[CACHE_FIELD], expected[CACHE_FIELD]
    assert mine.seqlen_offset == theirs.seqlen_offset == 9
    for a, b in zip(mine.conv_states + mine.ssm_states, theirs.conv_states + theirs.ssm_states, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_generate_with_prefill_graphs_keeps_the_tokens_and_one_graph_per_bucket(lively, prefill_graphs):
    for length in (5, 9, 64, 65):
        ids = torch.randint(1, 97, (2, length))
        mask = torch.ones_like(ids)
        mask[0, :2] = 0
        lively.config.use_cuda_graph = False
        expected = lively.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
        lively.config.use_cuda_graph = True
        assert torch.equal(lively.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False), expected)
    prefills = [graph.kind for graph in prefill_graphs.captured if isinstance(graph.kind, Prefill)]
    assert prefills == [Prefill(64), Prefill(128)]


@pytest.mark.parametrize(
    "kwargs",
    [dict(logits_to_keep=0), dict(output_hidden_states=True), dict(labels="ids")],
    ids=["all-logits", "hidden-states", "labels"],
)
def test_other_prefills_run_the_forward(lively, prefill_graphs, kwargs):
    ids = torch.randint(1, 97, (2, 9))
    kwargs = {k: (ids if v == "ids" else v) for k, v in kwargs.items()}
    with torch.no_grad():
        lively(ids, use_cache=True, **kwargs)
        lively(torch.randint(1, 97, (1, lively.PREFILL_GRAPH_MAX + 1)), use_cache=True, logits_to_keep=1)
        # 33 rows of the 64-token bucket: more tokens than a graph may hold activations for
        lively(torch.randint(1, 97, (33, 40)), use_cache=True, logits_to_keep=1)
    assert prefill_graphs.captured == []


def test_the_first_generate_compiles_the_prefill_graphs_path_ahead(lively, prefill_graphs, monkeypatch):
    """Where a graph will replay the prefill, the dry pass runs that path (padded to the bucket, masked: other
    kernel variants than the plain forward's), on a scratch cache; the tokens stay as they were."""
    from hf_mamba import modeling_mamba

    ids = torch.randint(1, 97, (2, 9))
    kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False)
    expected = lively.generate(ids, **kwargs)
    prefills, pools, dry = [], [], [False]
    original = MambaForCausalLM._prefill_logits

    def recording(self, input_ids, attention_mask, cache):
        prefills.append((dry[0], tuple(input_ids.shape), int(attention_mask.sum())))
        return original(self, input_ids, attention_mask, cache)

    def run_dry_pass(fn, *args):
        pool = list(lively._decode_graphs.entries)
        dry[0] = True
        with torch.no_grad():
            fn(*args)
        dry[0] = False
        pools.append(lively._decode_graphs.entries == pool)
        return True

    monkeypatch.setattr(MambaForCausalLM, "_prefill_logits", recording)
    monkeypatch.setattr(MambaForCausalLM, "_compiles_ahead_on", staticmethod(lambda device: True))
    monkeypatch.setattr(modeling_mamba, "compile_ahead", run_dry_pass)
    lively.__dict__.pop("_generate_compiled_ahead", None)
    assert torch.equal(lively.generate(ids, **kwargs), expected)
    # the dry pass, the 9 real tokens of both rows in 64 (the replay runs the step captured before the patch)
    assert prefills == [(True, (2, 64), 18)] and pools == [True]

def test_a_prefill_graph_still_refuses_ids_outside_the_vocabulary(lively, prefill_graphs):
    with torch.no_grad(), pytest.raises(ValueError, match=r"input_ids must lie in \[0, vocab_size=97\)"):
        lively(torch.tensor([[1, 2, 97]]), use_cache=True, logits_to_keep=1)


# ---- outputs and heads -----------------------------------------------------------------------


def test_logits_to_keep_inputs_embeds_hidden_states_and_tuples(model):
    ids = torch.randint(0, 97, (2, 7))
    with torch.no_grad():
        full = model(ids, output_hidden_states=True)
        last = model(ids, logits_to_keep=1)
        embeds = model(inputs_embeds=model.get_input_embeddings()(ids))
        as_tuple = model(ids, return_dict=False, use_cache=False)
    assert len(full.hidden_states) == model.config.num_hidden_layers + 1
    assert last.logits.shape == (2, 1, 97)
    torch.testing.assert_close(last.logits[:, 0], full.logits[:, -1])
    torch.testing.assert_close(embeds.logits, full.logits)
    assert isinstance(as_tuple, tuple)
    torch.testing.assert_close(as_tuple[0], full.logits)


def test_tied_lm_head(model):
    assert model.lm_head.weight.data_ptr() == model.backbone.embeddings.weight.data_ptr()


@pytest.mark.parametrize(
    "problem_type, labels",
    [
        ("regression", torch.randn(3)),
        ("single_label_classification", torch.tensor([0, 2, 1])),
        ("multi_label_classification", torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0], [1.0, 1.0, 0.0]])),
    ],
)
def test_sequence_classification_losses(tiny_kwargs, problem_type, labels):
    num_labels = 1 if problem_type == "regression" else 3
    config = MambaConfig(num_labels=num_labels, problem_type=problem_type, **tiny_kwargs)
    model = MambaForSequenceClassification(config).eval()
    ids = torch.randint(1, 97, (3, 6))
    out = model(ids, labels=labels)
    assert out.logits.shape == (3, num_labels)
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    out.loss.backward()
    assert model.score.weight.grad.abs().sum() > 0


def test_sequence_classification_pools_last_real_token(tiny_kwargs):
    model = MambaForSequenceClassification(MambaConfig(num_labels=2, **tiny_kwargs)).eval()
    row = torch.randint(1, 97, (5,))
    with torch.no_grad():
        single = model(row[None]).logits
        left = model(
            torch.cat([torch.zeros(2, dtype=torch.long), row])[None], attention_mask=torch.tensor([[0, 0] + [1] * 5])
        ).logits
        right = model(
            torch.cat([row, torch.zeros(2, dtype=torch.long)])[None], attention_mask=torch.tensor([[1] * 5 + [0, 0]])
        ).logits
    torch.testing.assert_close(left, single, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(right, single, rtol=1e-5, atol=1e-6)


# ---- save / load / Auto ----------------------------------------------------------------------


def test_save_load_round_trip_is_bit_exact_and_auto_returns_our_class(model, tmp_path):
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is MambaForCausalLM
    assert type(AutoConfig.from_pretrained(tmp_path)) is MambaConfig
    assert type(AutoModel.from_pretrained(tmp_path)) is MambaModel
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    ids = torch.randint(0, 97, (2, 8))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_auto_sequence_classification(tiny_kwargs, tmp_path):
    MambaForSequenceClassification(MambaConfig(num_labels=4, **tiny_kwargs)).save_pretrained(tmp_path)
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path)
    assert type(loaded) is MambaForSequenceClassification and loaded.config.num_labels == 4


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_keeps_ssm_parameters_in_fp32(model, tmp_path, dtype):
    model.save_pretrained(tmp_path)
    half = MambaForCausalLM.from_pretrained(tmp_path, dtype=dtype).eval()
    mixer = half.backbone.layers[0].mixer
    assert mixer.A_log.dtype == torch.float32 and mixer.D.dtype == torch.float32
    assert mixer.dt_proj.bias.dtype == torch.float32
    assert mixer.in_proj.weight.dtype == dtype
    ids = torch.randint(0, 97, (2, 16))
    with torch.no_grad():
        out = half(ids, use_cache=True)
        reference = model(ids).logits
    assert out.cache_params.ssm_states[0].dtype == torch.float32
    assert torch.isfinite(out.logits).all()
    assert max_rel_diff(out.logits, reference) < 5e-2


def test_logits_keep_lm_head_dtype_and_loss_upcasts(model):
    # No fp32 copy of the logits under autocast (the largest tensor of a training step); the loss
    # is still computed in fp32 from them.
    ids = torch.randint(0, 97, (2, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(ids, labels=ids)
    assert out.logits.dtype == torch.bfloat16
    assert out.loss.dtype == torch.float32
    expected = torch.nn.functional.cross_entropy(out.logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
    torch.testing.assert_close(out.loss, expected, rtol=1e-6, atol=1e-6)
    assert model(ids).logits.dtype == torch.float32


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_gradient_checkpointing_gives_identical_loss_and_gradients(tiny_kwargs, use_reentrant):
    model = MambaForCausalLM(MambaConfig(**tiny_kwargs)).train()
    ids = torch.randint(0, 97, (2, 10))
    model(ids, labels=ids).loss.backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    enable_activation_checkpointing(model, use_reentrant=use_reentrant)
    assert all(block.gradient_checkpointing for block in model.backbone.layers)
    loss = model(ids, labels=ids).loss
    loss.backward()
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, plain[name], rtol=1e-6, atol=1e-7, msg=name)


def test_init_follows_the_paper(tiny_kwargs):
    config = MambaConfig(**tiny_kwargs)
    mixer = MambaForCausalLM(config).backbone.layers[0].mixer
    expected_A = -torch.arange(1, config.state_size + 1, dtype=torch.float32).expand(config.intermediate_size, -1)
    torch.testing.assert_close(-torch.exp(mixer.A_log), expected_A)
    assert torch.equal(mixer.D.detach(), torch.ones(config.intermediate_size))
    dt = torch.nn.functional.softplus(mixer.dt_proj.bias.detach())
    assert dt.min() >= config.time_step_floor * (1 - 1e-4)
    assert dt.min() >= config.time_step_min * (1 - 1e-4) and dt.max() <= config.time_step_max * (1 + 1e-4)


# ---- bad input -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(input_ids=torch.tensor([[1, 97]])), "vocab_size"),
        (dict(input_ids=torch.tensor([[1, -1]])), "vocab_size"),
        (dict(input_ids=torch.tensor([[1.0, 2.0]])), "integer"),
        (dict(input_ids=torch.zeros(1, 0, dtype=torch.long)), "empty"),
        (dict(input_ids=torch.tensor([[1, 2]]), attention_mask=torch.ones(1, 3)), "attention_mask"),
        (dict(input_ids=torch.tensor([[1, 2]]), attention_mask=torch.tensor([[0.5, 1.0]])), "must hold 1 for tokens"),
        (dict(input_ids=torch.tensor([[1, 2]]), inputs_embeds=torch.randn(1, 2, 32)), "exactly one"),
        (dict(), "exactly one"),
        (dict(input_ids=torch.tensor([1, 2])), r"\(batch, seqlen\)"),
    ],
    ids=["id-too-large", "negative-id", "float-ids", "empty", "mask-shape", "mask-values", "ids-and-embeds", "nothing",
         "1d-ids"],
)
def test_bad_input_raises_clear_errors(model, kwargs, match):
    with pytest.raises(ValueError, match=match):
        model(**kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(inputs=torch.zeros(2, 0, dtype=torch.long)),
        dict(input_ids=torch.zeros(2, 0, dtype=torch.long), attention_mask=torch.zeros(2, 0, dtype=torch.long)),
        dict(inputs_embeds=torch.zeros(2, 0, 32)),
        dict(input_ids=torch.zeros(1, 0, dtype=torch.long)),
    ],
    ids=["inputs", "ids-and-mask", "embeds", "batch-1"],
)
def test_generate_refuses_an_empty_prompt(model, kwargs):
    """A batch of empty prompts: the forward's error, before Transformers' own preparation (an IndexError)."""
    with pytest.raises(ValueError, match=r"empty \(seqlen 0\)"):
        model.generate(max_new_tokens=2, **kwargs)


@pytest.mark.parametrize("how", ["assistant_model", "prompt_lookup_num_tokens", "assistant_early_exit", "config"])
def test_generate_refuses_assisted_decoding_naming_the_argument(model, how, monkeypatch):
    """Assisted decoding rolls the cache back past rejected drafts: refused before any forward, by name."""
    forwards = []
    monkeypatch.setattr(MambaForCausalLM, "forward", lambda *a, **k: forwards.append(1))
    ids = torch.randint(1, 97, (1, 6))
    kwargs = {"assistant_model": model, "prompt_lookup_num_tokens": 3, "assistant_early_exit": 1}.get(how)
    if how == "config":
        config = GenerationConfig(max_new_tokens=3, prompt_lookup_num_tokens=2)
        with pytest.raises(ValueError, match="^prompt_lookup_num_tokens: assisted decoding"):
            model.generate(ids, generation_config=config)
    else:
        with pytest.raises(ValueError, match=f"^{how}: assisted decoding .* cannot go back"):
            model.generate(ids, max_new_tokens=3, **{how: kwargs})
    assert forwards == []


@pytest.mark.parametrize("where", ["forward", "backbone", "generate"])
@pytest.mark.parametrize("name", ["cache", "cache_params", "past_key_values"])
def test_a_cache_of_another_kind_is_refused_by_name(model, where, name):
    """An attention model's cache (or anything but a MambaCache) is refused, never ignored or misread."""
    ids = torch.randint(1, 97, (2, 6))
    call = {"forward": model, "backbone": model.backbone, "generate": model.generate}[where]
    extra = {"max_new_tokens": 2} if where == "generate" else {"use_cache": True}
    expected = "^past_key_values: an hf_mamba model" if name == "past_key_values" else "^cache must be an hf_mamba"
    with pytest.raises(ValueError, match=expected):
        call(ids, **{name: transformers.DynamicCache()}, **extra)


@pytest.mark.parametrize("change", [dict(hidden_size=64), dict(num_hidden_layers=3), dict(state_size=4)])
def test_a_cache_made_for_another_model_is_refused(model, tiny_kwargs, change):
    ids = torch.randint(1, 97, (2, 6))
    cache = MambaCache(MambaConfig(**{**tiny_kwargs, **change}), batch_size=2)
    with pytest.raises(ValueError, match=r"^cache was made for another model: \(layers, d_inner, d_conv, d_state\)"):
        model(ids, cache=cache, use_cache=True)
    with pytest.raises(ValueError, match="^cache was made for another model"):
        model.generate(ids, cache=cache, max_new_tokens=2)


def test_labels_and_embeddings_of_the_wrong_shape_are_refused_by_name(model):
    ids = torch.randint(1, 97, (2, 6))
    wrong_labels = r"^labels must have the shape of the logits' \(batch, seqlen\) = \(2, 6\), got \(2, 4\)"
    with pytest.raises(ValueError, match=wrong_labels):
        model(ids, labels=ids[:, :4])
    with pytest.raises(ValueError, match=r"^labels must have the shape .* = \(2, 1\)"):  # logits of one position
        model(ids, labels=ids, logits_to_keep=1)
    with pytest.raises(ValueError, match="^labels must be an integer tensor"):
        model(ids, labels=ids.float())
    narrow = r"^inputs_embeds must have shape \(batch, seqlen, hidden_size=32\), got \(2, 6, 16\)"
    with pytest.raises(ValueError, match=narrow):
        model(inputs_embeds=torch.randn(2, 6, 16))
    with pytest.raises(ValueError, match="^inputs_embeds must have shape"):
        model.backbone(inputs_embeds=torch.randn(2, 6, 33))


@pytest.mark.parametrize("with_mask", [False, True])
@pytest.mark.parametrize("with_positions", [False, True])
def test_a_forward_reads_values_to_the_host_once(model, monkeypatch, with_mask, with_positions):
    """Each read of a tensor's value on the host waits for the GPU; the id check, the padding test and the
    packed-document test share one (a training step on a GPU keeps its queue full)."""
    reads = []
    for name in ("tolist", "item", "__bool__", "__int__", "__index__", "__float__"):
        real = getattr(torch.Tensor, name)
        spy = lambda self, *args, _real=real, _name=name: reads.append(_name) or _real(self, *args)  # noqa: E731
        monkeypatch.setattr(torch.Tensor, name, spy)
    ids = torch.randint(0, 97, (2, 9))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    positions = torch.cat([torch.arange(4), torch.arange(5)]).expand(2, -1)
    kwargs = dict(attention_mask=mask if with_mask else None, position_ids=positions if with_positions else None)
    model(ids, labels=ids, **kwargs)
    assert reads == ["tolist"]


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_an_fp64_model_continues_its_cache_in_fp64(backend):
    """The cache keeps an fp64 model's SSM state in fp64, so chunks and steps equal one forward to fp64 rounding
    (an fp32 state put the error at 5e-7: too coarse for gradient checks and references)."""
    torch.manual_seed(0)
    model = MambaForCausalLM(MambaConfig(vocab_size=32, hidden_size=16, num_hidden_layers=2, state_size=8))
    model = model.double().eval()
    model.config.scan_backend = backend
    ids = torch.randint(32, (2, 24))
    out = model(ids[:, :10], use_cache=True)
    cache = getattr(out, CACHE_FIELD)
    logits = [out.logits, model(ids[:, 10:20], cache=cache, use_cache=True).logits]
    logits += [model(ids[:, t : t + 1], cache=cache, use_cache=True).logits for t in range(20, 24)]
    assert cache.ssm_states[0].dtype == torch.float64
    torch.testing.assert_close(torch.cat(logits, dim=1), model(ids).logits, rtol=1e-12, atol=1e-12)


def test_a_layer_moves_its_cached_states_to_its_own_device(model):
    """A model split over devices runs each layer where its input is; its states follow, once ("meta" stands
    in for a second device here; tests/test_model_triton.py runs it on two GPUs)."""
    cache = MambaCache(model.config, batch_size=2)
    states = (cache.conv_states[0], cache.ssm_states[0])
    cache.place_layer(0, torch.device("cpu"))
    assert cache.conv_states[0] is states[0] and cache.ssm_states[0] is states[1]  # already there: not copied
    assert repr(cache).endswith("device=cpu)")
    cache.place_layer(1, torch.device("meta"))
    assert cache.conv_states[1].is_meta and cache.ssm_states[1].is_meta
    assert cache.ssm_states[1].dtype == torch.float32 and not cache.ssm_states[0].is_meta
    assert repr(cache).endswith("device=[cpu, meta])")  # each layer's, once they differ


@pytest.mark.parametrize(
    "device_map, graphs",
    [
        (None, True),
        ({"": 0}, True),
        ({"backbone.embeddings": 0, "backbone.layers": 1, "backbone.norm_f": 1, "lm_head": 1}, False),
        ({"backbone": 0, "lm_head": "cpu"}, False),
    ],
    ids=["not-dispatched", "one-gpu", "two-gpus", "offloaded"],
)
def test_no_cuda_graphs_for_a_model_dispatched_over_devices(model, device_map, graphs):
    """Accelerate's hooks move tensors at every call of a dispatched model; a graph replay would run none."""
    if device_map is not None:
        model.hf_device_map = device_map
    assert model._cuda_graphs_on(torch.device("cuda")) is graphs


def test_an_empty_batch_runs_with_and_without_a_cache(model):
    """Batch 0 (say, the last shard of a dataset): empty logits, and a cache of no sequences that continues."""
    ids = torch.zeros(0, 5, dtype=torch.long)
    out = model(ids, use_cache=True)
    cache = getattr(out, CACHE_FIELD)
    assert out.logits.shape == (0, 5, model.config.vocab_size) and cache.ssm_states[0].shape[0] == 0
    step = model(torch.zeros(0, 1, dtype=torch.long), cache=cache, use_cache=True)
    assert step.logits.shape == (0, 1, model.config.vocab_size) and cache.seqlen_offset == 6
    assert model(ids, use_cache=False).logits.shape == (0, 5, model.config.vocab_size)
    with pytest.raises(ValueError, match="batch_size must be a non-negative integer"):
        MambaCache(model.config, batch_size=-1)


def test_cache_refuses_an_integer_dtype_and_a_layer_it_does_not_hold(model):
    """An integer conv state would truncate the activations it keeps; a layer index past the last one is named."""
    for dtype in (torch.int64, torch.bool, "float32"):
        with pytest.raises(ValueError, match="^dtype must be a floating-point torch.dtype"):
            MambaCache(model.config, batch_size=1, dtype=dtype)
    cache = MambaCache(model.config, batch_size=1)
    conv = torch.ones_like(cache.conv_states[0])
    with pytest.raises(ValueError, match=r"^layer_idx must lie in \[0, 2\) for this cache's 2 layers, got 2"):
        cache.update_conv_state(conv, 2)
    with pytest.raises(ValueError, match="^layer_idx must lie in"):
        cache.update_ssm_state(-1, torch.zeros_like(cache.ssm_states[0]))  # the older (layer, state) order
    assert torch.equal(cache.update_conv_state(1, conv), conv)


def test_cache_batch_mismatch_raises(model):
    cache = MambaCache(model.config, batch_size=2)
    with pytest.raises(ValueError, match="cache_params"):
        model(torch.randint(0, 97, (3, 4)), cache_params=cache, use_cache=True)


@pytest.mark.parametrize(
    "field, value",
    [
        ("hidden_size", 0),
        ("state_size", -1),
        ("num_hidden_layers", 0),
        ("conv_kernel", 0),
        ("expand", 0),
        ("hidden_act", "nope"),
        ("time_step_min", 0.0),
        ("time_step_init_scheme", "weird"),
        ("scan_backend", "cuda"),
    ],
)
def test_config_rejects_invalid_values(field, value):
    with pytest.raises(ValueError, match=field):
        MambaConfig(**{field: value})


def test_config_rejects_min_above_max():
    with pytest.raises(ValueError, match="time_step_min"):
        MambaConfig(time_step_min=0.5, time_step_max=0.1)


def test_config_loads_builtin_mamba_config(tmp_path, tiny_kwargs):
    transformers.MambaConfig(**tiny_kwargs).save_pretrained(tmp_path)
    config = MambaConfig.from_pretrained(tmp_path)
    for key, value in tiny_kwargs.items():
        assert getattr(config, key) == value
    assert config.intermediate_size == 64 and config.time_step_rank == 2


# ---- packed sequences --------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_packed_documents_do_not_leak(model, backend, monkeypatch):
    """position_ids restarting at 0 (DataCollatorWithFlattening) reset the state and the conv per document."""
    monkeypatch.setenv("HF_MAMBA_BACKEND", backend)
    docs = [torch.randint(1, 97, (n,)) for n in (5, 1, 9)]
    packed = torch.cat(docs)[None]
    position_ids = torch.cat([torch.arange(len(d)) for d in docs])[None]
    with torch.no_grad():
        logits = model(packed, position_ids=position_ids, use_cache=False).logits[0]
        separate = torch.cat([model(d[None], use_cache=False).logits[0] for d in docs])
        leaking = model(packed, use_cache=False).logits[0]
    assert max_rel_diff(logits, separate) < LOGITS_RTOL
    assert max_rel_diff(leaking, separate) > 1e-3  # without the reset the later documents differ


def test_packed_documents_train_with_data_collator_with_flattening(model):
    from transformers import DataCollatorWithFlattening

    docs = [torch.randint(1, 97, (n,)).tolist() for n in (6, 4)]
    batch = DataCollatorWithFlattening(return_tensors="pt")([{"input_ids": d} for d in docs])
    model.train()
    packed_loss = model(**batch).loss
    per_doc = [model(torch.tensor([d]), labels=torch.tensor([d])).loss * (len(d) - 1) for d in docs]
    torch.testing.assert_close(packed_loss, sum(per_doc) / sum(len(d) - 1 for d in docs), rtol=1e-5, atol=1e-6)


def test_packed_documents_cannot_continue_a_cache(model):
    with torch.no_grad():
        cache = model(torch.randint(0, 97, (1, 4)), use_cache=True).cache_params
        with pytest.raises(ValueError, match="cache"):
            model(torch.randint(0, 97, (1, 4)), position_ids=torch.tensor([[0, 1, 0, 1]]), cache_params=cache)
