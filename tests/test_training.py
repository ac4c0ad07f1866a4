"""Training with the standard tools: Trainer, gradient checkpointing, resume, scripts/train.py, accelerate launch."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
import transformers
from _scripts import load_script, needs_datasets
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments, default_data_collator

import hf_mamba
from hf_mamba.compat import HAS_ACTIVATION_CHECKPOINTING, checkpointing_training_args, enable_activation_checkpointing

ROOT = Path(__file__).resolve().parents[1]
train_script = load_script("train")

TINY = dict(vocab_size=64, hidden_size=32, state_size=8, num_hidden_layers=2)
BLOCK = 24


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return hf_mamba.MambaForCausalLM(hf_mamba.MambaConfig(**TINY))


def counting_dataset(n=48):
    """Rows of (start + t) mod 16 (+ an offset): a pattern a tiny model learns within a few dozen steps."""
    from datasets import Dataset

    rows = [[(start + t) % 16 + 16 * (start % 3) for t in range(BLOCK)] for start in range(n)]
    return Dataset.from_dict({"input_ids": rows, "labels": rows})


def training_args(output_dir, **overrides):
    args = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=8,
        learning_rate=3e-3,
        max_steps=12,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=0,
        data_seed=0,
        disable_tqdm=True,
        dataloader_pin_memory=False,
    )
    args.update(overrides)
    return TrainingArguments(**args)


def is_checkpointing(model) -> bool:
    """The model's checkpointing flag by the installed release's name (5.25 warns on the old one)."""
    return model.is_activation_checkpointing if HAS_ACTIVATION_CHECKPOINTING else model.is_gradient_checkpointing


def train_losses(trainer):
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


@needs_datasets
def test_trainer_lowers_loss(tmp_path):
    data = counting_dataset()
    model = tiny_model()
    batch = default_data_collator([data[i] for i in range(16)])
    with torch.no_grad():
        before = model(**batch).loss.item()
    trainer = Trainer(model=model, args=training_args(tmp_path, max_steps=30), train_dataset=data)
    trainer.train()
    with torch.no_grad():
        after = model(**batch).loss.item()
    assert after < 0.5 * before, (before, after)
    assert train_losses(trainer)[-1] < train_losses(trainer)[0]


@needs_datasets
def test_resume_matches_uninterrupted_run(tmp_path):
    data = counting_dataset()
    full = Trainer(
        model=tiny_model(),
        args=training_args(tmp_path / "full", save_strategy="steps", save_steps=6),
        train_dataset=data,
    )
    full.train()
    assert (tmp_path / "full" / "checkpoint-6").is_dir()

    # A fresh model with other weights: everything must come from the checkpoint.
    resumed = Trainer(model=tiny_model(seed=1), args=training_args(tmp_path / "resumed"), train_dataset=data)
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-6"))
    assert resumed.state.global_step == 12
    # The log history comes back from the checkpoint; steps 7..12 are the ones trained after resuming.
    full_losses, resumed_losses = train_losses(full), train_losses(resumed)
    assert len(full_losses) == len(resumed_losses) == 12
    torch.testing.assert_close(torch.tensor(resumed_losses), torch.tensor(full_losses), rtol=1e-5, atol=1e-6)
    for (name, a), b in zip(full.model.named_parameters(), resumed.model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def saved_activation_bytes(model, batch) -> int:
    """Bytes of the tensors autograd keeps for backward during one forward (the activation memory)."""
    total = 0

    def pack(tensor):
        nonlocal total
        total += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(**batch)
    return total


@needs_datasets
def test_gradient_checkpointing_same_loss_and_gradients(tmp_path):
    batch = default_data_collator([counting_dataset()[i] for i in range(4)])
    plain, checkpointed = tiny_model(), tiny_model()
    enable_activation_checkpointing(checkpointed)
    assert is_checkpointing(checkpointed) and not is_checkpointing(plain)
    plain.train()
    checkpointed.train()
    loss_plain, loss_checkpointed = plain(**batch).loss, checkpointed(**batch).loss
    loss_plain.backward()
    loss_checkpointed.backward()
    assert loss_plain.item() == loss_checkpointed.item()
    for (name, a), b in zip(plain.named_parameters(), checkpointed.parameters(), strict=True):
        assert a.grad is not None and b.grad is not None, name
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-7, msg=name)

    # Less kept for backward: only block inputs are saved, activations inside the blocks are recomputed.
    assert saved_activation_bytes(checkpointed, batch) < 0.5 * saved_activation_bytes(plain, batch)

    # ... and through TrainingArguments: the same losses step for step.
    runs = {}
    for flag in (False, True):
        trainer = Trainer(
            model=tiny_model(),
            args=training_args(tmp_path / str(flag), max_steps=4, **checkpointing_training_args(flag)),
            train_dataset=counting_dataset(),
        )
        trainer.train()
        assert is_checkpointing(trainer.model) == flag
        runs[flag] = train_losses(trainer)
    torch.testing.assert_close(torch.tensor(runs[True]), torch.tensor(runs[False]), rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def local_assets(tmp_path_factory):
    """A saved tiny hf_mamba model with its tokenizer, and json / parquet / text data files."""
    from datasets import Dataset

    folder = tmp_path_factory.mktemp("assets")
    texts = [line for _ in range(12) for line in train_script.DEMO_TEXT]
    tokenizer = train_script.train_demo_tokenizer(texts, vocab_size=300)
    tokenizer.save_pretrained(folder / "model")
    fields = dict(vocab_size=len(tokenizer), hidden_size=32, state_size=8, num_hidden_layers=2, eos_token_id=0)
    config = hf_mamba.MambaConfig(**fields, pad_token_id=0)
    torch.manual_seed(0)
    model = hf_mamba.MambaForCausalLM(config)
    model.save_pretrained(folder / "model")
    # The same weights as Transformers' built-in "mamba" (what state-spaces/mamba-*-hf on the Hub are).
    builtin = transformers.MambaForCausalLM(transformers.MambaConfig(**fields, pad_token_id=0))
    builtin.load_state_dict(model.state_dict())
    builtin.save_pretrained(folder / "model" / "transformers")
    with open(folder / "train.jsonl", "w") as f:
        for text in texts:
            f.write(json.dumps({"content": text}) + "\n")
    Dataset.from_dict({"text": texts}).to_parquet(str(folder / "train.parquet"))
    (folder / "valid.txt").write_text("\n".join(train_script.DEMO_TEXT) + "\n")
    return folder


@needs_datasets
def test_train_script_full_finetune_and_push(local_assets, tmp_path, monkeypatch):
    uploads = []

    class Repo:
        repo_id = "me/tiny"

    def fake_upload_folder(self, *, repo_id, folder_path, ignore_patterns=None, **kwargs):
        from huggingface_hub.utils import filter_repo_objects

        files = [str(p.relative_to(folder_path)) for p in Path(folder_path).rglob("*") if p.is_file()]
        uploads.append((repo_id, sorted(filter_repo_objects(files, ignore_patterns=ignore_patterns))))

    monkeypatch.setattr("huggingface_hub.HfApi.create_repo", lambda self, repo_id, **kwargs: Repo())
    monkeypatch.setattr("huggingface_hub.HfApi.upload_folder", fake_upload_folder)
    out = tmp_path / "run"
    argv = [
        "--model", str(local_assets / "model"),
        "--train-file", str(local_assets / "train.jsonl"),
        "--text-column", "content",
        "--block-size", "32",
        "--max-steps", "8",
        "--save-steps", "4",
        "--learning-rate", "3e-3",
        "--per-device-train-batch-size", "4",
        "--output-dir", str(out),
        "--push-to-hub", "--hub-model-id", "me/tiny",
        "--use-cpu",
    ]  # fmt: skip
    result = train_script.main(argv)
    assert result["eval_loss_after"] < result["eval_loss_before"]
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert isinstance(reloaded, hf_mamba.MambaForCausalLM)
    card = (out / "README.md").read_text()
    assert "perplexity" in card and f"{math.exp(result['eval_loss_after']):.4g}" in card

    [(repo_id, files)] = uploads
    assert repo_id == "me/tiny"
    assert {"config.json", "model.safetensors", "README.md", "modeling_mamba.py", "tokenizer.json"} <= set(files)
    assert not [f for f in files if f.startswith("checkpoint-")]


@needs_datasets
def test_train_script_lora_checkpointing_and_resume(local_assets, tmp_path):
    out = tmp_path / "lora"
    argv = [
        "--model", str(local_assets / "model"),
        "--train-file", str(local_assets / "train.parquet"),
        "--validation-file", str(local_assets / "train.parquet"),
        "--block-size", "32",
        "--max-steps", "4",
        "--save-steps", "2",
        "--per-device-train-batch-size", "4",
        "--lora", "--lora-r", "4",
        "--gradient-checkpointing",
        "--output-dir", str(out),
        "--use-cpu",
    ]  # fmt: skip
    first = train_script.main(argv)
    assert (out / "adapter_model.safetensors").exists() and not (out / "model.safetensors").exists()
    assert first["eval_loss_after"] < first["eval_loss_before"]
    assert is_checkpointing(first["trainer"].model.base_model.model)

    # Resume from the latest checkpoint (step 4) and train on to step 6.
    argv[argv.index("--max-steps") + 1] = "6"
    resumed = train_script.main([*argv, "--resume-from-checkpoint", "latest"])
    assert resumed["eval_loss_before"] is None
    assert resumed["trainer"].state.global_step == 6


@needs_datasets
def test_train_script_text_files_without_packing(local_assets, tmp_path):
    """Also bf16 autocast, and a Transformers-format "mamba" folder as the start: trained and saved as hf_mamba."""
    builtin = transformers.MambaForCausalLM.from_pretrained(local_assets / "model" / "transformers")
    assert builtin.config.model_type == "mamba"
    argv = [
        "--model", str(local_assets / "model" / "transformers"),
        "--tokenizer", str(local_assets / "model"),
        "--train-file", str(local_assets / "valid.txt"),
        "--no-packing",
        "--bf16",
        "--block-size", "16",
        "--max-steps", "2",
        "--per-device-train-batch-size", "4",
        "--output-dir", str(tmp_path / "txt"),
        "--use-cpu",
    ]  # fmt: skip
    result = train_script.main(argv)
    assert math.isfinite(result["eval_loss_after"])
    assert result["trainer"].state.num_input_tokens_seen > 0
    assert type(result["trainer"].model) is hf_mamba.MambaForCausalLM
    assert json.loads((tmp_path / "txt" / "config.json").read_text())["model_type"] == "hf_mamba"


@needs_datasets
@needs_datasets
def test_multi_gpu_benchmark_runs_one_and_two_processes(tmp_path, capsys):
    """scripts/benchmark_multi_gpu.py on CPU (gloo): train.py under accelerate launch with 1 and 2 processes,
    the same global batch (each process half of it): the same loss, and the table with both runs; the 2-process
    run's halfway checkpoint resumes on 1 process to the uninterrupted run's evaluation."""
    script = load_script("benchmark_multi_gpu")
    rows = script.main(
        ["--shape", "tiny", "--processes", "1,2", "--max-steps", "4", "--global-batch", "4", "--block-size", "32",
         "--logging-steps", "1", "--resume-check", "--keep", str(tmp_path)]
    )  # fmt: skip
    assert not [row for row in rows if "failed" in row], rows  # the launch's stderr is in the captured output
    rows, (resumed,) = rows[:2], rows[2:]
    assert [(row["mode"], row["processes"], row["world_size"], row["steps"]) for row in rows] == [
        ("ddp", 1, 1, 4), ("ddp", 2, 2, 4)
    ]
    assert (resumed["processes"], resumed["saved_on"], resumed["steps"]) == (1, 2, 4)
    assert resumed["perplexity"] == pytest.approx(rows[1]["perplexity"], rel=1e-3)
    # the same sequences make each step's global batch (the sampler's order, split over the processes)
    assert abs(rows[0]["loss"] - rows[1]["loss"]) < 1e-3, rows
    assert all(row["tokens_per_s"] > 0 and row["tokens_seen"] == 4 * 4 * 32 for row in rows)  # steps x batch x block
    # each run saved a folder that loads back through the Auto classes
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ddp-2")
    assert isinstance(reloaded, hf_mamba.MambaForCausalLM)
    table = capsys.readouterr().out
    assert "| ddp | 2 | 2 |" in table and "CPU (gloo); tiny shape" in table and "| ddp | 2 | 1 |" in table


def run_two_workers(tmp_path, source, *args, **env):
    """worker.py (source) in two CPU processes over gloo (torch.distributed.run), with these arguments and
    environment variables; fails the test with their stderr if they fail."""
    (tmp_path / "worker.py").write_text(source)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command += [str(tmp_path / "worker.py"), *map(str, args)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", **env}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]


def train_in_one_process(model, optimizer, input_ids, steps):
    """`steps` optimizer steps on the language-model loss of input_ids: what the workers' runs are compared with."""
    for _ in range(steps):
        model(input_ids=input_ids, labels=input_ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def assert_same_weights(state, model, rtol, atol):
    for name, param in model.state_dict().items():
        torch.testing.assert_close(state[name], param, rtol=rtol, atol=atol, msg=name)


DDP_DRY_PASS_WORKER = """
import os
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import hf_mamba
from hf_mamba import modeling_mamba

torch.set_num_threads(1)
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
# As on CUDA: the first training step's dry pass (compile_ahead would run it with every launch compiling only).
passes = []
modeling_mamba.MambaPreTrainedModel._compiles_ahead_on = staticmethod(lambda device: True)


def run_dry_pass(fn, *args):
    passes.append(1)
    with torch.no_grad():
        fn(*args)
    return True


modeling_mamba.compile_ahead = run_dry_pass
torch.manual_seed(0)
model = hf_mamba.MambaForCausalLM(hf_mamba.MambaConfig(**{tiny}))
ddp = DistributedDataParallel(model, find_unused_parameters=False)
optimizer = torch.optim.SGD(ddp.parameters(), lr=0.1)
ids = torch.load(sys.argv[1]).chunk(world)[rank]
ddp(input_ids=ids, labels=ids).loss.backward()  # the first step: the pass, then the real backward's reduction
optimizer.step()
assert passes == [1], passes
if rank == 0:
    torch.save(model.state_dict(), sys.argv[2])
dist.barrier()
dist.destroy_process_group()
sys.stdout.flush()
os._exit(0)
"""


INTERPRETER_LOOP_PROBE = """
import torch, triton, triton.language as tl

@triton.jit
def fill(p, n):
    for i in range(n):
        tl.store(p + i, i)

fill[(1,)](torch.zeros(2), 2)
"""


def interpreter_runs_loops():
    """Whether Triton's interpreter, in a fresh process, runs a loop over a runtime bound. Triton 3.6's does
    not with NumPy 2.4 (it converts the bound's 1-element array to an int, which NumPy 2.4 refuses)."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run([sys.executable, "-c", INTERPRETER_LOOP_PROBE], env=env, capture_output=True).returncode == 0


def test_ddp_first_step_dry_pass_leaves_the_gradient_reduction_alone(tmp_path, monkeypatch):
    """Under DDP the first training step's dry pass (MambaModel._compile_training_ahead, on the fused Triton
    path) takes gradients without DDP's reduction hooks firing: two CPU processes (gloo, find_unused_parameters
    off, where a hook firing twice is an error) take the first step to the weights one process reaches."""
    if torch.cuda.is_available() and not interpreter_runs_loops():  # on CPU the whole suite relies on it
        pytest.skip("this Triton's interpreter cannot run the kernels' loops (seen with Triton 3.6 and NumPy 2.4)")
    ids = torch.randint(TINY["vocab_size"], (4, 9), generator=torch.Generator().manual_seed(0))
    torch.save(ids, tmp_path / "ids.pt")
    config = {**TINY, "hidden_size": 16, "state_size": 4}  # the fused kernels run under the interpreter here
    run_two_workers(
        tmp_path, DDP_DRY_PASS_WORKER.replace("{tiny}", repr(config)), tmp_path / "ids.pt", tmp_path / "state.pt",
        HF_MAMBA_BACKEND="triton", TRITON_INTERPRET="1",
    )
    monkeypatch.setenv("HF_MAMBA_BACKEND", "triton")
    torch.manual_seed(0)
    model = hf_mamba.MambaForCausalLM(hf_mamba.MambaConfig(**config))
    train_in_one_process(model, torch.optim.SGD(model.parameters(), lr=0.1), ids, steps=1)
    assert_same_weights(torch.load(tmp_path / "state.pt"), model, rtol=1e-5, atol=1e-6)


FSDP_WORKER = """
import os
import sys

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_state_dict
from torch.distributed.fsdp import fully_shard

import hf_mamba

torch.set_num_threads(1)
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
torch.manual_seed(0)
model = hf_mamba.MambaForCausalLM(hf_mamba.MambaConfig(**{tiny}))
# The policy Accelerate's and the Trainer's FSDP auto-wrap use by default: every _no_split_modules class.
wrapped = [m for m in model.modules() if type(m).__name__ in model._no_split_modules]
for module in wrapped:
    fully_shard(module)
fully_shard(model)
assert wrapped and all(type(m).__name__ == "FSDPMambaBlock" for m in wrapped)
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
input_ids = torch.load(sys.argv[1])
shard = input_ids.chunk(world)[rank]
for _ in range(3):
    model(input_ids=shard, labels=shard).loss.backward()
    optimizer.step()
    optimizer.zero_grad()
state_dict = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
if rank == 0:
    torch.save(state_dict, sys.argv[2])
# A sharded checkpoint (each rank writes its shards), for resuming on another number of processes.
model_state, optimizer_state = get_state_dict(model, optimizer)
dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=sys.argv[3])
dist.barrier()  # no rank tears gloo down while another still talks to it
dist.destroy_process_group()
# Everything is written: skip the interpreter's teardown, where a loaded machine once saw a background
# thread's destructor abort the process ("terminate called without an active exception").
sys.stdout.flush()
os._exit(0)
"""


# resuming in one process with no process group is the point; torch warns that it assumes so
@pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")
def test_fsdp_wraps_mamba_blocks_and_trains_like_one_process(tmp_path):
    """Two CPU processes (gloo), each MambaBlock an FSDP2 unit: same weights after 3 steps as one process;
    their sharded checkpoint (model and optimizer) resumes in one process, 2 more steps as uninterrupted.

    The Trainer applies FSDP only on accelerators (Accelerate runs CPU processes as DDP), so this drives
    torch's fully_shard directly with the wrapping policy the Trainer would use.
    """
    input_ids = torch.randint(TINY["vocab_size"], (4, 16), generator=torch.Generator().manual_seed(0))
    torch.save(input_ids, tmp_path / "ids.pt")
    run_two_workers(
        tmp_path, FSDP_WORKER.replace("{tiny}", repr(TINY)), tmp_path / "ids.pt", tmp_path / "state.pt",
        tmp_path / "dcp",
    )
    model = tiny_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    train_in_one_process(model, optimizer, input_ids, steps=3)
    assert_same_weights(torch.load(tmp_path / "state.pt"), model, rtol=1e-4, atol=1e-5)

    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    resumed = tiny_model(seed=1)  # other weights: the checkpoint must overwrite them all
    resumed_optimizer = torch.optim.AdamW(resumed.parameters(), lr=1e-2)
    model_state, optimizer_state = get_state_dict(resumed, resumed_optimizer)  # allocates the optimizer state
    state = {"model": model_state, "optimizer": optimizer_state}
    dcp.load(state, checkpoint_id=tmp_path / "dcp")  # one process, no process group
    set_state_dict(resumed, resumed_optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    for net, opt in ((model, optimizer), (resumed, resumed_optimizer)):
        train_in_one_process(net, opt, input_ids, steps=2)
    assert_same_weights(resumed.state_dict(), model, rtol=1e-4, atol=1e-5)
