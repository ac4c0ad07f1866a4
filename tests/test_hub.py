"""Sharing: Hub-ready folders (safetensors, sharding, model card, remote code), push_to_hub, pipeline, streamer."""

import ast
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from _scripts import load_script
from huggingface_hub import ModelCard
from transformers import AutoModelForCausalLM, TextStreamer, pipeline

import hf_mamba
from hf_mamba.hub import AUTO_MAP, remote_code_sources

TINY = dict(vocab_size=300, hidden_size=32, state_size=8, num_hidden_layers=2)


def tiny_model(cls=hf_mamba.MambaForCausalLM, **config_kwargs):
    torch.manual_seed(0)
    return cls(hf_mamba.MambaConfig(**TINY, **config_kwargs)).eval()


def input_ids():
    return torch.randint(TINY["vocab_size"], (2, 9), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def tokenizer():
    train_script = load_script("train")
    return train_script.train_demo_tokenizer(train_script.DEMO_TEXT * 4, vocab_size=TINY["vocab_size"])


CARD = dict(
    model_name="tiny-mamba",
    base_model="state-spaces/mamba-130m-hf",
    datasets=["wikitext"],
    license="mit",
    tags=["demo"],
    eval_results={"perplexity": 12.5},
)


def test_save_pretrained_writes_hub_ready_folder(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path, model_card=CARD)
    files = {p.name for p in tmp_path.iterdir()}
    assert {"config.json", "model.safetensors", "README.md", "generation_config.json"} <= files
    assert set(remote_code_sources()) <= files
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["auto_map"] == AUTO_MAP and config["model_type"] == "hf_mamba"

    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.library_name == "transformers"
    assert card.data.pipeline_tag == "text-generation"
    assert card.data.license == "mit"
    assert card.data.base_model == "state-spaces/mamba-130m-hf"
    assert card.data.datasets == ["wikitext"]
    assert {"hf_mamba", "mamba", "demo"} <= set(card.data.tags)
    [result] = card.data.eval_results
    assert (result.metric_type, result.metric_value, result.dataset_name) == ("perplexity", 12.5, "wikitext")
    for number in (
        "| hidden_size (d_model) | 32 |",
        "| num_hidden_layers (n_layer) | 2 |",
        "| state_size (d_state) | 8 |",
    ):
        assert number in card.text
    assert f"| parameters | {model.num_parameters():,} |" in card.text
    assert "trust_remote_code=True" in card.text and "| perplexity | 12.5 |" in card.text


def test_sequence_classification_card(tmp_path):
    tiny_model(hf_mamba.MambaForSequenceClassification, num_labels=2).save_pretrained(tmp_path)
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.pipeline_tag == "text-classification"
    assert "AutoModelForSequenceClassification" in card.text


def test_sharded_safetensors(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and all((tmp_path / shard).exists() for shard in shards)
    assert not (tmp_path / "model.safetensors").exists()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids()).logits, model(input_ids()).logits)


def test_remote_code_is_self_contained():
    sources = remote_code_sources()
    assert {"configuration_mamba.py", "modeling_mamba.py", "cache.py", "kernels.py"} <= set(sources)
    for filename, source in sources.items():
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                assert node.module.split(".")[0] != "hf_mamba", filename
            if isinstance(node, ast.ImportFrom) and node.level > 0:
                # Transformers' loader only resolves flat sibling modules.
                assert node.level == 1 and f"{node.module}.py" in sources, (filename, node.module)
            if isinstance(node, ast.Import):
                assert all(alias.name.split(".")[0] != "hf_mamba" for alias in node.names), filename


REMOTE_LOAD = textwrap.dedent(
    """
    import sys

    class Block:
        # A Hub user who never installed hf_mamba, on a CPU-only torch without triton.
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("hf_mamba", "triton"):
                raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)")

    sys.meta_path.insert(0, Block())
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    folder, seq_cls_folder, ids_path, out_path = sys.argv[1:]
    try:
        import hf_mamba
    except ModuleNotFoundError:
        pass
    else:
        raise SystemExit("hf_mamba is importable")
    ids = torch.load(ids_path)
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    classifier = AutoModelForSequenceClassification.from_pretrained(seq_cls_folder, trust_remote_code=True).eval()
    with torch.no_grad():
        result = {
            "module": type(model).__module__,
            "logits": model(ids).logits,
            "generated": model.generate(ids, max_new_tokens=4, do_sample=False),
            "class_logits": classifier(ids).logits,
        }
    assert "hf_mamba" not in sys.modules and "triton" not in sys.modules
    torch.save(result, out_path)
    """
)


def as_hub_cache(folder: Path, cache: Path, repo_id: str) -> str:
    """Lay `folder` out as a downloaded Hub repo, so an offline from_pretrained(repo_id) takes the Hub path
    (which, unlike a local folder, fetches and checks the imports of every remote-code file)."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(folder, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return repo_id


def test_remote_code_loads_without_hf_mamba(tmp_path):
    model, classifier = tiny_model(), tiny_model(hf_mamba.MambaForSequenceClassification, num_labels=3)
    model.save_pretrained(tmp_path / "lm")
    classifier.save_pretrained(tmp_path / "cls")
    repo_id = as_hub_cache(tmp_path / "lm", tmp_path / "hub", "me/tiny-mamba")
    ids = input_ids()
    torch.save(ids, tmp_path / "ids.pt")
    (tmp_path / "load.py").write_text(REMOTE_LOAD)
    env = {
        **os.environ,
        "HF_MODULES_CACHE": str(tmp_path / "modules"),
        "HF_HUB_CACHE": str(tmp_path / "hub"),
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
    }
    command = [sys.executable, str(tmp_path / "load.py"), repo_id, str(tmp_path / "cls")]
    command += [str(tmp_path / "ids.pt"), str(tmp_path / "out.pt")]
    # cwd outside the repository, so nothing but the saved folder can provide the code.
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]

    remote = torch.load(tmp_path / "out.pt")
    assert remote["module"].startswith("transformers_modules.")
    with torch.no_grad():
        torch.testing.assert_close(remote["logits"], model(ids).logits, rtol=0, atol=0)
        torch.testing.assert_close(remote["class_logits"], classifier(ids).logits, rtol=0, atol=0)
    assert torch.equal(remote["generated"], model.generate(ids, max_new_tokens=4, do_sample=False))


@pytest.fixture
def fake_hub(monkeypatch):
    """HfApi without the network: records what each upload_folder call would send."""
    uploads = []

    class Repo:
        def __init__(self, repo_id):
            self.repo_id = repo_id

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        folder = Path(folder_path)
        files = {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
        uploads.append({"repo_id": repo_id, "files": files, **kwargs})

    monkeypatch.setattr("huggingface_hub.HfApi.create_repo", lambda self, repo_id, **kwargs: Repo(repo_id))
    monkeypatch.setattr("huggingface_hub.HfApi.upload_folder", upload_folder)
    return uploads


def test_push_to_hub_uploads_the_saved_folder(tmp_path, fake_hub):
    model = tiny_model()
    card = {**CARD, "repo_id": "me/tiny-mamba"}
    model.save_pretrained(tmp_path / "saved", model_card=card)
    model.push_to_hub("me/tiny-mamba", model_card=CARD, commit_message="first")

    [upload] = fake_hub
    assert upload["repo_id"] == "me/tiny-mamba" and upload["commit_message"] == "first"
    saved = {p.name: p.read_bytes() for p in (tmp_path / "saved").iterdir()}
    assert upload["files"].keys() == saved.keys()
    for name, content in saved.items():
        assert upload["files"][name] == content, name  # our card, not Transformers' generic one

    assert 'from_pretrained("me/tiny-mamba", trust_remote_code=True)' in upload["files"]["README.md"].decode()

    # save_pretrained(push_to_hub=True) sends the same folder.
    model.save_pretrained(tmp_path / "pushed", push_to_hub=True, repo_id="me/other", model_card=card)
    assert fake_hub[1]["repo_id"] == "me/other"
    assert fake_hub[1]["files"].keys() == saved.keys()


def test_pipeline_from_a_saved_folder(tokenizer, tmp_path):
    model = tiny_model(pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    generator = pipeline("text-generation", model=str(tmp_path))
    assert type(generator.model) is hf_mamba.MambaForCausalLM
    [result] = generator("The selective scan", max_new_tokens=4, do_sample=False)
    assert result["generated_text"].startswith("The selective scan")


def test_pipeline_and_text_streamer(tokenizer, capsys):
    model = tiny_model(
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id
    )
    generator = pipeline("text-generation", model=model, tokenizer=tokenizer)
    [result] = generator("The selective scan", max_new_tokens=5, do_sample=False)
    prompt_ids = tokenizer("The selective scan", return_tensors="pt").input_ids
    expected = model.generate(prompt_ids, max_new_tokens=5, do_sample=False)
    assert result["generated_text"] == tokenizer.decode(expected[0], skip_special_tokens=True)

    capsys.readouterr()
    streamer = TextStreamer(tokenizer, skip_prompt=True)
    streamed = model.generate(prompt_ids, max_new_tokens=5, do_sample=False, streamer=streamer)
    assert torch.equal(streamed, expected)
    printed = capsys.readouterr().out
    assert printed.strip() == tokenizer.decode(expected[0, prompt_ids.shape[1] :]).strip()
