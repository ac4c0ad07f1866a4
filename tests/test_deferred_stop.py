"""generate()'s stop check read one step late for hf_mamba's cache on CUDA (hf_mamba.generation.defer_stop_checks):
the same tokens and streamed tokens as the per-token check, and only where the cache does not outlive generate().

On CPU the deferral is turned on by adding "cpu" to its device types, with torch.Event (which has no CPU
backend) replaced by a no-op: the CPU runs every op before returning, so there is nothing to wait for."""

import pytest
import torch
import transformers.generation.utils as generation_utils
from transformers import DynamicCache
from transformers.generation.streamers import BaseStreamer

from hf_mamba import MambaCache, MambaConfig, MambaForCausalLM, generation

pytestmark = pytest.mark.skipif(
    not hasattr(generation_utils, "DeferredStopCheck"), reason="this Transformers has no DeferredStopCheck"
)


class _NoEvent:
    def __init__(self, *args, **kwargs):
        pass

    def record(self, *args):
        pass

    def synchronize(self):
        pass


class _Collect(BaseStreamer):
    def __init__(self):
        self.chunks = []

    def put(self, value):
        self.chunks.append(value.tolist())

    def end(self):
        self.chunks.append("end")


@pytest.fixture
def model(tiny_kwargs):
    return MambaForCausalLM(MambaConfig(**tiny_kwargs)).eval()


@pytest.fixture
def deferred_on_cpu(monkeypatch):
    """Deferral on for CPU tensors; yields the list of stop checks generate() made (their class names)."""
    monkeypatch.setattr(generation, "DEFERRED_STOP_DEVICE_TYPES", ("cpu",))
    monkeypatch.setattr(torch, "Event", _NoEvent)
    made = []
    for cls in (generation_utils.StopCheck, generation_utils.DeferredStopCheck):
        original = cls.__init__

        def spy(self, *args, original=original, cls=cls, **kwargs):
            if type(self) is cls:
                made.append(cls.__name__)
            original(self, *args, **kwargs)

        monkeypatch.setattr(cls, "__init__", spy)
    return made


def _forward_count(model, monkeypatch):
    calls = []
    original = type(model).forward

    def counting(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(model), "forward", counting)
    return calls


def test_deferred_only_for_our_cache_on_cuda(tiny_kwargs):
    generation.defer_stop_checks()
    assert generation.defer_stop_checks()  # idempotent: wraps once
    is_supported = generation_utils.DeferredStopCheck.is_supported
    assert not getattr(is_supported.__wrapped__, "defers_mamba_caches", False)
    ours, cuda = MambaCache(MambaConfig(**tiny_kwargs), 1), torch.device("cuda")
    assert is_supported(cuda, ours, False, False)
    assert not is_supported(cuda, ours, True, False)  # returned to the caller: the extra step would show
    assert not is_supported(cuda, ours, False, True)  # an assistant model
    assert not is_supported(torch.device("cpu"), ours, False, False)
    assert not is_supported(cuda, DynamicCache(), False, False)  # other models: Transformers' answer
    assert is_supported(torch.device("mps"), None, False, False) == is_supported.__wrapped__(
        torch.device("mps"), None, False, False
    )


def _generate(model, ids, **kwargs):
    """Sampled (many different tokens, even from a tiny random model) and reproducible."""
    torch.manual_seed(0)
    return model.generate(ids, do_sample=True, top_k=0, pad_token_id=0, **kwargs)


def _first_new_token(model, ids, max_new_tokens):
    """(token, step): the first token row 0 emits at a step >= 2 that it did not emit before, as an EOS that
    stops row 0 there."""
    out = _generate(model, ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens)
    new = out[0, ids.shape[1] :].tolist()
    step = next(i for i in range(2, len(new)) if new[i] not in new[:i])
    return new[step], step


@pytest.mark.parametrize("stop", ["eos", "length"])
def test_same_tokens_and_stream_as_the_per_token_check(model, deferred_on_cpu, monkeypatch, stop):
    ids = torch.randint(1, 97, (1, 7))
    kwargs = dict(max_new_tokens=12)
    if stop == "eos":
        kwargs["eos_token_id"], step = _first_new_token(model, ids, 12)
    calls = _forward_count(model, monkeypatch)
    deferred_on_cpu.clear()
    results = {}
    for mode in ("deferred", "per token"):
        if mode == "per token":
            monkeypatch.setattr(generation, "DEFERRED_STOP_DEVICE_TYPES", ())
        streamer, calls[:] = _Collect(), []
        out = _generate(model, ids, streamer=streamer, **kwargs)
        results[mode] = out.tolist(), streamer.chunks, len(calls)
    assert deferred_on_cpu == ["DeferredStopCheck", "StopCheck"]
    (tokens, stream, forwards), (tokens_ref, stream_ref, forwards_ref) = results["deferred"], results["per token"]
    assert tokens == tokens_ref
    assert len(tokens[0]) == 7 + (step + 1 if stop == "eos" else 12)
    assert stream == stream_ref
    # An EOS is seen one step late: one forward more, whose token generate() drops; a length stop is known ahead.
    assert forwards == forwards_ref + (1 if stop == "eos" else 0)


def test_a_batch_whose_rows_stop_at_different_steps(model, deferred_on_cpu, monkeypatch):
    ids = torch.randint(1, 97, (3, 6))
    eos, step = _first_new_token(model, ids, 10)
    deferred_on_cpu.clear()
    kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=10, eos_token_id=eos)
    deferred = _generate(model, ids, **kwargs)
    monkeypatch.setattr(generation, "DEFERRED_STOP_DEVICE_TYPES", ())
    per_token = _generate(model, ids, **kwargs)
    assert deferred_on_cpu == ["DeferredStopCheck", "StopCheck"]
    assert torch.equal(deferred, per_token)
    assert deferred[0, 6 + step] == eos and (deferred[0, 7 + step :] == 0).all()  # row 0 stopped, then padding


def test_a_cache_that_outlives_generate_keeps_the_per_token_check(model, deferred_on_cpu):
    ids = torch.randint(1, 97, (1, 8))
    kwargs = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    asked_back = model.generate(ids, return_dict_in_generate=True, **kwargs)
    with torch.no_grad():
        cache = model(ids[:, :-1], use_cache=True).cache
    passed_in = model.generate(ids, cache=cache, **kwargs)
    assert deferred_on_cpu == ["StopCheck", "StopCheck"]
    assert torch.equal(asked_back.sequences, passed_in)
    assert cache.seqlen_offset == 8 + 3  # the prompt and every new token but the last: no extra step


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda_with_graphs_same_tokens_one_step_late(tiny_kwargs, monkeypatch):
    model = MambaForCausalLM(MambaConfig(**tiny_kwargs)).cuda().eval()
    ids = torch.randint(1, 97, (2, 9), device="cuda")
    eos, _ = _first_new_token(model, ids, 16)
    kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=16, eos_token_id=eos)
    made = []
    original = generation_utils.DeferredStopCheck.__init__
    monkeypatch.setattr(
        generation_utils.DeferredStopCheck, "__init__", lambda self, *a, **k: made.append(1) or original(self, *a, **k)
    )
    deferred = _generate(model, ids, **kwargs)
    assert made == [1]
    monkeypatch.setattr(generation, "DEFERRED_STOP_DEVICE_TYPES", ())
    assert torch.equal(deferred, _generate(model, ids, **kwargs))
    assert made == [1]
