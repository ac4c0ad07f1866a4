"""Triton compiles in child processes, for `compile_ahead` and the background compiles of `_launch`.

Why: Triton compiles partly under Python's global lock, so compiles in threads of one process get in each
other's way. On an H100 machine's host (16 cores) the 14 compiles of a first 130M training step, 8 threads
side by side, each took 3 to 5 times as long as alone (the slowest 10.3 s, where alone such a compile takes
about 3 s), and the step waited 14 s for them. A child process per compile has no lock to share.

How: `ProcessCompiles` is the executor Triton's `AsyncCompileMode` submits each compile to. It reads what
to compile from the submitted function (the kernel, its specialisation, target and options), has a child
process compile exactly that into Triton's cache, then
runs the submitted function, which finds the result there, and builds the kernel's launcher. Anything
unexpected (a Triton whose submitted function holds other things, a kernel the child cannot import, a
child that fails) leaves the compile to the submitted function, in this process, as without this module:
never a different result, at worst the old speed. The children are plain subprocesses, not
multiprocessing's: those would import the user's `__main__` script again.

HF_MAMBA_COMPILE_PROCESSES=0 turns the children off (threads compile, as before).
"""

import hashlib
import importlib
import os
import pickle
import subprocess
import sys

try:
    import triton
    from triton.compiler import ASTSource
    from triton.compiler import compile as triton_compile
    from triton.compiler.compiler import make_backend
    from triton.runtime.cache import get_cache_key, get_cache_manager
except ImportError:  # the PyTorch paths import this module too, and need no Triton
    triton = None


def processes_enabled():
    return os.environ.get("HF_MAMBA_COMPILE_PROCESSES", "1") != "0"


class ProcessCompiles:
    """An executor for Triton's AsyncCompileMode: each submitted compile runs in `threads` (a
    concurrent.futures executor), whose thread has a child process compile it first."""

    def __init__(self, threads, build_launcher):
        self._threads = threads
        self._build_launcher = build_launcher

    def submit(self, compile_fn):
        job = compile_job(compile_fn) if processes_enabled() else None
        return self._threads.submit(self._compile, job, compile_fn)

    def _compile(self, job, compile_fn):
        if job is not None and not in_cache(job):  # a child costs seconds to start: not for a cache hit
            compile_in_child(job)
        kernel = compile_fn()  # a cache hit where the child compiled it
        self._build_launcher(kernel)
        return kernel


def compile_job(compile_fn):
    """What the child needs to compile what Triton's submitted function would (its closure holds the
    ASTSource, target, options and cache-invalidating environment), or None where that is not what it
    holds or the kernel is not importable by name."""
    try:
        return _job_of(compile_fn)
    except Exception:  # noqa: BLE001 - whatever Triton's function holds, the compile stays in this process
        return None


def _job_of(compile_fn):
    code = getattr(compile_fn, "__code__", None)
    cells = getattr(compile_fn, "__closure__", None) or ()
    captured = dict(zip(code.co_freevars, (c.cell_contents for c in cells), strict=True)) if code else {}
    src, target, options = captured.get("src"), captured.get("target"), captured.get("options")
    jit_fn = getattr(src, "fn", None)
    python_fn = getattr(jit_fn, "fn", None)
    if python_fn is None or target is None or options is None or not hasattr(src, "signature"):
        return None
    return {
        "src": src,  # kept here, never sent
        "module": python_fn.__module__,
        "qualname": python_fn.__qualname__,
        "file": python_fn.__code__.co_filename,
        "cache_key": jit_fn.cache_key,
        "signature": src.signature,
        "constexprs": src.constants,
        "attrs": src.attrs,
        "target": target,
        "options": dict(options.__dict__),
        "env_vars": captured.get("env_vars"),
        "sys_path": list(sys.path),
        "package_path": list(sys.modules["hf_mamba"].__path__),
    }


def in_cache(job):
    """Whether Triton's cache holds job's kernel already (the test its `compile` makes)."""
    src = job["src"]
    try:
        backend = make_backend(job["target"])
        options = backend.parse_options(dict(job["options"], **src.parse_options()))
        key = get_cache_key(src, backend, options, env_vars=job["env_vars"])
        group = get_cache_manager(hashlib.sha256(key.encode("utf-8")).hexdigest()).get_group(f"{src.name[:150]}.json")
    except Exception:  # noqa: BLE001 - another Triton: let a child try
        return False
    return bool(group)


# The child's program: the kernels package without the model (and Transformers) around it, which
# would take seconds more to import, then the compile.
_CHILD = "; ".join([
    "import pickle, sys, types",
    "job = pickle.loads(sys.stdin.buffer.read())",
    "sys.path[:0] = [p for p in job['sys_path'] if p not in sys.path]",
    "package = types.ModuleType('hf_mamba')",
    "package.__path__ = job['package_path']",
    "sys.modules['hf_mamba'] = package",
    "sys.exit(__import__('hf_mamba.kernels._compile_processes', fromlist=['_']).compile_here(job))",
])


def compile_in_child(job):
    """Have a child process compile job into this process's Triton cache; whether it did."""
    env = {**os.environ, "TRITON_CACHE_DIR": triton.knobs.cache.dir}
    env.pop("TRITON_INTERPRET", None)
    try:
        data = pickle.dumps({k: v for k, v in job.items() if k != "src"})
        done = subprocess.run(
            [sys.executable, "-c", _CHILD], input=data, env=env, capture_output=True, timeout=600
        )
    except Exception:  # noqa: BLE001 - unpicklable job, no interpreter, a timeout: this process compiles
        return False
    return done.returncode == 0


def _kernel(job):
    """The JITFunction job names, imported as its module is, or loaded from its file for a generated one."""
    try:
        module = importlib.import_module(job["module"])
    except ImportError:
        from .selective_scan.codegen import load_generated

        module = load_generated(job["file"], job["module"])
    fn = module
    for part in job["qualname"].split("."):
        fn = getattr(fn, part)
    return fn


def compile_here(job):
    """Compile job into TRITON_CACHE_DIR; the exit status: 0, or 3 where the kernel found is not the
    parent's (another source), which the parent then compiles itself."""
    fn = _kernel(job)
    if fn.cache_key != job["cache_key"]:
        return 3
    source = ASTSource(fn, job["signature"], job["constexprs"], job["attrs"])
    triton_compile(source, target=job["target"], options=job["options"], _env_vars=job["env_vars"])
    return 0
