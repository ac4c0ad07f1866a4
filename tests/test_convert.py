"""scripts/convert_checkpoint.py: state-spaces <-> hf_mamba <-> Transformers "mamba" / "falcon_mamba" folders,
same logits."""

import json
from pathlib import Path

import pytest
import torch
import transformers
from _scripts import load_script
from safetensors.torch import load_file

import hf_mamba

convert_checkpoint = load_script("convert_checkpoint")

# state-spaces pads the vocab: 100 tokens stored as 104 embedding rows (pad_vocab_size_multiple=8).
VOCAB, PADDED_VOCAB = 100, 104
TINY = dict(hidden_size=32, state_size=8, num_hidden_layers=2, expand=2, conv_kernel=4)


def reference_model(tie=True):
    """Transformers' built-in Mamba: the independent implementation every converted folder is compared with."""
    torch.manual_seed(0)
    config = transformers.MambaConfig(vocab_size=PADDED_VOCAB, tie_word_embeddings=tie, **TINY)
    model = transformers.MambaForCausalLM(config).eval()
    with torch.no_grad():  # non-trivial D and Δ bias, so a dropped or misnamed tensor shows in the logits
        for name, param in model.named_parameters():
            if name.endswith(("mixer.D", "dt_proj.bias", "norm.weight", "norm_f.weight")):
                param.add_(torch.randn_like(param) * 0.1)
    return model


def write_state_spaces(model, folder: Path):
    """The layout mamba_ssm's MambaLMHeadModel.save_pretrained writes, built here by hand."""
    config = model.config
    folder.mkdir(parents=True)
    ss_config = {
        "d_model": config.hidden_size,
        "d_intermediate": 0,
        "n_layer": config.num_hidden_layers,
        "vocab_size": VOCAB,
        "ssm_cfg": {"d_state": config.state_size, "d_conv": config.conv_kernel, "expand": config.expand},
        "attn_layer_idx": [],
        "attn_cfg": {},
        "rms_norm": True,
        "residual_in_fp32": True,
        "fused_add_norm": True,
        "pad_vocab_size_multiple": 8,
        "tie_embeddings": config.tie_word_embeddings,
    }
    (folder / "config.json").write_text(json.dumps(ss_config))
    state_dict = {
        name.replace("backbone.embeddings.", "backbone.embedding."): tensor.clone()
        for name, tensor in model.state_dict().items()
    }
    assert "lm_head.weight" in state_dict  # mamba_ssm stores the tied head too
    torch.save(state_dict, folder / "pytorch_model.bin")


def logits(model, seed=1):
    input_ids = torch.randint(VOCAB, (2, 13), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(input_ids).logits


def test_detects_layouts(tmp_path):
    assert convert_checkpoint.detect_layout({"model_type": "hf_mamba"}) == "hf_mamba"
    assert convert_checkpoint.detect_layout({"model_type": "mamba"}) == "transformers"
    assert convert_checkpoint.detect_layout({"d_model": 8, "n_layer": 2}) == "state-spaces"
    with pytest.raises(ValueError, match="cannot tell"):
        convert_checkpoint.detect_layout({"model_type": "llama"})


@pytest.mark.parametrize("tie", [pytest.param(True, id="tied"), pytest.param(False, id="untied")])
def test_state_spaces_to_hf_mamba(tmp_path, tie):
    reference = reference_model(tie)
    write_state_spaces(reference, tmp_path / "ss")
    assert convert_checkpoint.main([str(tmp_path / "ss"), str(tmp_path / "hf")]) == 0

    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert isinstance(model, hf_mamba.MambaForCausalLM)
    assert model.config.vocab_size == PADDED_VOCAB
    assert model.config.tie_word_embeddings == tie
    torch.testing.assert_close(logits(model.eval()), logits(reference), rtol=0, atol=1e-5)
    # The converted folder is Hub-ready like any saved hf_mamba model.
    assert (tmp_path / "hf" / "modeling_mamba.py").exists() and (tmp_path / "hf" / "README.md").exists()
    assert "auto_map" in json.loads((tmp_path / "hf" / "config.json").read_text())


def test_transformers_to_hf_mamba_and_back(tmp_path):
    reference = reference_model()
    reference.save_pretrained(tmp_path / "tf")
    convert_checkpoint.convert(tmp_path / "tf", tmp_path / "hf")
    model = hf_mamba.MambaForCausalLM.from_pretrained(tmp_path / "hf").eval()
    torch.testing.assert_close(logits(model), logits(reference), rtol=0, atol=1e-5)

    assert convert_checkpoint.convert(tmp_path / "hf", tmp_path / "tf2", to="transformers") == "hf_mamba"
    config = json.loads((tmp_path / "tf2" / "config.json").read_text())
    assert config["model_type"] == "mamba" and "auto_map" not in config
    back = transformers.MambaForCausalLM.from_pretrained(tmp_path / "tf2").eval()
    assert type(back) is transformers.MambaForCausalLM
    torch.testing.assert_close(logits(back), logits(reference), rtol=0, atol=0)


def test_hf_mamba_to_state_spaces_round_trip(tmp_path):
    reference = reference_model()
    reference.save_pretrained(tmp_path / "tf")
    convert_checkpoint.convert(tmp_path / "tf", tmp_path / "hf")
    convert_checkpoint.convert(tmp_path / "hf", tmp_path / "ss", to="state-spaces")

    config = json.loads((tmp_path / "ss" / "config.json").read_text())
    assert (config["d_model"], config["n_layer"], config["vocab_size"]) == (32, 2, PADDED_VOCAB)
    assert config["ssm_cfg"]["d_state"] == 8 and config["rms_norm"] and config["tie_embeddings"]
    state_dict = torch.load(tmp_path / "ss" / "pytorch_model.bin", weights_only=True)
    assert "backbone.embedding.weight" in state_dict and "backbone.embeddings.weight" not in state_dict
    torch.testing.assert_close(state_dict["lm_head.weight"], state_dict["backbone.embedding.weight"], rtol=0, atol=0)

    # ... and back: every tensor bit-identical to the original's.
    convert_checkpoint.convert(tmp_path / "ss", tmp_path / "hf2")
    original = load_file(tmp_path / "hf" / "model.safetensors")
    again = load_file(tmp_path / "hf2" / "model.safetensors")
    assert original.keys() == again.keys()
    for name in original:
        assert torch.equal(original[name], again[name]), name
    model = hf_mamba.MambaForCausalLM.from_pretrained(tmp_path / "hf2").eval()
    torch.testing.assert_close(logits(model), logits(reference), rtol=0, atol=1e-5)


def test_sharded_and_cast(tmp_path):
    reference_model().save_pretrained(tmp_path / "tf")
    argv = [str(tmp_path / "tf"), str(tmp_path / "hf"), "--max-shard-size", "20KB", "--dtype", "bfloat16"]
    assert convert_checkpoint.main(argv) == 0
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    model = hf_mamba.MambaForCausalLM.from_pretrained(tmp_path / "hf")
    assert model.backbone.embeddings.weight.dtype == torch.bfloat16
    assert model.backbone.layers[0].mixer.A_log.dtype == torch.float32  # kept fp32 by the conversion and the model


def test_rejects_layernorm_state_spaces(tmp_path):
    write_state_spaces(reference_model(), tmp_path / "ss")
    config = json.loads((tmp_path / "ss" / "config.json").read_text())
    (tmp_path / "ss" / "config.json").write_text(json.dumps({**config, "rms_norm": False}))
    with pytest.raises(ValueError, match="rms_norm"):
        convert_checkpoint.convert(tmp_path / "ss", tmp_path / "hf")


def word_tokenizer():
    """A small fast tokenizer (one id per word) standing in for the GPT-NeoX tokenizer of the Mamba checkpoints."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["<|endoftext|>", "<unk>", "the", "selective", "scan", "state", "space", "model"]
    tokenizer = Tokenizer(models.WordLevel({word: i for i, word in enumerate(words)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token="<|endoftext|>", unk_token="<unk>"
    )


@pytest.mark.parametrize("to", [layout for layout in convert_checkpoint.LAYOUTS if layout != "falcon_mamba"])
def test_tokenizer_files_travel_with_the_weights(tmp_path, to, capsys):
    """Without them a converted folder loads Transformers' empty fallback tokenizer (every text encodes to [])."""
    reference_model().save_pretrained(tmp_path / "tf")
    tokenizer = word_tokenizer()
    tokenizer.save_pretrained(tmp_path / "tf")
    source_files = {p.name for p in (tmp_path / "tf").iterdir() if p.name in convert_checkpoint.TOKENIZER_FILES}
    assert "tokenizer.json" in source_files

    assert convert_checkpoint.main([str(tmp_path / "tf"), str(tmp_path / "out"), "--to", to]) == 0
    copied = {p.name for p in (tmp_path / "out").iterdir() if p.name in convert_checkpoint.TOKENIZER_FILES}
    assert copied == source_files
    assert f"tokenizer          {', '.join(sorted(copied, key=convert_checkpoint.TOKENIZER_FILES.index))}" in (
        capsys.readouterr().out
    )
    text = "the selective scan of a state space model"
    reloaded = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    assert reloaded(text)["input_ids"] == tokenizer(text)["input_ids"] == [2, 3, 4, 1, 1, 5, 6, 7]


def test_says_when_the_source_has_no_tokenizer(tmp_path, capsys):
    reference_model().save_pretrained(tmp_path / "tf")
    assert convert_checkpoint.main([str(tmp_path / "tf"), str(tmp_path / "hf"), "--no-verify"]) == 0
    assert f"none in {tmp_path / 'tf'}: save one beside it" in capsys.readouterr().out


@pytest.mark.parametrize("damage", ["no-folder", "truncated", "missing-shard", "bad-config"])
def test_bad_source_is_one_line_naming_the_file(tmp_path, damage, capsys):
    """Before anything is written: no traceback, and the file at fault named (safetensors' own error names none)."""
    src = tmp_path / "src"
    reference_model().save_pretrained(src, max_shard_size="20KB" if damage == "missing-shard" else "5GB")
    if damage == "no-folder":
        src, expected = tmp_path / "nowhere", f"src {tmp_path / 'nowhere'}: no such folder"
    elif damage == "truncated":
        weights = src / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:100])
        expected = f"{weights} cannot be read, truncated or corrupt?"
    elif damage == "missing-shard":
        shard = sorted(src.glob("model-*.safetensors"))[-1]
        shard.unlink()
        expected = f"{src / 'model.safetensors.index.json'} lists shards that are missing: {shard.name}"
    else:
        (src / "config.json").write_text('{"model_type": "mamba",')
        expected = f"{src / 'config.json'} is not valid JSON"
    with pytest.raises(SystemExit) as stopped:
        convert_checkpoint.main([str(src), str(tmp_path / "out")])
    assert stopped.value.code in (1, 2)
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert expected in error, error
    assert not (tmp_path / "out").exists()


def falcon_reference(folder: Path):
    """Transformers' FalconMambaForCausalLM (untied head) saved to `folder`, with x_proj rows of different scales
    so that dropping its norms shows in the logits."""
    torch.manual_seed(0)
    config = transformers.FalconMambaConfig(vocab_size=VOCAB, tie_word_embeddings=False, **TINY)
    model = transformers.FalconMambaForCausalLM(config).eval()
    with torch.no_grad():
        for layer in model.backbone.layers:
            layer.mixer.x_proj.weight.mul_(torch.linspace(0.2, 5.0, layer.mixer.x_proj.out_features)[:, None])
    model.save_pretrained(folder)
    return model


def test_falcon_mamba_converts_both_ways_with_its_norms(tmp_path):
    reference = falcon_reference(tmp_path / "falcon")
    convert_checkpoint.convert(tmp_path / "falcon", tmp_path / "ours")
    config = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert config["model_type"] == "hf_mamba" and config["mixer_rms_eps"] == reference.config.mixer_rms_eps
    convert_checkpoint.convert(tmp_path / "ours", tmp_path / "back", to="falcon_mamba")
    assert json.loads((tmp_path / "back" / "config.json").read_text())["model_type"] == "falcon_mamba"
    ids = torch.randint(0, VOCAB, (2, 11))
    with torch.no_grad():
        expected = reference(ids).logits
        ours = hf_mamba.MambaForCausalLM.from_pretrained(tmp_path / "ours").eval()(ids).logits
        back = transformers.FalconMambaForCausalLM.from_pretrained(tmp_path / "back").eval()(ids).logits
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(back, expected, rtol=0, atol=0)
    assert convert_checkpoint.max_logit_difference(tmp_path / "falcon", tmp_path / "ours") < 1e-4


@pytest.mark.parametrize("to", ["transformers", "state-spaces"])
def test_falcon_mamba_is_never_converted_without_its_norms(tmp_path, to):
    falcon_reference(tmp_path / "falcon")
    with pytest.raises(ValueError, match="Falcon Mamba"):
        convert_checkpoint.convert(tmp_path / "falcon", tmp_path / "out", to=to)
    assert not (tmp_path / "out").exists()


def test_plain_mamba_is_not_written_as_falcon_mamba(tmp_path):
    reference_model().save_pretrained(tmp_path / "mamba")
    with pytest.raises(ValueError, match="plain Mamba"):
        convert_checkpoint.convert(tmp_path / "mamba", tmp_path / "out", to="falcon_mamba")
