"""Chunked prefill (hf_mamba.generation): the same logits, cache and generated tokens as one forward."""

import json

import pytest
import torch
from _scripts import load_script

from hf_mamba import MambaCache, MambaConfig, MambaForCausalLM, MambaModel
from hf_mamba.compat import enable_activation_checkpointing
from hf_mamba.generation import generate_after_prefill, prefill_in_chunks
from hf_mamba.modeling_mamba import CACHE_FIELD


@pytest.fixture
def model(tiny_kwargs):
    return MambaForCausalLM(MambaConfig(**tiny_kwargs)).eval()


def _prompt(model, batch=2, seqlen=37, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(1, model.config.vocab_size, (batch, seqlen), generator=generator)


def _assert_same_cache(a, b):
    assert a.seqlen_offset == b.seqlen_offset
    for x, y in zip(a.conv_states + a.ssm_states, b.conv_states + b.ssm_states, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("chunk_size", [1, 5, 16, 37, 100], ids=["chunk1", "chunk5", "chunk16", "whole", "longer"])
def test_chunked_prefill_equals_one_forward(model, chunk_size):
    input_ids = _prompt(model)
    with torch.no_grad():
        full = model(input_ids, use_cache=True)
    chunked = prefill_in_chunks(model, input_ids, chunk_size=chunk_size, logits_to_keep=0)
    last = (input_ids.shape[1] - 1) % chunk_size + 1  # length of the last chunk
    torch.testing.assert_close(chunked.logits, full.logits[:, -last:], rtol=1e-5, atol=1e-5)
    _assert_same_cache(chunked[CACHE_FIELD], full[CACHE_FIELD])


def test_default_keeps_last_logits_and_fills_given_cache(model):
    input_ids = _prompt(model, batch=1, seqlen=50)
    with torch.no_grad():
        full = model(input_ids, use_cache=True)
    cache = MambaCache(model.config, batch_size=1)
    out = prefill_in_chunks(model, input_ids, chunk_size=8, cache=cache)
    assert out.logits.shape == (1, 1, model.config.vocab_size)
    assert out[CACHE_FIELD] is cache
    torch.testing.assert_close(out.logits, full.logits[:, -1:], rtol=1e-5, atol=1e-5)
    _assert_same_cache(cache, full[CACHE_FIELD])


def test_prefill_continues_an_existing_cache(model):
    input_ids = _prompt(model, batch=1, seqlen=30)
    with torch.no_grad():
        full = model(input_ids, use_cache=True)
        first = model(input_ids[:, :11], use_cache=True)
    out = prefill_in_chunks(model, input_ids[:, 11:], chunk_size=6, cache=first[CACHE_FIELD], logits_to_keep=0)
    torch.testing.assert_close(out.logits, full.logits[:, -1:], rtol=1e-5, atol=1e-5)  # last chunk: 1 token
    _assert_same_cache(out[CACHE_FIELD], full[CACHE_FIELD])


def test_left_padding_across_chunks(model):
    """Padding spread over several chunks leaves the state unchanged, as in one masked forward."""
    input_ids = _prompt(model, batch=2, seqlen=24)
    mask = torch.ones_like(input_ids)
    mask[0, :13] = 0  # row 0 padded across the first two chunks of 6 and into the third
    with torch.no_grad():
        full = model(input_ids, attention_mask=mask, use_cache=True)
    out = prefill_in_chunks(model, input_ids, chunk_size=6, attention_mask=mask, logits_to_keep=0)
    torch.testing.assert_close(out.logits, full.logits[:, -6:], rtol=1e-5, atol=1e-5)
    _assert_same_cache(out[CACHE_FIELD], full[CACHE_FIELD])


def test_backbone_without_lm_head(tiny_kwargs):
    backbone = MambaModel(MambaConfig(**tiny_kwargs)).eval()
    input_ids = _prompt(backbone, batch=1, seqlen=20)
    with torch.no_grad():
        full = backbone(input_ids, use_cache=True)
    out = prefill_in_chunks(backbone, input_ids, chunk_size=7)
    torch.testing.assert_close(out.last_hidden_state, full.last_hidden_state[:, -6:], rtol=1e-5, atol=1e-5)
    _assert_same_cache(out[CACHE_FIELD], full[CACHE_FIELD])


def test_generate_after_chunked_prefill_equals_generate(model):
    input_ids = _prompt(model, batch=2, seqlen=29)
    expected = model.generate(input_ids, max_new_tokens=8, do_sample=False)
    # The recipe: prefill all but the last token, then generate() from the whole prompt with the cache.
    cache = MambaCache(model.config, batch_size=2)
    prefill_in_chunks(model, input_ids[:, :-1], chunk_size=6, cache=cache)
    continued = model.generate(input_ids, cache=cache, max_new_tokens=8, do_sample=False)
    assert continued.tolist() == expected.tolist()
    assert cache.seqlen_offset == 29 + 8 - 1  # the last generated token is never fed back
    # The helper that does both.
    assert generate_after_prefill(model, input_ids, chunk_size=4, max_new_tokens=8, do_sample=False).tolist() == (
        expected.tolist()
    )


def test_generate_after_prefill_with_left_padding(model):
    input_ids = _prompt(model, batch=2, seqlen=16)
    mask = torch.ones_like(input_ids)
    mask[1, :5] = 0
    input_ids[1, :5] = model.config.pad_token_id
    expected = model.generate(input_ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
    got = generate_after_prefill(model, input_ids, chunk_size=3, attention_mask=mask, max_new_tokens=5,
                                 do_sample=False)
    assert got.tolist() == expected.tolist()


def test_one_token_prompt_generates(model):
    input_ids = _prompt(model, batch=1, seqlen=1)
    expected = model.generate(input_ids, max_new_tokens=3, do_sample=False)
    assert generate_after_prefill(model, input_ids, chunk_size=4, max_new_tokens=3, do_sample=False).tolist() == (
        expected.tolist()
    )


def test_memory_of_a_chunk_not_the_prompt(model):
    """Under autograd the cache would chain every chunk's graph; the helper runs without it."""
    input_ids = _prompt(model, batch=1, seqlen=12)
    out = prefill_in_chunks(model, input_ids, chunk_size=4)
    assert not out.logits.requires_grad
    assert all(not state.requires_grad for state in out[CACHE_FIELD].ssm_states)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        pytest.param(dict(chunk_size=0), "chunk_size must be a positive integer", id="chunk-zero"),
        pytest.param(dict(chunk_size=2.5), "chunk_size must be a positive integer", id="chunk-float"),
        pytest.param(dict(chunk_size=True), "chunk_size must be a positive integer", id="chunk-bool"),
        pytest.param(dict(logits_to_keep=-1), "logits_to_keep must be a non-negative", id="keep-negative"),
        pytest.param(dict(attention_mask=torch.ones(1, 3)), "attention_mask must have input_ids' shape", id="mask"),
    ],
)
def test_bad_arguments(model, kwargs, message):
    with pytest.raises(ValueError, match=message):
        prefill_in_chunks(model, torch.ones(2, 5, dtype=torch.long), **kwargs)


@pytest.mark.parametrize(
    "input_ids, message",
    [
        pytest.param(torch.ones(5, dtype=torch.long), r"\(batch, seqlen\) tensor", id="1d"),
        pytest.param([[1, 2, 3]], r"\(batch, seqlen\) tensor", id="list"),
        pytest.param(torch.ones(1, 4), "integer tensor", id="float"),
        pytest.param(torch.ones(1, 0, dtype=torch.long), "empty", id="empty"),
    ],
)
def test_bad_input_ids(model, input_ids, message):
    with pytest.raises(ValueError, match=message):
        prefill_in_chunks(model, input_ids)


def test_checkpointed_training_model_is_refused(model):
    enable_activation_checkpointing(model)
    model.train()
    with pytest.raises(ValueError, match="call model.eval"):
        prefill_in_chunks(model, torch.ones(1, 5, dtype=torch.long), chunk_size=2)


def test_generate_after_prefill_refuses_a_cache(model):
    with pytest.raises(ValueError, match="makes the cache itself"):
        generate_after_prefill(model, torch.ones(1, 5, dtype=torch.long), cache=MambaCache(model.config, 1))


def test_long_context_script_tiny(tmp_path, capsys):
    script = load_script("long_context")
    rows, continuation = script.main(
        ["--tiny", "--min-log2", "6", "--max-log2", "8", "--chunk-size", "48", "--new-tokens", "3",
         "--dtype", "fp32", "--out-dir", str(tmp_path)]
    )
    assert [row["length"] for row in rows] == [64, 128, 256]
    for row in rows:
        assert row["full_error"] is None and row["max_logit_diff"] < 1e-4
        assert row["chunked_tok_s"] > 0 and row["full_tok_s"] > 0
    assert continuation["new_tokens"] == 3 and continuation["cache_offset"] == 256 + 3 - 1
    assert continuation["first_token_matches_prefill"]
    assert json.loads((tmp_path / "results.json").read_text())["generate"] == continuation
    assert "one forward tok/s" in capsys.readouterr().out


def test_peft_wrapped_model(model):
    from peft import LoraConfig, get_peft_model

    wrapped = get_peft_model(model, LoraConfig(r=4, init_lora_weights=False)).eval()
    input_ids = _prompt(model, batch=1, seqlen=20)
    with torch.no_grad():
        full = wrapped(input_ids=input_ids, use_cache=True)
    out = prefill_in_chunks(wrapped, input_ids, chunk_size=6)
    assert out.logits.shape == (1, 1, model.config.vocab_size)  # logits_to_keep reached the wrapped model
    torch.testing.assert_close(out.logits, full.logits[:, -1:], rtol=1e-5, atol=1e-5)
    _assert_same_cache(out[CACHE_FIELD], full[CACHE_FIELD])
