"""scripts/induction_heads.py: the task's data, the chunked evaluation, and the whole script run tiny."""

import importlib.util
import json

import pytest
import torch
from _scripts import load_script


@pytest.fixture(scope="module")
def script():
    return load_script("induction_heads")


def test_task_layout(script):
    vocab = 16
    ids, keys = script.induction_batch(64, 40, vocab, torch.Generator().manual_seed(0), torch.device("cpu"))
    assert ids.shape == (64, 40) and keys.shape == (64,)
    assert int(ids.max()) == vocab and int(ids.min()) >= 0
    for row, key in zip(ids.tolist(), keys.tolist(), strict=True):
        specials = [i for i, token in enumerate(row) if token == vocab]
        assert len(specials) == 2 and specials[1] == 39  # one trigger inside, one at the end
        assert row[specials[0] + 1] == key  # the answer is what followed the first trigger


def test_curriculum_gap(script):
    """With max_gap the first trigger sits at most max_gap positions before the query (the last token)."""
    ids, _ = script.induction_batch(256, 100, 16, torch.Generator().manual_seed(1), torch.device("cpu"), max_gap=6)
    first = (ids[:, :-1] == 16).int().argmax(dim=1)
    gaps = 99 - first
    assert int(gaps.min()) >= 2 and int(gaps.max()) == 6


def test_chunked_evaluation_equals_one_forward(script):
    """The test lengths go through the cache in chunks: the same answers as one forward."""
    args = script.parse_args(["--device", "cpu", "--hidden-size", "16", "--eval-size", "6", "--eval-batch", "3"])
    torch.manual_seed(0)
    model = script.build_model(args)
    args.chunk_size = 1000
    whole = script.evaluate(model, args, 200)
    args.chunk_size = 7
    assert script.evaluate(model, args, 200) == whole

    generator = torch.Generator().manual_seed(5)
    ids, _ = script.induction_batch(3, 100, args.vocab, generator, args.device)
    with torch.no_grad():
        expected = model(ids).logits[:, -1]
    got = script.prefill_in_chunks(model, ids, chunk_size=7).logits[:, -1]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_script_tiny(script, tmp_path, capsys):
    summary = script.main([
        "--device", "cpu", "--steps", "6", "--batch-size", "4", "--hidden-size", "16", "--train-len", "32",
        "--min-test-log2", "5", "--max-test-log2", "7", "--eval-size", "4", "--eval-batch", "2", "--chunk-size", "40",
        "--out-dir", str(tmp_path),
    ])
    assert [row["length"] for row in summary["results"]] == [32, 64, 128]
    assert all(0.0 <= row["accuracy"] <= 1.0 for row in summary["results"])
    assert summary["train_steps"] == 6
    table = (tmp_path / "induction_heads.md").read_text()
    assert "| 2^7 = 128 |" in table and "Table 2" in table
    assert json.loads((tmp_path / "results.json").read_text())["results"] == summary["results"]
    out = capsys.readouterr().out
    if importlib.util.find_spec("matplotlib") is None:
        assert "matplotlib is not installed" in out
    else:
        assert (tmp_path / "induction_heads.png").stat().st_size > 0


@pytest.mark.parametrize(
    "argv, message",
    [
        pytest.param(["--max-test-log2", "5"], "--max-test-log2 must lie in", id="max-below-min"),
        pytest.param(["--steps", "0"], "--steps must be >= 1", id="no-steps"),
        pytest.param(["--train-len", "3"], "at least 4 tokens", id="too-short"),
    ],
)
def test_bad_arguments(script, argv, message, capsys):
    with pytest.raises(SystemExit):
        script.parse_args(["--device", "cpu", *argv])
    assert message in capsys.readouterr().err
