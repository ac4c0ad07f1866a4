"""scripts/_bench_common.py, the helpers the benchmark scripts share."""

import torch
from _scripts import load_script


def test_decode_profile_warms_at_the_profiled_length(capsys):
    """print_decode_profile runs generate() at the profiled length before timing and profiling it: mamba_ssm keys
    its decode graphs on the maximum length, so a warm-up at another length would leave its capture inside the
    timed call. It prints wall and kernel time per token (no kernels on CPU)."""
    common = load_script("_bench_common")
    lengths = []

    def generate(prompt, new_tokens):
        lengths.append(new_tokens)
        return torch.cat([prompt, prompt[:, :1].repeat(1, new_tokens)], dim=1)

    common.print_decode_profile("stand-in", generate, torch.ones(2, 3, dtype=torch.long), new_tokens=5)
    assert lengths == [5, 5, 5]  # warm-up, timed call, profiled call
    out = capsys.readouterr().out
    assert out.startswith("stand-in: wall ") and "GPU kernels 0.000 ms/token, 0 kernels/token" in out
