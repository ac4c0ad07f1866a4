"""The repository's `kernels/` folder is `hf_mamba.kernels`, never the top-level `kernels`.

Run from the repository root (`python -m pytest`, a Python session started there), the root is on
sys.path and `import kernels` finds this folder first; Transformers (5.25+) imports Hugging Face's
`kernels` library at start-up, which must still get that library.
"""

import importlib.metadata
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PROBE = """
import kernels
import hf_mamba.kernels
import transformers.modeling_utils  # imports Hugging Face's kernels library where it is installed
print(kernels.__file__)
print(hf_mamba.kernels.__file__)
"""


def test_top_level_kernels_is_hugging_faces_from_the_repository_root():
    result = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    top_level, ours = (Path(line) for line in result.stdout.split())
    assert ours == ROOT / "kernels" / "__init__.py"
    try:
        importlib.metadata.version("kernels")
    except importlib.metadata.PackageNotFoundError:
        return  # not installed: the name is free, and Transformers leaves it alone
    assert top_level.parent != ROOT / "kernels", top_level
