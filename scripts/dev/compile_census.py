"""Census of the Triton kernels a first training step and a first generate() compile, and what each
compile costs on this machine's CPU (no GPU needed).

    .venv/bin/python scripts/dev/compile_census.py                      # record, compile, print the table
    .venv/bin/python scripts/dev/compile_census.py --record-only        # only the list of specialisations
    .venv/bin/python scripts/dev/compile_census.py --json out.json      # also write records (PTX hashes)
    .venv/bin/python scripts/dev/compile_census.py --layers 2 --batch 1 --seqlen 256   # another shape

How the list is made: the model's own host code runs (MambaForCausalLM forward + loss + backward under
bf16 autocast, fused mixer path; then, in bf16 eval, a prefill with cache and decode steps) on meta
tensors that say they are on CUDA (`Tensor.is_cuda`, the backend choice, 132 multiprocessors as on
H100/H200, bf16 autocast emulated for the matmuls as CUDA's autocast casts them). Every `launch` of
hf_mamba.kernels is intercepted: its arguments go through Triton's own binder (tensors replaced by CPU
stand-ins of the same dtype and 16-byte alignment, ints as they are), which gives the exact
specialisation a GPU run keys its compile on (signature, constexprs, divisibility attributes, options);
nothing runs. Launches made inside `compile_ahead`'s dry pass are tagged, so the table shows which
compiles it overlaps, as are the kernels `launch_once_compiled` builds in a background thread (their
fallbacks are recorded as launched). Generation runs the forward calls generate() makes (prefill, one-token steps);
the CUDA-graph capture of the decode step launches the same kernels and is not emulated.

Each distinct specialisation is then compiled for sm_90 (`triton.compile(ASTSource(...),
target=GPUTarget("cuda", 90, 32))`: TTIR, TTGIR, LLVM IR, PTX and ptxas to a cubin) with an empty
cache, one after another, and timed. These are host compile times on this CPU, not a GPU's first-step
figure (which adds the launcher builds, cuBLAS set-up and the overlap compile_ahead gets).
"""

import argparse
import contextlib
import hashlib
import importlib.util
import json
import os
import re
import sys
import tempfile
import time

os.environ.pop("TRITON_INTERPRET", None)  # real JITFunctions, not the interpreter's
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton < 3.10's default, silenced
os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="census_triton_cache_")  # every compile from scratch
os.environ.setdefault("HF_MAMBA_KERNEL_CACHE", tempfile.mkdtemp(prefix="census_generated_"))
if importlib.util.find_spec("hf_mamba") is None:  # not installed: this tree's sources (kernels/ needs an install)
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "src"))

import torch  # noqa: E402
import triton  # noqa: E402
from torch.overrides import TorchFunctionMode  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.jit import create_function_from_signature  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
BACKEND = make_backend(TARGET)
SMS = 132  # H100 / H200


# --- pretending to be on CUDA -------------------------------------------------------------------------

torch.Tensor.is_cuda = property(lambda self: self.device.type in ("cuda", "meta"))
torch.cuda.is_available = lambda: True
torch.cuda.current_device = lambda: 0
torch.cuda.is_current_stream_capturing = lambda: False

_AUTOCAST = [None]  # the autocast dtype while emulated autocast is on
_LOWER_PRECISION = {  # CUDA autocast's lower-precision ops that the model calls
    torch.nn.functional.linear,
    torch.mm,
    torch.addmm,
    torch.matmul,
    torch.bmm,
    torch.baddbmm,
    torch.Tensor.matmul,
    torch.Tensor.__matmul__,
    torch.Tensor.mm,
    torch.Tensor.addmm,
    torch.nn.functional.conv1d,
}


class _Autocast:
    """torch.autocast for meta tensors: sets the state the model reads; _CastMode does the casts."""

    def __init__(self, device_type=None, dtype=torch.bfloat16, enabled=True, cache_enabled=None):
        self.dtype, self.enabled = dtype, enabled

    def __enter__(self):
        self.saved = _AUTOCAST[0]
        _AUTOCAST[0] = self.dtype if self.enabled else None

    def __exit__(self, *exc):
        _AUTOCAST[0] = self.saved


torch.autocast = _Autocast
torch.is_autocast_enabled = lambda *a: _AUTOCAST[0] is not None
torch.get_autocast_dtype = lambda *a: _AUTOCAST[0] or torch.bfloat16


class _CastMode(TorchFunctionMode):
    """Under emulated autocast, floating inputs of the lower-precision ops go in as the autocast dtype."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        dtype = _AUTOCAST[0]
        if dtype is not None and func in _LOWER_PRECISION and "out" not in kwargs:
            cast = lambda t: t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t  # noqa: E731
            args, kwargs = tuple(cast(a) for a in args), {k: cast(v) for k, v in kwargs.items()}
        return func(*args, **kwargs)


# --- recording launches -------------------------------------------------------------------------------

records = {}  # key -> record (first seen), in launch order
phase = ["none"]


def _stand_in(a):
    """A CPU tensor Triton specialises as it would a (meta) GPU tensor a: its dtype and its data pointer's
    alignment, base allocations taken as 16-byte aligned (CUDA's are 512)."""
    if isinstance(a, torch.Tensor):
        misalign = (a.storage_offset() * a.element_size()) % 16
        return torch.empty(64, dtype=a.dtype)[misalign // a.element_size() :]
    return a


def record_launch(kernel, grid, *args, **constexprs):
    from hf_mamba.kernels import _launch

    with (
        torch.overrides._pop_mode_temporarily()
        if torch.overrides._get_current_function_mode()
        else contextlib.nullcontext()
    ):
        kw = {k: _stand_in(v) for k, v in constexprs.items()}
        kw["debug"] = kw.get("debug", kernel.debug) or triton.knobs.runtime.debug
        # the compilation knobs JITFunction.run passes on, where this Triton has them (3.6 lacks the second)
        compilation = triton.knobs.compilation
        kw.update({name: getattr(compilation, name) for name in ("instrumentation_mode", "fpsan_homomorphic_casts")
                   if hasattr(compilation, name)})
        binder = create_function_from_signature(kernel.signature, kernel.params, BACKEND)
        bound, specialization, options = binder(*[_stand_in(a) for a in args], **kw)
        options, signature, consts, attrs = kernel._pack_args(BACKEND, kw, bound, specialization, options)
    names = [p.name for p in kernel.params]
    key = json.dumps(
        [
            kernel.fn.__qualname__,
            kernel.fn.__module__,
            signature,
            sorted((str(k), repr(v)) for k, v in consts.items()),
            sorted((str(k), str(v)) for k, v in attrs.items()),
            sorted((k, repr(v)) for k, v in options.__dict__.items()),
        ]
    )
    rec = records.get(key)
    if rec is None:
        rec = records[key] = dict(
            kernel=kernel.fn.__name__,
            module=kernel.fn.__module__.rsplit(".", 1)[-1],
            constexprs={names[k[0]]: v for k, v in consts.items() if len(k) == 1 and v is not None},
            dtypes={n: t for n, t in signature.items() if t.startswith("*")},
            divisible=sorted(names[k[0]] for k, v in attrs.items() if v),
            options={k: options.__dict__[k] for k in ("num_warps", "num_stages", "maxnreg")},
            phases=[],
            ahead=False,
            launches=0,
            src=(kernel, signature, consts, attrs, options),
        )
    if _BACKGROUND[0]:
        rec["background"] = True
    if _launch._COMPILE_ONLY.get() is not None and not _BACKGROUND[0]:
        rec["ahead"] = True
    elif phase[0] not in rec["phases"]:
        rec["phases"].append(phase[0])
    rec["launches"] += 1


_BACKGROUND = [False]  # set while the kernel of a `launch_once_compiled` call is recorded


def record_once_compiled(kernel, fallback, grid, *args, **constexprs):
    """`launch_once_compiled`: the fallback launches (and compiles ahead where the call does); the kernel
    compiles in a background thread, which a first call does not wait for (its rows say "background")."""
    record_launch(fallback, grid, *args, **constexprs)
    if kernel is not fallback:
        _BACKGROUND[0] = True
        try:
            record_launch(kernel, grid, *args, **constexprs)
        finally:
            _BACKGROUND[0] = False


def patch_kernels():
    """Every kernel module's `launch` records; the CUDA queries answer as an H100/H200 would."""
    import importlib
    import pkgutil

    import hf_mamba.kernels as K
    from hf_mamba.kernels import _launch

    import hf_mamba.fast_path

    selective_scan = importlib.import_module("hf_mamba.kernels.selective_scan")  # the attribute is the function

    replacements = {
        "launch": record_launch,
        "launch_once_compiled": record_once_compiled,
        "sm_count": lambda device: SMS,
        "device_guard": lambda t: contextlib.nullcontext(),
        "resolve_backend": lambda backend, device: backend or "triton",  # meta tensors: the CUDA choice
    }
    names = [info.name for info in pkgutil.walk_packages(K.__path__, "hf_mamba.kernels.")]
    for module in [importlib.import_module(name) for name in names] + [hf_mamba.fast_path, selective_scan]:
        for name, value in replacements.items():
            if hasattr(module, name):
                setattr(module, name, value)
    _launch.launch = record_launch
    # The forward's plan reads CUDA from its device argument (FAST_MATH, the register cap): give it CUDA's.
    fwd = importlib.import_module("hf_mamba.kernels.selective_scan.recurrent_fwd")
    plan = fwd._fwd_plan
    cuda = torch.device("cuda", 0)
    fwd._fwd_plan = lambda *a: plan(*(cuda if isinstance(x, torch.device) and x.type == "meta" else x for x in a))
    import hf_mamba.modeling_mamba as mm

    mm.read_values = lambda *a, **k: (False, False)  # no padding, no packed documents (a host read on meta)
    mm.MambaPreTrainedModel._compiles_ahead_on = staticmethod(lambda device: True)  # meta poses as CUDA


# --- the calls ------------------------------------------------------------------------------------------


def run_model(args):
    from hf_mamba import MambaConfig, MambaForCausalLM

    config = MambaConfig(vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers)
    with torch.device("meta"):
        model = MambaForCausalLM(config)
    ids = torch.zeros(args.batch, args.seqlen, dtype=torch.long, device="meta")
    with _CastMode():
        phase[0] = "train"
        model.train()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(ids, labels=ids).loss
        loss.backward()
        # generate(): bf16 weights, A_log, D and the Δ bias kept fp32 (as from_pretrained(dtype=bf16))
        model.eval().to(torch.bfloat16)
        for name, p in model.named_parameters():
            if any(name.endswith(s) for s in ("A_log", "mixer.D", "dt_proj.bias")):
                p.data = p.data.float()
        with torch.no_grad():
            for batch in args.decode_batches:
                phase[0] = "prefill"
                prompt = torch.zeros(batch, args.prompt_len, dtype=torch.long, device="meta")
                out = model(prompt, use_cache=True, logits_to_keep=1)
                cache = out[1]  # the cache (its field's name differs between Transformers versions)
                phase[0] = "decode"
                for _ in range(2):
                    out = model(prompt[:, :1], cache=cache, use_cache=True)


# --- compiling ------------------------------------------------------------------------------------------


def _ptx_body(ptx):
    """PTX without debug lines and comments (line info differs when only the source's lines move)."""
    return "\n".join(l for l in ptx.splitlines() if not l.lstrip().startswith((".loc", ".file", "//", "$L__info")))


_STAGE_SECONDS = {}  # stage -> seconds, of the compile in progress


def _time_stages():
    """Wrap each compiler stage (ttir, ttgir, llir, ptx, cubin = ptxas) of the CUDA backend with a timer."""
    backend_class = type(BACKEND)
    add_stages = backend_class.add_stages

    def timed_add_stages(self, stages, options, language):
        add_stages(self, stages, options, language)
        for name, stage in list(stages.items()):

            def timed(src, metadata, stage=stage, name=name):
                start = time.perf_counter()
                try:
                    return stage(src, metadata)
                finally:
                    _STAGE_SECONDS[name] = _STAGE_SECONDS.get(name, 0.0) + time.perf_counter() - start

            stages[name] = timed

    backend_class.add_stages = timed_add_stages


def compile_record(rec):
    """rec's specialisation compiled for TARGET, as a GPU run's first launch would compile it."""
    kernel, signature, consts, attrs, options = rec["src"]
    return triton.compile(ASTSource(kernel, signature, consts, attrs), target=TARGET, options=options.__dict__)


def compile_all(recs, ptx_dir=None, only=None):
    _time_stages()
    for i, rec in enumerate(recs, 1):
        if only and i not in only:
            continue
        _STAGE_SECONDS.clear()
        cpu, wall = time.process_time(), time.perf_counter()
        compiled = compile_record(rec)
        rec["seconds"] = time.perf_counter() - wall
        rec["cpu_seconds"] = time.process_time() - cpu
        rec["stages"] = {k: round(v, 2) for k, v in _STAGE_SECONDS.items()}
        rec["ptx_sha"] = hashlib.sha256(_ptx_body(compiled.asm["ptx"]).encode()).hexdigest()[:16]
        if ptx_dir:
            with open(os.path.join(ptx_dir, f"{i:02d}_{rec['kernel']}.ptx"), "w") as f:
                f.write(_ptx_body(compiled.asm["ptx"]))
        print(f"  #{i} {rec['kernel']}: {rec['seconds']:.1f} s ({rec['stages']})", file=sys.stderr, flush=True)


def _kernel_name(rec):
    """The kernel's name, with the states per iteration of a generated backward's variant (`_G<n>_`)."""
    variant = re.search(r"scan_bwd_N(\d+)_T\d+_G(\d+)_", rec["module"])
    if variant is None:
        return rec["kernel"]
    n, g = variant.groups()
    return f"{rec['kernel']} ({'all states' if n == g else f'{g} state(s)'} per iteration)"


def _when(rec):
    """When a first call compiles it: ahead (side by side), in the background (not waited for), or at launch."""
    return "background" if rec.get("background") else "yes" if rec["ahead"] else "no"


def _short(rec):
    """The UPPER-case constexprs (flags by name) and the pointer dtypes other than fp32."""
    upper = {k: v for k, v in rec["constexprs"].items() if k.isupper() or k[0].isupper()}
    flags = [k for k, v in upper.items() if v is True]
    values = [f"{k}={v}" for k, v in upper.items() if not isinstance(v, bool)]
    dt = sorted({t for t in rec["dtypes"].values()} - {"*fp32"})
    return " ".join(values + flags + ([f"[{','.join(dt)}]"] if dt else []))


def _difference(rec, other):
    """What tells rec's specialisation from other's (same kernel): constexprs (the ints Triton made 1),
    pointer dtypes, divisibility by 16, options."""
    parts = []
    for field in ("constexprs", "dtypes", "options"):
        a, b = rec[field], other[field]
        parts += [f"{k}={a.get(k)}" for k in sorted(set(a) | set(b), key=str) if a.get(k) != b.get(k)]
    gained, lost = set(rec["divisible"]) - set(other["divisible"]), set(other["divisible"]) - set(rec["divisible"])
    parts += [f"{k}%16" for k in sorted(gained)] + [f"{k}%16 no" for k in sorted(lost)]
    return ", ".join(parts)


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--vocab", type=int, default=50280)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seqlen", type=int, default=1024)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--decode-batches", type=int, nargs="+", default=[1])
    parser.add_argument("--record-only", action="store_true")
    parser.add_argument(
        "--only", type=int, nargs="+", help="compile only these rows (1-based, as the table numbers them)"
    )
    parser.add_argument("--json", help="write the records here")
    parser.add_argument("--ptx-dir", help="write each specialisation's PTX (debug lines dropped) here")
    return parser


def main():
    args = build_parser().parse_args()

    patch_kernels()
    run_model(args)
    recs = list(records.values())
    if not args.record_only:
        if args.ptx_dir:
            os.makedirs(args.ptx_dir, exist_ok=True)
        compile_all(recs, args.ptx_dir, args.only)
    print(f"{len(recs)} specialisations; Triton {triton.__version__}, target sm_90")
    print(
        "| # | phase | kernel | key constexprs [non-fp32 pointers] | warps | ahead | launches | compile s | "
        "differs from the kernel's first row in |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    first = {}
    for i, rec in enumerate(recs, 1):
        secs = f"{rec['seconds']:.1f}" if "seconds" in rec else "-"
        other = first.setdefault(rec["kernel"], (i, rec))
        diff = f"#{other[0]}: {_difference(rec, other[1])}" if other[1] is not rec else ""
        print(
            f"| {i} | {'+'.join(rec['phases']) or 'ahead only'} | {_kernel_name(rec)} | {_short(rec)} | "
            f"{rec['options']['num_warps']} | {_when(rec)} | {rec['launches']} | {secs} "
            f"| {diff} |"
        )
    if not args.record_only and not args.only:
        for name in ("train", "prefill", "decode"):
            mine = [r for r in recs if name in r["phases"]]
            ahead = [r for r in mine if r["ahead"]]
            later = [r for r in mine if r.get("background")]
            print(
                f"{name}: {len(mine)} compiles, {sum(r['seconds'] for r in mine):.1f} s "
                f"({len(ahead)} of them compiled ahead: {sum(r['seconds'] for r in ahead):.1f} s; "
                f"the slowest of those {max((r['seconds'] for r in ahead), default=0):.1f} s; "
                f"{len(later)} in the background, the slowest {max((r['seconds'] for r in later), default=0):.1f} s)"
            )
        gen = [r for r in recs if {"prefill", "decode"} & set(r["phases"]) and "train" not in r["phases"]]
        print(
            f"generate() alone (not compiled by training): {len(gen)} compiles, {sum(r['seconds'] for r in gen):.1f} s"
        )
        by_ptx = {}
        for rec in recs:
            by_ptx.setdefault((rec["kernel"], rec["ptx_sha"]), []).append(rec)
        for (kernel, sha), same in by_ptx.items():
            if len(same) > 1:
                print(
                    f"identical PTX ({sha}): {len(same)} specialisations of {kernel}: "
                    + "; ".join(_short(r) + " divisible=" + ",".join(r["divisible"]) for r in same)
                )
    if args.json:
        with open(args.json, "w") as f:
            json.dump([{k: v for k, v in r.items() if k != "src"} for r in recs], f, indent=1, default=repr)


if __name__ == "__main__":
    main()
