"""Every command and Python example of README.md and docs/recipes.md, run as written where it can run offline.

The code blocks are read from the markdown itself, so a changed or new command runs here and the docs cannot
drift from the code. Each document runs top to bottom in a folder of its own that holds what it names (tiny
model folders at its paths, data files); its Python blocks share one namespace, as a reader's session would.

- `python scripts/train.py ...` runs in-process with tiny sizes appended (argparse lets later flags win);
  commands that need the Hub (a Hub --model or --dataset, --push-to-hub) or are fragments (`...`) get their
  flags parsed instead, as on a machine with a bf16 GPU.
- `accelerate launch ... scripts/train.py ...`: flags parsed; two CPU processes run in
  tests/test_training.py::test_multi_gpu_benchmark_runs_one_and_two_processes.
- `python scripts/convert_checkpoint.py ...` runs as written; `python scripts/benchmark_multi_gpu.py ...` gets its
  flags parsed, as on a machine with 8 GPUs (tests/test_training.py runs it on CPU processes).
- Python blocks run as written, with pushes to the Hub landing in a local folder named by the repo id (which
  `from_pretrained` then reads), and `use_cpu=True` added beside `bf16=True` where there is no bf16 GPU, as
  the example's comment says. Names a block leaves to the reader (`dataset`, the kernel inputs) are given.
- Not run: the README's indented setup / main-job / test-suite commands (minutes; this test is in the suite).
- No FutureWarning may come out of a documented example (the deprecated names of Transformers 5.25).
"""

import json
import re
import shlex
import shutil
import warnings
from pathlib import Path

import pytest
import torch
import transformers
from _scripts import load_script, needs_datasets
from transformers.utils import is_torch_bf16_gpu_available

import hf_mamba
import hf_mamba.hub

ROOT = Path(__file__).resolve().parents[1]
DOCS = ["README.md", "docs/recipes.md"]


train_script, convert_script = load_script("train"), load_script("convert_checkpoint")
multi_gpu_script = load_script("benchmark_multi_gpu")

# Appended to every train.py command that runs: seconds instead of minutes.
TINY_TRAIN = [
    "--max-steps", "2",
    "--save-steps", "1",
    "--logging-steps", "1",
    "--block-size", "16",
    "--per-device-train-batch-size", "2",
    "--per-device-eval-batch-size", "4",
    "--max-eval-samples", "4",
]  # fmt: skip
TINY_DEMO_MODEL = ["--hidden-size", "16", "--num-hidden-layers", "1", "--vocab-size", "300"]


def code_blocks(text: str):
    """(language, first line number, body) of every fenced block."""
    for match in re.finditer(r"^```(\w*)\n(.*?)^```", text, re.M | re.S):
        yield match.group(1), text.count("\n", 0, match.start()) + 2, match.group(2)


def shell_commands(body: str):
    """Each command of a bash block as argv: continuation lines joined, comments dropped."""
    for line in body.replace("\\\n", " ").splitlines():
        if argv := shlex.split(line, comments=True):
            yield argv


# ---------------------------------------------------------------------------------------------------------------
# What the documents name


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """Folders and files at the paths the documents use, each tiny."""
    from datasets import Dataset

    root = tmp_path_factory.mktemp("doc-assets")
    texts = [line for _ in range(6) for line in train_script.DEMO_TEXT]
    tokenizer = train_script.train_demo_tokenizer(texts, vocab_size=300)
    tokenizer.pad_token = None  # as the GPT-NeoX tokenizer of the Mamba checkpoints: the README sets one
    tokenizer.save_pretrained(root / "my-tokenizer")
    fields = dict(vocab_size=len(tokenizer), hidden_size=32, state_size=8, num_hidden_layers=2, eos_token_id=0)
    torch.manual_seed(0)
    builtin = transformers.MambaForCausalLM(transformers.MambaConfig(**fields))
    for folder in ("path/to/transformers-format-mamba", "mamba-130m-hf"):  # Transformers' own "mamba" format
        builtin.save_pretrained(root / folder)
        tokenizer.save_pretrained(root / folder)
    convert_script.convert(root / "mamba-130m-hf", root / "mamba-130m", to="state-spaces")  # mamba_ssm's layout
    hf_mamba.MambaForCausalLM.from_pretrained(root / "mamba-130m-hf").save_pretrained(root / "my-mamba")
    tokenizer.save_pretrained(root / "my-mamba")
    (root / "data").mkdir()
    for name, field, rows in (("train", "text", texts), ("notes", "body", texts), ("notes-val", "body", texts[:8])):
        (root / "data" / f"{name}.jsonl").write_text("".join(json.dumps({field: row}) + "\n" for row in rows))

    ids = tokenizer(" ".join(texts))["input_ids"]
    rows = [ids[i : i + 16] for i in range(0, 32 * 16, 16)]
    A = -torch.rand(4, 3) - 0.5
    given = {  # the names the examples leave to the reader
        "dataset": Dataset.from_dict({"input_ids": rows, "labels": rows}),
        **dict(zip(("u", "delta", "z"), torch.randn(3, 1, 4, 5).unbind(0), strict=True)),
        "A": A,
        **dict(zip(("B", "C"), torch.randn(2, 1, 3, 5).unbind(0), strict=True)),
        "D": torch.randn(4),
        "delta_bias": torch.randn(4),
    }
    given["train_dataset"] = given["dataset"]
    return root, given


@pytest.fixture
def fake_hub(monkeypatch):
    """push_to_hub writes to ./<repo_id> (what from_pretrained(repo_id) then reads), never to the network."""

    def upload_folder(folder, repo_id, **kwargs):
        shutil.copytree(folder, Path(repo_id), dirs_exist_ok=True)

    def push_tokenizer(self, repo_id, **kwargs):
        self.save_pretrained(repo_id)

    monkeypatch.setattr(hf_mamba.hub, "upload_folder", upload_folder)
    monkeypatch.setattr(transformers.PreTrainedTokenizerBase, "push_to_hub", push_tokenizer)


# ---------------------------------------------------------------------------------------------------------------
# Running them


def needs_the_hub(args) -> bool:
    model = args[args.index("--model") + 1] if "--model" in args else None
    return "..." in args or "--push-to-hub" in args or "--dataset" in args or bool(
        model and not train_script._looks_like_path(model)
    )


def check_flags(args, monkeypatch) -> None:
    """train.py's parser accepts them, as on a machine with a bf16 GPU (--bf16, --fsdp)."""
    with monkeypatch.context() as patch:
        patch.setattr(torch.cuda, "is_available", lambda: True)
        patch.setattr(train_script, "is_torch_bf16_gpu_available", lambda: True)
        train_script.parse_args([arg for arg in args if arg != "..."])


def run_command(argv, monkeypatch) -> str:
    """Run (or check) one documented shell command; returns what was done."""
    if Path(argv[0]).name == "accelerate" and argv[1] == "launch":
        check_flags(argv[argv.index("scripts/train.py") + 1 :], monkeypatch)
        return "flags"
    python, script, *args = argv
    assert python in ("python", ".venv/bin/python"), argv
    if script == "scripts/convert_checkpoint.py":
        assert convert_script.main(args) == 0
        return "ran"
    if script == "scripts/benchmark_multi_gpu.py":  # GPUs and minutes: tests/test_training.py runs it on CPU
        with monkeypatch.context() as patch:
            patch.setattr(torch.cuda, "is_available", lambda: True)
            patch.setattr(torch.cuda, "device_count", lambda: 8)
            multi_gpu_script.parse_args(args)
        return "flags"
    assert script == "scripts/train.py", argv
    if needs_the_hub(args):
        check_flags(args, monkeypatch)
        return "flags"
    resuming = "--resume-from-checkpoint" in args
    tiny = [*TINY_TRAIN, *([] if "--model" in args else TINY_DEMO_MODEL)]
    if resuming:
        tiny += ["--max-steps", "3"]  # one step past the checkpoint the previous command left
    result = train_script.main([*args, *tiny])
    trainer = result["trainer"]
    assert trainer.state.global_step == (3 if resuming else 2)
    assert (result["eval_loss_before"] is None) == resuming
    assert (Path(trainer.args.output_dir) / "tokenizer.json").is_file()  # saved beside the model or adapter
    return "ran"


def run_python(body: str, namespace: dict) -> str:
    if not is_torch_bf16_gpu_available():
        body = body.replace("bf16=True,", "bf16=True, use_cpu=True,")  # what the example's comment says
    exec(compile(body, "<example>", "exec"), namespace)
    return "ran"


@needs_datasets  # the documented train.py commands load their text through it
@pytest.mark.parametrize("document", DOCS)
def test_documented_commands_run(document, assets, fake_hub, tmp_path, monkeypatch):
    root, given = assets
    shutil.copytree(root, tmp_path, dirs_exist_ok=True)
    if document == "README.md":
        shutil.rmtree(tmp_path / "my-mamba")  # the README's own example saves it, with its tokenizer
    monkeypatch.chdir(tmp_path)
    namespace = dict(given)
    done = []
    for language, line, body in code_blocks((ROOT / document).read_text()):
        assert language in ("bash", "python"), f"{document}:{line}: a ```{language} block this test cannot run"
        steps = list(shell_commands(body)) if language == "bash" else [body]
        for step in steps:
            where = f"{document}:{line}: {shlex.join(step) if language == 'bash' else 'python block'}"
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                try:
                    outcome = run_command(step, monkeypatch) if language == "bash" else run_python(step, namespace)
                except (Exception, SystemExit) as error:
                    raise AssertionError(f"{where} failed: {error!r}") from error
            future = [str(w.message) for w in caught if issubclass(w.category, FutureWarning)]
            assert not future, f"{where} warned: {future}"
            kind = "python" if language == "python" else next((a for a in step if a.startswith("scripts/")), step[0])
            done.append((outcome, kind, where))

    # Every fenced block was found (an unclosed or oddly written fence would hide the rest of the document).
    text = (ROOT / document).read_text()
    assert len(re.findall(r"^```", text, re.M)) == 2 * len(list(code_blocks(text)))
    ran = {kind for outcome, kind, _ in done if outcome == "ran"}
    assert {"scripts/train.py", "scripts/convert_checkpoint.py", "python"} <= ran, done
    if document == "README.md":
        assert (tmp_path / "share" / "tokenizer.json").is_file()
        assert isinstance(transformers.AutoModelForCausalLM.from_pretrained("share"), hf_mamba.MambaForCausalLM)
    else:
        pushed = {path.name for path in (tmp_path / "me" / "my-mamba").iterdir()}
        assert {"config.json", "model.safetensors", "modeling_mamba.py", "tokenizer.json"} <= pushed
