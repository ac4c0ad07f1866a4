"""from_pretrained's checks of a local folder (hf_mamba.loading): each fault a clear error naming the file or field,
raised before Transformers does any work; pickle weights only when asked for; Hub ids untouched."""

import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
import transformers
from _scripts import load_script, needs_datasets

import hf_mamba
from hf_mamba.loading import (
    MissingModelFileError,
    ModelFolderError,
    check_tokenizer_fits,
    is_local_path,
    read_safetensors_header,
    safetensors_problem,
)

TINY = dict(vocab_size=97, hidden_size=32, state_size=8, num_hidden_layers=2)


def tiny_model(cls=hf_mamba.MambaForCausalLM):
    torch.manual_seed(0)
    return cls(hf_mamba.MambaConfig(**TINY)).eval()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Pristine folders, copied by `folder` for each test: one file, shards, pickle only."""
    root = tmp_path_factory.mktemp("saved")
    model = tiny_model()
    model.save_pretrained(root / "single")
    model.save_pretrained(root / "sharded", max_shard_size="20KB")
    model.save_pretrained(root / "pickle")
    (root / "pickle" / "model.safetensors").unlink()
    torch.save(model.state_dict(), root / "pickle" / "pytorch_model.bin")
    return root, model


@pytest.fixture
def folder(saved, tmp_path):
    root, _ = saved

    def copy(kind="single"):
        return Path(shutil.copytree(root / kind, tmp_path / kind))

    return copy


@pytest.fixture
def transformers_never_runs(monkeypatch):
    """Fail if a load gets as far as Transformers' from_pretrained (config, weights, model): the check must stop
    it first."""

    def reached(cls, *args, **kwargs):
        raise AssertionError(f"{cls.__name__}.from_pretrained reached Transformers")

    monkeypatch.setattr(transformers.PreTrainedModel, "from_pretrained", classmethod(reached))


def assert_same_weights(model, expected):
    expected = expected.state_dict()
    loaded = model.state_dict()
    assert loaded.keys() == expected.keys()
    for name, tensor in expected.items():
        assert loaded[name].dtype == tensor.dtype and torch.equal(loaded[name], tensor), name


# ---------------------------------------------------------------------------------------------------------------
# Faults: each named, before any work


def cut(path: Path, keep: int) -> int:
    data = path.read_bytes()
    path.write_bytes(data[:keep])
    return len(data)


def edit_json(path: Path, **changes):
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def damage(case: str, folder) -> tuple[Path, type, str]:
    """Damage a fresh folder as `case` says; returns it, the error type and the message expected (exactly)."""
    kind = "sharded" if case.startswith("shard") else "pickle" if case == "pickle-only" else "single"
    model_dir = folder(kind)
    weights, config = model_dir / "model.safetensors", model_dir / "config.json"
    index = model_dir / "model.safetensors.index.json"
    repair = "; the file is truncated or corrupted: save or download it again"
    if case == "truncated":
        size = cut(weights, -7)
        return model_dir, ModelFolderError, f"{weights} is cut short ({size - 7} of {size} bytes){repair}"
    if case == "cut-in-header":
        header_size = int.from_bytes(weights.read_bytes()[:8], "little")
        cut(weights, 20)
        message = f"{weights} is cut short (20 bytes, its header alone takes {8 + header_size})"
        return model_dir, ModelFolderError, message
    if case == "empty-weights":
        cut(weights, 0)
        return model_dir, ModelFolderError, f"{weights} is cut short (0 bytes, less than the 8-byte header length)"
    if case == "corrupt-header":
        data = bytearray(weights.read_bytes())
        data[8:16] = b"\xff" * 8
        weights.write_bytes(bytes(data))
        return model_dir, ModelFolderError, f"{weights} has a corrupt header (not JSON: "
    if case == "corrupt-length":
        weights.write_bytes((2**60).to_bytes(8, "little") + weights.read_bytes()[8:])
        return model_dir, ModelFolderError, f"{weights} has a corrupt header (its length field says {2**60} bytes)"
    if case == "trailing-bytes":
        weights.write_bytes(weights.read_bytes() + b"\0\0\0")
        return model_dir, ModelFolderError, f"{weights} is corrupt (3 bytes past its last tensor){repair}"
    if case == "no-config":
        config.unlink()
        return model_dir, MissingModelFileError, f"{config} does not exist"
    if case == "config-not-json":
        config.write_text('{"model_type": "hf_mamba",')
        return model_dir, ModelFolderError, f"{config} is not valid JSON (Expecting property name"
    if case == "impossible-config":
        edit_json(config, state_size=0)
        return model_dir, ValueError, f"{config}: state_size must be a positive integer, got 0"
    if case == "shard-missing":
        shard = sorted(model_dir.glob("model-*.safetensors"))[-1]
        shard.unlink()
        return model_dir, MissingModelFileError, f"{index} lists shards that are missing: {shard.name}"
    if case == "shard-truncated":
        shard = sorted(model_dir.glob("model-*.safetensors"))[0]
        size = cut(shard, -1)
        return model_dir, ModelFolderError, f"{shard} is cut short ({size - 1} of {size} bytes){repair}"
    if case == "shard-index-not-json":
        index.write_text('{"weight_map": ')
        return model_dir, ModelFolderError, f"{index} is not a shard index (JSONDecodeError: "
    if case == "shard-lacks-tensor":
        weight_map = json.loads(index.read_text())["weight_map"]
        shard = sorted(set(weight_map.values()))[0]
        edit_json(index, weight_map={**weight_map, "backbone.extra.weight": shard})
        message = f"{model_dir / shard} lacks 1 tensor(s) its index assigns it (e.g. backbone.extra.weight)"
        return model_dir, ModelFolderError, message
    if case == "pickle-only":
        message = f"{model_dir} holds pickle weights only (pytorch_model.bin), which are not loaded unless asked for"
        return model_dir, ModelFolderError, message
    raise AssertionError(case)


WEIGHT_CASES = [
    "truncated",
    "cut-in-header",
    "empty-weights",
    "corrupt-header",
    "corrupt-length",
    "trailing-bytes",
    "shard-missing",
    "shard-truncated",
    "shard-index-not-json",
    "shard-lacks-tensor",
    "pickle-only",
]
CONFIG_CASES = ["no-config", "config-not-json", "impossible-config"]


CLASSES = [hf_mamba.MambaForCausalLM, hf_mamba.MambaModel, hf_mamba.MambaForSequenceClassification]


@pytest.mark.parametrize("case", WEIGHT_CASES + CONFIG_CASES)
@pytest.mark.parametrize("cls", CLASSES, ids=lambda cls: cls.__name__)
def test_fault_is_named_before_any_work(case, cls, folder, transformers_never_runs):
    model_dir, error_type, expected = damage(case, folder)
    with pytest.raises(error_type, match=re.escape(expected)) as raised:
        cls.from_pretrained(model_dir)
    assert "\n" not in str(raised.value)
    if case == "impossible-config":  # MambaConfig's own error, chained
        assert isinstance(raised.value.__cause__, ValueError) and "state_size" in str(raised.value.__cause__)


@pytest.mark.parametrize("case", WEIGHT_CASES)
def test_fault_is_named_through_auto_classes(case, folder, transformers_never_runs):
    """AutoModelForCausalLM reads config.json itself, then hands the folder to MambaForCausalLM.from_pretrained."""
    model_dir, error_type, expected = damage(case, folder)
    with pytest.raises(error_type, match=re.escape(expected)):
        transformers.AutoModelForCausalLM.from_pretrained(model_dir)


@pytest.mark.parametrize(
    "name",
    ["./no-such-model", "../no-such-model", "~/no-such-model", "runs/demo/checkpoint-10", "my model", "abs"],
)
def test_missing_folder_is_named(name, tmp_path, monkeypatch, transformers_never_runs):
    """Not Transformers' "Repo id must be in the form ..." for what is plainly a path."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    name = str(tmp_path / "nowhere") if name == "abs" else name
    with pytest.raises(MissingModelFileError, match=f"^No such model folder: {re.escape(name)}"):
        hf_mamba.MambaForCausalLM.from_pretrained(name)
    with pytest.raises(FileNotFoundError, match="No such model folder"):  # also a FileNotFoundError
        hf_mamba.MambaForCausalLM.from_pretrained(Path(name))


def test_missing_subfolder_and_damage_inside_a_subfolder_are_named(folder, transformers_never_runs):
    model_dir = folder()
    with pytest.raises(MissingModelFileError, match=f"No such model folder: {re.escape(str(model_dir / 'nope'))}"):
        hf_mamba.MambaForCausalLM.from_pretrained(model_dir, subfolder="nope")
    nested = model_dir.parent / "repo" / "lm"
    shutil.move(model_dir, nested)
    cut(nested / "model.safetensors", -1)
    with pytest.raises(ModelFolderError, match=re.escape(f"{nested / 'model.safetensors'} is cut short")):
        hf_mamba.MambaForCausalLM.from_pretrained(nested.parent, subfolder="lm")


def test_weights_file_named_directly(folder, transformers_never_runs):
    weights = folder() / "model.safetensors"
    cut(weights, -2)
    with pytest.raises(ModelFolderError, match=re.escape(f"{weights} is cut short")):
        hf_mamba.MambaForCausalLM.from_pretrained(weights)
    pickle = folder("pickle") / "pytorch_model.bin"
    with pytest.raises(ModelFolderError, match=re.escape(f"{pickle} is not a safetensors file")):
        hf_mamba.MambaForCausalLM.from_pretrained(pickle)


# ---------------------------------------------------------------------------------------------------------------
# What still loads


@pytest.mark.parametrize("kind", ["single", "sharded"])
def test_valid_folder_loads_bit_exactly(kind, saved, folder):
    _, model = saved
    model_dir = folder(kind)
    if kind == "sharded":
        assert len(list(model_dir.glob("model-*.safetensors"))) > 1
    assert_same_weights(hf_mamba.MambaForCausalLM.from_pretrained(model_dir), model)
    assert_same_weights(transformers.AutoModelForCausalLM.from_pretrained(model_dir), model)
    assert_same_weights(hf_mamba.MambaModel.from_pretrained(model_dir), model.backbone)


def test_sequence_classification_folder_loads_bit_exactly(tmp_path):
    model = tiny_model(hf_mamba.MambaForSequenceClassification)
    model.save_pretrained(tmp_path / "cls", max_shard_size="20KB")
    assert_same_weights(hf_mamba.MambaForSequenceClassification.from_pretrained(tmp_path / "cls"), model)


def test_pickle_weights_load_when_asked_for(saved, folder):
    _, model = saved
    model_dir = folder("pickle")
    assert_same_weights(hf_mamba.MambaForCausalLM.from_pretrained(model_dir, use_safetensors=False), model)
    auto = transformers.AutoModelForCausalLM.from_pretrained(model_dir, use_safetensors=False)
    assert_same_weights(auto, model)


def test_home_and_relative_paths_load(saved, folder, tmp_path, monkeypatch):
    """"~" is expanded (Transformers would read it as part of a repo id); "./x" resolves from the working folder."""
    _, model = saved
    model_dir = folder()
    monkeypatch.setenv("HOME", str(model_dir.parent))
    assert_same_weights(hf_mamba.MambaForCausalLM.from_pretrained(f"~/{model_dir.name}"), model)
    monkeypatch.chdir(model_dir.parent)
    assert_same_weights(hf_mamba.MambaForCausalLM.from_pretrained(f"./{model_dir.name}"), model)


@pytest.mark.parametrize("repo_id", ["someone/tiny-mamba", "tiny-mamba"])
def test_hub_id_reaches_transformers_unchanged(repo_id, tmp_path, monkeypatch):
    """Not on disk and a valid repo id: Transformers' own (offline) error, not ours."""
    assert os.environ.get("HF_HUB_OFFLINE") == "1"  # tests/conftest.py: no network
    monkeypatch.chdir(tmp_path)
    original, seen = transformers.PreTrainedModel.from_pretrained.__func__, []

    def spy(cls, name, *args, **kwargs):
        seen.append(name)
        return original(cls, name, *args, **kwargs)

    monkeypatch.setattr(transformers.PreTrainedModel, "from_pretrained", classmethod(spy))
    with pytest.raises(OSError) as raised:
        hf_mamba.MambaForCausalLM.from_pretrained(repo_id)
    assert seen == [repo_id]
    assert not isinstance(raised.value, ModelFolderError)
    assert "No such model folder" not in str(raised.value)


def test_hub_pickle_weights_load_only_when_asked_for(saved, tmp_path):
    """A Hub repo with only pytorch_model.bin: refused by default (safetensors required), loaded with
    use_safetensors=False. The repo is laid out as an offline Hub cache."""
    _, model = saved
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--someone--pickled-mamba"
    snapshot = repo / "snapshots" / commit
    model.save_pretrained(snapshot)
    torch.save(dict(model.state_dict()), snapshot / "pytorch_model.bin")  # Transformers 5 saves safetensors only
    (snapshot / "model.safetensors").unlink()
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    with pytest.raises(OSError, match="safetensors"):
        hf_mamba.MambaForCausalLM.from_pretrained("someone/pickled-mamba", cache_dir=tmp_path / "hub")
    loaded = hf_mamba.MambaForCausalLM.from_pretrained(
        "someone/pickled-mamba", cache_dir=tmp_path / "hub", use_safetensors=False
    )
    assert_same_weights(loaded, model)


# ---------------------------------------------------------------------------------------------------------------
# The helpers


@pytest.mark.parametrize(
    "name, local",
    [
        pytest.param("owner/name", False, id="hub-owner-name"),
        pytest.param("name", False, id="hub-name"),
        pytest.param("state-spaces/mamba-130m-hf", False, id="hub-mamba"),
        pytest.param("./name", True, id="dot-slash"),
        pytest.param("../name", True, id="dot-dot"),
        pytest.param("/abs/name", True, id="absolute"),
        pytest.param("~/name", True, id="home"),
        pytest.param("runs/demo/checkpoint-10", True, id="three-parts"),
        pytest.param("my model", True, id="space"),
        pytest.param(Path("owner/name"), True, id="path-object"),
    ],
)
def test_is_local_path(name, local, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert is_local_path(name) is local


def test_is_local_path_when_the_name_exists(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "owner" / "name").mkdir(parents=True)
    assert is_local_path("owner/name") and is_local_path("owner")


def write_raw_safetensors(path: Path, header: dict, data: bytes):
    raw = json.dumps(header).encode()
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + data)


@pytest.mark.parametrize(
    "header, data, problem",
    [
        pytest.param({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, bytes(8), None, id="whole"),
        pytest.param({"__metadata__": {"format": "pt"}}, b"", None, id="no-tensors"),
        pytest.param(
            {"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}},
            bytes(8),
            "has a corrupt header (tensor 'a': 8 bytes for F32 [3])",
            id="size-mismatch",
        ),
        pytest.param(
            {"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}},
            bytes(8),
            "has a corrupt header (tensor data overlaps or leaves gaps)",
            id="gap",
        ),
        pytest.param(
            {"a": {"dtype": "F32", "shape": [1]}},
            bytes(4),
            "has a corrupt header (tensor 'a': {'dtype': 'F32', 'shape': [1]})",
            id="no-offsets",
        ),
        pytest.param([1, 2], b"", "has a corrupt header (not a JSON object)", id="not-object"),
    ],
)
def test_safetensors_problem(header, data, problem, tmp_path):
    path = tmp_path / "x.safetensors"
    write_raw_safetensors(path, header, data)
    assert safetensors_problem(path) == problem
    if problem is None:
        assert read_safetensors_header(path) == header
    else:
        with pytest.raises(ModelFolderError, match=re.escape(f"{path} {problem}")):
            read_safetensors_header(path)


def word_tokenizer(words: int):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, **{f"w{i}": i + 1 for i in range(words - 1)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>")


def test_check_tokenizer_fits():
    model = tiny_model()  # 97 embedding rows
    check_tokenizer_fits(word_tokenizer(97), model)
    check_tokenizer_fits(word_tokenizer(50), model.config)  # fewer tokens than rows: padded vocabularies
    expected = (
        "the tokenizer has 100 tokens but the model embeds only 97 (vocab_size): ids 97 to 99 have no embedding; "
        "use the model's own tokenizer, or resize the model"
    )
    with pytest.raises(ValueError, match=re.escape(expected)):
        check_tokenizer_fits(word_tokenizer(100), model)
    with pytest.raises(ValueError, match=re.escape("--tokenizer t has 100 tokens but --model m embeds only 97")):
        check_tokenizer_fits(word_tokenizer(100), model.config, tokenizer_name="--tokenizer t", model_name="--model m")
    model.resize_token_embeddings(100)
    check_tokenizer_fits(word_tokenizer(100), model)


@needs_datasets  # train.py reads its text before it loads the model
def test_train_script_stops_with_one_line_naming_the_file(tmp_path):
    """scripts/train.py --model on a damaged folder: hf_mamba's check, as the script's one-line error."""
    train_script = load_script("train")
    config = hf_mamba.MambaConfig(vocab_size=300, hidden_size=16, state_size=4, num_hidden_layers=1)
    hf_mamba.MambaForCausalLM(config).save_pretrained(tmp_path / "lm")
    train_script.train_demo_tokenizer(train_script.DEMO_TEXT * 4, vocab_size=300).save_pretrained(tmp_path / "lm")
    weights = tmp_path / "lm" / "model.safetensors"
    cut(weights, -3)
    with pytest.raises(SystemExit) as stopped:
        train_script.main(["--model", str(tmp_path / "lm"), "--output-dir", str(tmp_path / "out"), "--max-steps", "1"])
    message = str(stopped.value.code)
    assert message.startswith(f"error: --model {tmp_path / 'lm'}: {weights} is cut short (") and "\n" not in message
