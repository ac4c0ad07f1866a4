"""Falcon Mamba: Mamba plus weight-free RMS norms on Δ (before dt_proj), B and C. Compared with Transformers'
FalconMambaForCausalLM (its PyTorch path) on the same weights, and with finite differences through the norms."""

import json

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM
from transformers.dynamic_module_utils import get_class_from_dynamic_module

import hf_mamba
from hf_mamba import MambaConfig, MambaForCausalLM
from hf_mamba.compat import CACHE_FIELD

LOGITS_RTOL = 1e-5  # fp32, relative to the largest logit
FALCON_TINY = dict(vocab_size=97, hidden_size=32, state_size=8, num_hidden_layers=2, tie_word_embeddings=False)


def max_rel_diff(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture
def falcon_folder(tmp_path):
    """A folder saved by Transformers' FalconMambaForCausalLM (model type "falcon_mamba"), and that model."""
    builtin = transformers.FalconMambaForCausalLM(transformers.FalconMambaConfig(**FALCON_TINY)).eval()
    with torch.no_grad():  # weights the norms matter for: B, C and Δ rows of different scales
        builtin.backbone.layers[0].mixer.x_proj.weight.mul_(torch.linspace(0.2, 5.0, 2 + 2 * 8)[:, None])
    builtin.save_pretrained(tmp_path / "falcon")
    return tmp_path / "falcon", builtin


@pytest.fixture
def pair(falcon_folder):
    folder, builtin = falcon_folder
    return builtin, MambaForCausalLM.from_pretrained(folder).eval()


def test_falcon_folder_loads_as_falcon_mamba(pair):
    builtin, ours = pair
    assert ours.config.mixer_rms_eps == builtin.config.mixer_rms_eps == 1e-6
    assert ours.config.model_type == "hf_mamba" and not ours.config.tie_word_embeddings
    assert ours.lm_head.weight is not ours.get_input_embeddings().weight
    assert {k: v.shape for k, v in ours.state_dict().items()} == {
        k: v.shape for k, v in builtin.state_dict().items() if "layernorm" not in k
    }


def test_plain_mamba_config_has_no_norms(tmp_path):
    transformers.MambaConfig(hidden_size=16, num_hidden_layers=1).save_pretrained(tmp_path)
    assert MambaConfig.from_pretrained(tmp_path).mixer_rms_eps is None


def test_intermediate_size_in_a_config_wins_over_expand(tmp_path):
    config = MambaConfig(hidden_size=16, num_hidden_layers=1, intermediate_size=48)
    assert config.intermediate_size == 48
    assert MambaForCausalLM(config).backbone.layers[0].mixer.in_proj.out_features == 96
    with pytest.raises(ValueError, match="mixer_rms_eps"):
        MambaConfig(mixer_rms_eps=-1.0)


def test_logits_loss_and_every_gradient_match_builtin(pair):
    builtin, ours = pair
    ids = torch.randint(0, 97, (3, 17))
    results = []
    for model in (builtin, ours):
        model.zero_grad()
        out = model(ids, labels=ids)
        out.loss.backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters()}
        results.append((out.logits.detach(), out.loss.detach(), grads))
    (logits_b, loss_b, grads_b), (logits_o, loss_o, grads_o) = results
    assert max_rel_diff(logits_o, logits_b) < LOGITS_RTOL
    torch.testing.assert_close(loss_o, loss_b, rtol=1e-6, atol=1e-6)
    assert set(grads_o) == set(grads_b)
    for name, grad in grads_o.items():
        assert max_rel_diff(grad, grads_b[name]) < 1e-4, name


@pytest.mark.parametrize(
    "mode", [dict(do_sample=False), dict(do_sample=False, num_beams=3, num_return_sequences=2)], ids=["greedy", "beam"]
)
def test_generation_matches_builtin(pair, mode):
    builtin, ours = pair
    ids = torch.randint(1, 97, (2, 7))
    kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=8, **mode)
    assert torch.equal(ours.generate(ids, **kwargs), builtin.generate(ids, **kwargs))


def test_left_padded_generation_matches_builtin(pair):
    builtin, ours = pair
    ids = torch.randint(1, 97, (2, 8))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    ids[0, :3] = 0
    kwargs = dict(attention_mask=mask, max_new_tokens=6, do_sample=False)
    assert torch.equal(ours.generate(ids, **kwargs), builtin.generate(ids, **kwargs))


def test_chunked_prefill_is_exact_where_the_builtin_is_not(pair):
    """A multi-token forward on a non-empty cache: ours continues exactly; Transformers' Falcon Mamba does not
    (its PyTorch path restarts the conv window at the chunk, so its logits drift from the full forward)."""
    builtin, ours = pair
    ids = torch.randint(0, 97, (2, 12))
    with torch.no_grad():
        full = ours(ids).logits
        first = ours(ids[:, :7], use_cache=True)
        second = ours(ids[:, 7:], cache=first.cache, use_cache=True)
        assert max_rel_diff(torch.cat([first.logits, second.logits], 1), full) < LOGITS_RTOL
        theirs_full = builtin(ids).logits
        theirs_first = builtin(ids[:, :7], use_cache=True)
        theirs_second = builtin(ids[:, 7:], **{CACHE_FIELD: theirs_first[CACHE_FIELD]}, use_cache=True)
    assert max_rel_diff(theirs_second.logits, theirs_full[:, 7:]) > 1e-3


def test_packed_documents_restart_with_the_norms(pair):
    _, ours = pair
    a, b = torch.randint(0, 97, (1, 5)), torch.randint(0, 97, (1, 6))
    packed = torch.cat([a, b], 1)
    position_ids = torch.tensor([list(range(5)) + list(range(6))])
    with torch.no_grad():
        logits = ours(packed, position_ids=position_ids).logits
        assert max_rel_diff(logits[:, 5:], ours(b).logits) < LOGITS_RTOL


def test_gradients_through_the_norms_match_finite_differences(monkeypatch):
    monkeypatch.setenv("HF_MAMBA_BACKEND", "torch")
    model = MambaForCausalLM(MambaConfig(**{**FALCON_TINY, "num_hidden_layers": 1}, mixer_rms_eps=1e-6)).double()
    ids = torch.randint(0, 97, (1, 6))

    def loss_fn():
        return torch.nn.functional.cross_entropy(model(ids).logits[0, :-1], ids[0, 1:])

    loss_fn().backward()
    param = model.backbone.layers[0].mixer.x_proj.weight  # every row feeds one of the three norms
    rows = {"dt": 0, "B": 2, "C": 2 + 8}
    for name, row in rows.items():
        column = int(param.grad[row].abs().argmax())
        eps = 1e-5
        with torch.no_grad():
            param[row, column] += eps
            plus = loss_fn().item()
            param[row, column] -= 2 * eps
            minus = loss_fn().item()
            param[row, column] += eps
        numeric = (plus - minus) / (2 * eps)
        assert param.grad[row, column].item() == pytest.approx(numeric, rel=1e-6, abs=1e-10), name


def test_saved_folder_loads_back_as_falcon_mamba_through_auto_and_remote_code(pair, tmp_path):
    _, ours = pair
    ours.save_pretrained(tmp_path / "saved")
    config = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert config["model_type"] == "hf_mamba" and config["mixer_rms_eps"] == 1e-6
    ids = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        expected = ours(ids).logits
        auto = AutoModelForCausalLM.from_pretrained(tmp_path / "saved").eval()
        assert type(auto) is MambaForCausalLM and torch.equal(auto(ids).logits, expected)
        # The folder's own code (with hf_mamba installed, the Auto classes would pick the installed classes).
        remote_class = get_class_from_dynamic_module(config["auto_map"]["AutoModelForCausalLM"], tmp_path / "saved")
        assert remote_class.__module__.startswith("transformers_modules")
        remote = remote_class.from_pretrained(tmp_path / "saved").eval()
        assert remote.config.mixer_rms_eps == 1e-6 and torch.equal(remote(ids).logits, expected)


def test_register_as_default_mamba_covers_falcon_folders(falcon_folder):
    folder, _ = falcon_folder
    hf_mamba.register_as_default_mamba()
    try:
        model = AutoModelForCausalLM.from_pretrained(folder)
    finally:
        hf_mamba.register_as_default_mamba(False)
    assert type(model) is MambaForCausalLM and model.config.mixer_rms_eps == 1e-6
