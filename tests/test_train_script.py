"""scripts/train.py's guard rails: bad flags and data, tokenizers, interrupts and resuming from checkpoints."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _scripts import load_script, needs_datasets
from safetensors.torch import save_file

import hf_mamba

ROOT = Path(__file__).resolve().parents[1]
train_script = load_script("train")

# The offline demo (no --model), shrunk: a 1-layer model, a few steps of 16-token blocks, about a second.
TINY_DEMO = [
    "--hidden-size", "16",
    "--num-hidden-layers", "1",
    "--state-size", "4",
    "--vocab-size", "300",
    "--block-size", "16",
    "--per-device-train-batch-size", "4",
    "--max-eval-samples", "4",
    "--logging-steps", "1",
    "--save-steps", "100",
]  # fmt: skip


def losses(trainer):
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def run_error(argv, capsys=None) -> str:
    """The one-line message train.py stops with (parse errors print it and exit 2; data errors exit 1)."""
    with pytest.raises(SystemExit) as stopped:
        train_script.main(argv)
    if stopped.value.code == 2:  # argparse: message on stderr
        message = capsys.readouterr().err
    else:
        message = str(stopped.value.code)
    assert message.strip() and "\n" not in message.strip(), message
    return message


# ---------------------------------------------------------------------------------------------------------------
# Flags and data


def write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def loads_text(case, expected, id):
    """A case that only goes wrong once train.py loads the text (through datasets)."""
    return pytest.param(case, expected, id=id, marks=needs_datasets)


@pytest.mark.parametrize(
    "case, expected",
    [
        pytest.param("block_size_0", r"--block-size: must be a positive integer, got 0", id="block-size-0"),
        pytest.param("batch_size_0", r"--per-device-train-batch-size: must be a positive", id="batch-size-0"),
        pytest.param("missing_file", r"--train-file \S+nope.txt: no such file", id="missing-file"),
        pytest.param("empty_file", r"--train-file \S+empty.jsonl is empty", id="empty-file"),
        loads_text("no_text_field", r"row 2 of --train-file \S+rows.jsonl .*no 'text' field", id="row-no-text"),
        loads_text("number_text", r"row 1 of --train-file \S+numbers.jsonl .*holds 5, not text", id="row-number"),
        loads_text("wrong_column", r"--text-column 'body' is not a field of --train-file", id="wrong-column"),
        loads_text("tiny_file", r"--train-file \S+tiny.txt has 1 row\(s\): too few .*--validation-split", id="tiny"),
        loads_text("blank_file", r"--train-file \S+blank.txt holds no text", id="blank-file"),
        loads_text("short_data", r"makes no train sequence of --block-size 4096 tokens", id="short-for-block"),
        loads_text("short_validation", r"--validation-file \S+ makes no validation sequence", id="short-validation"),
        pytest.param("missing_model", r"--model ./no-such-model: no such folder", id="missing-model"),
        pytest.param("split_percentage", r"--validation-split-percentage must be in \(0, 100\)", id="split-100"),
        pytest.param("growth_without_fp16", r"--scaler-growth-interval .* needs --fp16", id="growth-no-fp16"),
        pytest.param("init_scale_without_fp16", r"--scaler-init-scale .* needs --fp16", id="init-scale-no-fp16"),
        pytest.param("init_scale_0", r"--scaler-init-scale: must be a positive finite number", id="init-scale-0"),
        pytest.param("fsdp_ckpt_without_fsdp", r"--fsdp-activation-checkpointing .* needs --fsdp", id="fsdp-ckpt"),
    ],
)
def test_bad_flags_and_data_stop_with_one_line(case, expected, tmp_path, capsys):
    long_text = "\n".join(train_script.DEMO_TEXT) + "\n"
    argv = {
        "block_size_0": ["--block-size", "0"],
        "batch_size_0": ["--per-device-train-batch-size", "0"],
        "missing_file": ["--train-file", str(tmp_path / "nope.txt")],
        "empty_file": ["--train-file", write(tmp_path / "empty.jsonl", "")],
        "no_text_field": ["--train-file", write(tmp_path / "rows.jsonl", '{"text": "a"}\n{"text": "b"}\n{"t": 1}\n')],
        "number_text": ["--train-file", write(tmp_path / "numbers.jsonl", '{"text": "a b"}\n{"text": 5}\n')],
        "wrong_column": ["--train-file", write(tmp_path / "a.jsonl", '{"text": "a"}\n'), "--text-column", "body"],
        "tiny_file": ["--train-file", write(tmp_path / "tiny.txt", "one line\n")],
        "blank_file": ["--train-file", write(tmp_path / "blank.txt", " \n\n  \n")],
        "short_data": ["--train-file", write(tmp_path / "short.txt", long_text), "--block-size", "4096"],
        "short_validation": [
            "--train-file", write(tmp_path / "train.txt", long_text * 8),
            "--validation-file", write(tmp_path / "val.txt", "short\n"),
            "--block-size", "64",
        ],  # fmt: skip
        "missing_model": ["--model", "./no-such-model"],
        "split_percentage": ["--validation-split-percentage", "100"],
        "growth_without_fp16": ["--scaler-growth-interval", "100"],
        "init_scale_without_fp16": ["--scaler-init-scale", "512"],
        "init_scale_0": ["--fp16", "--scaler-init-scale", "0"],
        "fsdp_ckpt_without_fsdp": ["--fsdp-activation-checkpointing"],
    }[case]
    message = run_error([*argv, "--output-dir", str(tmp_path / "out"), "--max-steps", "1"], capsys)
    assert re.search(expected, message), message


def test_loss_scaling_flags_reach_the_grad_scaler():
    """--scaler-growth-interval and --scaler-init-scale set the GradScaler the Trainer's accelerator made for
    --fp16, before its first step, and leave its other settings; bf16 and fp32 runs have none: nothing to set."""
    from types import SimpleNamespace

    scaler = torch.amp.GradScaler("cpu", growth_factor=3.0)
    train_script.set_loss_scaling(SimpleNamespace(scaler=scaler), 100, 512)
    assert (scaler.get_growth_interval(), scaler.get_scale(), scaler.get_growth_factor()) == (100, 512.0, 3.0)
    train_script.set_loss_scaling(SimpleNamespace(scaler=scaler), None, None)  # nothing given: as it was
    assert (scaler.get_growth_interval(), scaler.get_scale()) == (100, 512.0)
    # the first step starts from the scale set
    weight = torch.nn.Parameter(torch.ones(2))
    scaler.scale(weight.sum()).backward()
    assert torch.equal(weight.grad, torch.full((2,), 512.0))
    train_script.set_loss_scaling(SimpleNamespace(scaler=None), 100, 512)
    args = train_script.parse_args(["--fp16", "--scaler-growth-interval", "100", "--scaler-init-scale", "1024"])
    assert (args.fp16, args.scaler_growth_interval, args.scaler_init_scale) == (True, 100, 1024.0)


def test_tokens_per_second_per_log_and_after_the_first(monkeypatch):
    """Each training log gets the rate since the one before (the first: since training began); the summary's
    steady rate runs from the first log to the last, leaving out the first interval's compiles."""
    from types import SimpleNamespace

    clock = iter([0.0, 10.0, 11.0, 13.0])  # train begin, then three logs
    monkeypatch.setattr(train_script.time, "perf_counter", lambda: next(clock))
    callback = train_script.TokensPerSecondCallback()
    state = SimpleNamespace(num_input_tokens_seen=0)
    callback.on_train_begin(None, state, None)
    logs = []
    for tokens in (100, 200, 400):
        state.num_input_tokens_seen = tokens
        logs.append({"loss": 1.0})
        callback.on_log(None, state, None, logs=logs[-1])
        assert callback.steady() == (None if tokens == 100 else 100.0)  # since the first log: 100 in 1 s, 300 in 3
    callback.on_log(None, state, None, logs={"eval_loss": 1.0})  # not a training log: no point, no clock read
    assert [log["tokens_per_second"] for log in logs] == [10.0, 100.0, 100.0]
    assert callback.mean_of_logs() == 70.0


@pytest.fixture(scope="module")
def model_without_tokenizer(tmp_path_factory):
    """What `model.save_pretrained("my-mamba")` leaves when the tokenizer is not saved beside it."""
    folder = tmp_path_factory.mktemp("no-tokenizer")
    config = hf_mamba.MambaConfig(vocab_size=64, hidden_size=16, state_size=4, num_hidden_layers=1)
    hf_mamba.MambaForCausalLM(config).save_pretrained(folder)
    return folder


@needs_datasets
def test_refuses_model_folder_without_tokenizer(model_without_tokenizer, tmp_path):
    """Transformers' fallback tokenizer encodes every text as []: training would see end-of-text tokens only."""
    message = run_error(["--model", str(model_without_tokenizer), "--output-dir", str(tmp_path), "--max-steps", "1"])
    assert "encodes the training text as no tokens" in message and "--tokenizer" in message


@needs_datasets
def test_refuses_tokenizer_larger_than_the_embedding(model_without_tokenizer, tmp_path):
    tokenizer = train_script.train_demo_tokenizer(train_script.DEMO_TEXT * 4, vocab_size=300)
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    argv = ["--model", str(model_without_tokenizer), "--tokenizer", str(tmp_path / "tokenizer")]
    message = run_error([*argv, "--output-dir", str(tmp_path / "out"), "--max-steps", "1"])
    assert f"--tokenizer {tmp_path / 'tokenizer'} has {len(tokenizer)} tokens" in message
    assert "embeds only 64" in message


@needs_datasets
def test_bf16_without_bf16_hardware_explains(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(train_script, "is_torch_bf16_gpu_available", lambda: False)
    message = run_error(["--bf16", "--output-dir", str(tmp_path)], capsys)
    assert "--bf16 needs a GPU with bf16" in message and "--use-cpu" in message
    # With --use-cpu it trains (bf16 autocast on the CPU).
    result = train_script.main([*TINY_DEMO, "--bf16", "--use-cpu", "--max-steps", "1", "--output-dir", str(tmp_path)])
    assert result["trainer"].args.bf16


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints: --resume-from-checkpoint


def fake_checkpoint(folder: Path, step: int, adapter=False, drop=()):
    """The files Trainer._save_checkpoint writes (tiny stand-ins), minus `drop`."""
    folder.mkdir(parents=True)
    weights = "adapter_model.safetensors" if adapter else "model.safetensors"
    save_file({"w": torch.zeros(4, 4)}, folder / weights)
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth"):
        (folder / name).write_bytes(b"stand-in")
    for name in drop:
        (folder / name).unlink()
    return folder


def resolve(output_dir, resume="latest", lora=False):
    args = train_script.parse_args(["--output-dir", str(output_dir), "--resume-from-checkpoint", resume])
    args.lora = lora
    logged = []
    return train_script.resolve_checkpoint(args, log=logged.append), logged


def test_latest_skips_incomplete_checkpoints_and_says_why(tmp_path):
    fake_checkpoint(tmp_path / "checkpoint-10", 10)
    fake_checkpoint(tmp_path / "checkpoint-9", 9)
    fake_checkpoint(tmp_path / "checkpoint-20", 20, drop=["trainer_state.json"])  # cut short while saving
    truncated = fake_checkpoint(tmp_path / "checkpoint-30", 30) / "model.safetensors"
    whole = truncated.stat().st_size
    truncated.write_bytes(truncated.read_bytes()[:-10])
    fake_checkpoint(tmp_path / "checkpoint-40", 40, drop=["optimizer.pt"])
    (fake_checkpoint(tmp_path / "checkpoint-50", 50) / "trainer_state.json").write_text('{"global_st')
    (tmp_path / "checkpoint-60").mkdir()

    chosen, logged = resolve(tmp_path)
    assert chosen == str(tmp_path / "checkpoint-10")  # by step number, not name order (checkpoint-9)
    assert logged == [
        "skipped incomplete checkpoint-60: no trainer_state.json (written last: the save was cut short)",
        "skipped incomplete checkpoint-50: trainer_state.json is cut short or corrupt",
        "skipped incomplete checkpoint-40: no optimizer state",
        f"skipped incomplete checkpoint-30: model.safetensors is cut short ({whole - 10} of {whole} bytes)",
        "skipped incomplete checkpoint-20: no trainer_state.json (written last: the save was cut short)",
        f"resuming from {tmp_path / 'checkpoint-10'}, the newest complete checkpoint",
    ]


def test_latest_with_nothing_to_resume_says_so(tmp_path):
    with pytest.raises(SystemExit, match=r"nothing to resume in \S+: no checkpoint-\* folder"):
        resolve(tmp_path / "never-trained")
    fake_checkpoint(tmp_path / "checkpoint-5", 5, drop=["model.safetensors"])
    with pytest.raises(SystemExit, match=r"every checkpoint is incomplete \(checkpoint-5: no model weights\)"):
        resolve(tmp_path)
    # Through main(): stopped before any data is loaded or any training starts.
    with pytest.raises(SystemExit, match="nothing to resume"):
        train_script.main(["--output-dir", str(tmp_path / "empty"), "--resume-from-checkpoint", "latest"])
    assert not (tmp_path / "empty").exists()


def test_named_checkpoint_is_checked(tmp_path):
    fake_checkpoint(tmp_path / "checkpoint-3", 3, drop=["rng_state.pth"])
    with pytest.raises(SystemExit, match=r"checkpoint-3 is incomplete: no rng_state.pth"):
        resolve(tmp_path, resume=str(tmp_path / "checkpoint-3"))
    with pytest.raises(SystemExit, match=r"--resume-from-checkpoint \S+checkpoint-4: no such folder"):
        resolve(tmp_path, resume=str(tmp_path / "checkpoint-4"))


def test_resume_names_a_lora_mismatch(tmp_path):
    fake_checkpoint(tmp_path / "lora" / "checkpoint-2", 2, adapter=True)
    with pytest.raises(SystemExit, match="holds a LoRA adapter: resume it with --lora"):
        resolve(tmp_path / "lora")
    assert resolve(tmp_path / "lora", lora=True)[0] == str(tmp_path / "lora" / "checkpoint-2")
    fake_checkpoint(tmp_path / "full" / "checkpoint-2", 2)
    with pytest.raises(SystemExit, match="holds full model weights, not a LoRA adapter"):
        resolve(tmp_path / "full", lora=True)


# ---------------------------------------------------------------------------------------------------------------
# Interrupts


@needs_datasets
def test_sigint_saves_a_checkpoint_and_resume_matches_uninterrupted(tmp_path, monkeypatch):
    full = train_script.main([*TINY_DEMO, "--max-steps", "8", "--output-dir", str(tmp_path / "full")])
    expected = losses(full["trainer"])
    assert len(expected) == 8

    # A real SIGINT to this process at the end of step 3: Python runs the handler right after os.kill returns,
    # before the callback reads the flag.
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return original(self, args, state, control, **kwargs)

    original = train_script.StopOnSignal.on_step_end
    monkeypatch.setattr(train_script.StopOnSignal, "on_step_end", on_step_end)
    out = tmp_path / "interrupted"
    argv = [*TINY_DEMO, "--max-steps", "8", "--output-dir", str(out)]
    handler = signal.getsignal(signal.SIGINT)
    with pytest.raises(SystemExit) as stopped:
        train_script.main(argv)
    assert stopped.value.code == 128 + signal.SIGINT
    assert signal.getsignal(signal.SIGINT) is handler  # put back after training
    assert sorted(path.name for path in out.glob("checkpoint-*")) == ["checkpoint-3"]
    assert train_script.checkpoint_problem(out / "checkpoint-3") is None
    assert not (out / "model.safetensors").exists()  # stopped: no final save, no final evaluation
    monkeypatch.undo()

    # A later save cut short (what a second Ctrl-C or a kill can leave): weights, no trainer state.
    partial = out / "checkpoint-5"
    partial.mkdir()
    shutil.copy(out / "checkpoint-3" / "model.safetensors", partial)
    resumed = train_script.main([*argv, "--resume-from-checkpoint", "latest"])
    assert resumed["eval_loss_before"] is None and resumed["trainer"].state.global_step == 8
    # Same data order, RNG and optimizer state: on CPU the losses match bit for bit.
    assert losses(resumed["trainer"]) == expected


@needs_datasets
def test_sigterm_from_outside_stops_with_a_checkpoint(tmp_path):
    """The script as a user runs it: SIGTERM while training, exit status 143 and a complete checkpoint."""
    out = tmp_path / "run"
    command = [sys.executable, str(ROOT / "scripts" / "train.py"), *TINY_DEMO, "--max-steps", "100000"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    process = subprocess.Popen(
        [*command, "--output-dir", str(out)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )
    try:
        for line in process.stdout:  # the first training log: the handler is in place by then
            if "'loss'" in line:
                process.send_signal(signal.SIGTERM)
                break
        output = process.stdout.read()
        assert process.wait(timeout=60) == 128 + signal.SIGTERM, output[-3000:]
    finally:
        process.kill()
    [checkpoint] = out.glob("checkpoint-*")
    assert f"SIGTERM: stopped at step {checkpoint.name.split('-')[1]} and saved {checkpoint}" in output
    assert train_script.checkpoint_problem(checkpoint) is None
    assert json.loads((checkpoint / "trainer_state.json").read_text())["global_step"] < 100000


def test_second_ctrl_c_stops_at_once():
    """The first SIGINT only asks for a checkpoint; a repeat within a second is the same interrupt delivered
    twice (terminal and torchrun both signal the workers); a later one raises KeyboardInterrupt at once."""
    stop = train_script.StopOnSignal()
    handler = signal.getsignal(signal.SIGINT)
    with stop, pytest.raises(KeyboardInterrupt):
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.signal == signal.SIGINT and signal.getsignal(signal.SIGINT) == stop._handle
        stop.time -= 1.0  # as if a second had passed
        os.kill(os.getpid(), signal.SIGINT)
        for _ in range(1000):  # Python runs the re-raised signal's handler at its next check
            pass
    assert signal.getsignal(signal.SIGINT) is handler


def test_falcon_mamba_folder_trains_as_an_hf_mamba_falcon_mamba(tmp_path):
    import transformers

    tokenizer = train_script.train_demo_tokenizer(train_script.DEMO_TEXT * 4, vocab_size=300)
    config = transformers.FalconMambaConfig(vocab_size=300, hidden_size=16, state_size=4, num_hidden_layers=1)
    transformers.FalconMambaForCausalLM(config).save_pretrained(tmp_path / "falcon")
    args = train_script.parse_args(["--model", str(tmp_path / "falcon"), "--output-dir", str(tmp_path / "out")])
    model = train_script.load_model(args, tokenizer)
    assert type(model) is hf_mamba.MambaForCausalLM and model.config.mixer_rms_eps == 1e-6
