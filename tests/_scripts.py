"""What the tests of scripts/ share: loading a script as a module, and skipping where `datasets` is missing."""

import importlib.util
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"

# scripts/train.py loads its text through `datasets` (the `train` and `test` extras); without it the script
# still parses flags, checks checkpoints and builds tokenizers, so only the tests that load text skip.
HAS_DATASETS = importlib.util.find_spec("datasets") is not None
needs_datasets = pytest.mark.skipif(not HAS_DATASETS, reason="needs the datasets package (the train extra)")


def load_script(name: str):
    """scripts/<name>.py as a module (scripts are programs, not a package). Each call runs the file afresh, so
    what one test file patches on its copy stays there."""
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
