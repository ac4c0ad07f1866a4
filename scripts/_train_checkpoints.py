"""Checkpoints of scripts/train.py: which one --resume-from-checkpoint resumes from (the newest complete one for
"latest", half-written ones skipped) and StopOnSignal, which turns SIGINT / SIGTERM into a saved checkpoint."""

import json
import os
import re
import signal
import threading
import time
from pathlib import Path

import torch
from _train_data import fail  # a sibling in scripts/, which train.py puts on sys.path
from transformers import TrainerCallback

from hf_mamba.loading import read_shard_index, safetensors_problem

CHECKPOINT_NAME = re.compile(r"checkpoint-(\d+)")
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_model.bin")
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", *ADAPTER_FILES)


def checkpoint_problem(folder: Path) -> str | None:
    """Why the Trainer could not resume from `folder`, or None when the checkpoint is complete.

    The Trainer writes weights, optimizer, scheduler and RNG states first and trainer_state.json last
    (Trainer._save_checkpoint), so a save that was cut short lacks trainer_state.json or leaves it unreadable;
    the weights are checked too, since a copy or a full disk can truncate them.
    """
    try:
        json.loads((folder / "trainer_state.json").read_text())["global_step"]
    except FileNotFoundError:
        return "no trainer_state.json (written last: the save was cut short)"
    except (ValueError, KeyError):
        return "trainer_state.json is cut short or corrupt"
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weights = list(read_shard_index(index))
        except OSError as error:  # not a shard index, or a shard missing: the message names the file
            return str(error)
    else:
        weights = [folder / name for name in WEIGHT_FILES if (folder / name).is_file()]
        if not weights and not any(path.name.startswith("pytorch_model_fsdp") for path in folder.iterdir()):
            return "no model weights"
    for path in weights:
        if not path.is_file():
            return f"{path.name} is missing"
        if path.suffix == ".safetensors" and (problem := safetensors_problem(path)):
            return f"{path.name} {problem}"
    if not any(folder.glob("optimizer*")):
        return "no optimizer state"
    if not (folder / "scheduler.pt").is_file():
        return "no scheduler.pt"
    if not any(folder.glob("rng_state*.pth")):
        return "no rng_state.pth"
    return None


def resolve_checkpoint(args, log=print) -> str | None:
    """The checkpoint folder --resume-from-checkpoint names ("latest": the newest complete one), checked."""
    if args.resume_from_checkpoint is None:
        return None
    if args.resume_from_checkpoint == "latest":
        output_dir = Path(args.output_dir)
        found = [
            (int(match.group(1)), path)
            for path in (output_dir.iterdir() if output_dir.is_dir() else [])
            if path.is_dir() and (match := CHECKPOINT_NAME.fullmatch(path.name))
        ]
        skipped = []
        for _, folder in sorted(found, reverse=True):
            problem = checkpoint_problem(folder)
            if problem is None:
                break
            skipped.append(f"{folder.name}: {problem}")
        else:
            what = f"every checkpoint is incomplete ({'; '.join(skipped)})" if skipped else "no checkpoint-* folder"
            fail(
                f"--resume-from-checkpoint latest: nothing to resume in {output_dir}: {what}; "
                "leave the flag out to start from scratch"
            )
        for line in skipped:
            log(f"skipped incomplete {line}")
        log(f"resuming from {folder}, the newest complete checkpoint")
    else:
        folder = Path(args.resume_from_checkpoint)
        if not folder.is_dir():
            fail(f"--resume-from-checkpoint {folder}: no such folder")
        if problem := checkpoint_problem(folder):
            fail(f"--resume-from-checkpoint {folder} is incomplete: {problem}")
    adapter = any((folder / name).is_file() for name in ADAPTER_FILES)
    if adapter and not args.lora:
        fail(f"{folder} holds a LoRA adapter: resume it with --lora (and the run's other --lora-* flags)")
    if args.lora and not adapter:
        fail(f"{folder} holds full model weights, not a LoRA adapter: resume it without --lora")
    return str(folder)


# ---------------------------------------------------------------------------------------------------------------
# Stopping on a signal


class StopOnSignal(TrainerCallback):
    """SIGINT / SIGTERM during training: finish the current optimizer step, save a checkpoint there, stop.

    The handler only records the signal; the Trainer's own checkpointing then runs at the step's end, so no
    checkpoint is cut short by it. A second signal of the same kind a second or more later (Ctrl-C pressed
    again) gets the previous handler: a stop at once, losing the steps since the last checkpoint. Repeats
    within a second are the same interrupt arriving twice: a terminal signals the whole process group and
    torchrun forwards the signal to its workers too. Under several processes every rank stops at the same
    step (the flag is all-reduced), so none waits on a collective the others have left.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signal, self.time, self.stopped, self.previous = None, 0.0, False, {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            self.previous = {number: signal.signal(number, self._handle) for number in self.SIGNALS}
        return self

    def __exit__(self, *exc_info):
        for number, handler in self.previous.items():
            signal.signal(number, handler)
        self.previous = {}

    def _handle(self, number, frame):
        if self.signal is None:
            self.signal, self.time = number, time.monotonic()
            name = signal.Signals(number).name
            # os.write: print() from a handler can hit stdout's buffer mid-write ("reentrant call").
            os.write(2, f"\n{name}: saving a checkpoint at the end of this step, then stopping\n".encode())
        elif number == self.signal and time.monotonic() - self.time >= 1.0:
            self.__exit__()
            signal.raise_signal(number)  # the previous handler: KeyboardInterrupt, or the default termination

    def on_step_end(self, args, state, control, **kwargs):
        stop = self.signal is not None
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            flag = torch.tensor([float(stop)], device=args.device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            stop = bool(flag.item())
        if stop:
            self.stopped = True
            control.should_log = control.should_save = control.should_training_stop = True
        return control
