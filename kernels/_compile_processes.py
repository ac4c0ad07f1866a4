"""Triton compiles in child processes, for `compile_ahead` and the background compiles of `_launch`.

Why: Triton compiles partly under Python's global lock, so compiles in threads of one process get in each
other's way. On an H100 machine's host (16 cores) the compiles of a first 130M training step, 8 threads
side by side, took 54 s of compiling in all and 10.3 s the slowest (one after another on the CI machine's
CPU: 10.6 s in all, 2.9 s the slowest), and the step waited 14 s for them. Child processes have no lock to
share.

How: `ProcessCompiles` is the executor Triton's `AsyncCompileMode` submits each compile to. It reads what
to compile from the submitted function (the kernel, its specialisation, target and options) and, unless
Triton's cache has it, has one of its `CompileWorkers` compile exactly that into the cache; then it runs the
submitted function, which finds the result there, and builds the kernel's launcher. The workers start
together at the first compile that needs one (each imports torch and Triton: seconds) and serve every
compile of the pass, so that start is paid once. Anything unexpected (a Triton whose submitted function
holds other things, a kernel a worker cannot import, a worker that dies) leaves the compile to the
submitted function, in this process, as without this module: never a different result, at worst the old
speed. The workers are plain subprocesses, not multiprocessing's, which would import the user's `__main__`
script again.

Off unless HF_MAMBA_COMPILE_PROCESSES=1: compiles then run in compile_ahead's threads, as they always did.
Not the default because the workers' start (the first compile back 6.9 s into the pass) costs more than
they save where few kernels compile: on one H100 the first training step took 13.7 s with workers against
16.0 s with threads, but the first generate() 12.15 s against 5.74 s (docs/kernels.md, "Compile ahead").
"""

import contextlib
import hashlib
import importlib
import json
import os
import pickle
import queue
import struct
import subprocess
import sys
import threading

try:
    import triton
    from triton.compiler import ASTSource
    from triton.compiler import compile as triton_compile
    from triton.compiler.compiler import make_backend
    from triton.runtime.cache import get_cache_key, get_cache_manager
except ImportError:  # the PyTorch paths import this module too, and need no Triton
    triton = None


class ProcessCompiles:
    """An executor for Triton's AsyncCompileMode: each submitted compile runs in `threads` (a
    concurrent.futures executor), whose thread has one of `workers` (CompileWorkers, or None) compile it."""

    def __init__(self, threads, build_launcher, workers):
        self._threads = threads
        self._build_launcher = build_launcher
        self._workers = workers

    def submit(self, compile_fn):
        job = compile_job(compile_fn) if self._workers is not None else None
        return self._threads.submit(self._compile, job, compile_fn)

    def _compile(self, job, compile_fn):
        if job is not None and not in_cache(job):  # a worker costs seconds to start: not for a cache hit
            self._workers.compile(job)
        kernel = compile_fn()  # a cache hit where a worker compiled it
        self._build_launcher(kernel)
        return kernel


def compile_workers(count):
    """CompileWorkers(count) where HF_MAMBA_COMPILE_PROCESSES=1 (and Triton is installed), else None."""
    enabled = triton is not None and os.environ.get("HF_MAMBA_COMPILE_PROCESSES") == "1"
    return CompileWorkers(count) if enabled else None


class CompileWorkers:
    """Up to `count` child processes compiling Triton kernels into this process's cache, started together at
    the first `compile`; `close()` ends them."""

    def __init__(self, count):
        self._count = count
        self._idle = queue.Queue()
        self._started = []
        self._lock = threading.Lock()

    def compile(self, job):
        """Have an idle worker compile job (waiting for one); whether it did."""
        with self._lock:
            if not self._started:
                env = {**os.environ, "TRITON_CACHE_DIR": triton.knobs.cache.dir}
                env.pop("TRITON_INTERPRET", None)
                for _ in range(self._count):
                    worker = _Worker(env)
                    self._started.append(worker)
                    self._idle.put(worker)
        worker = self._idle.get()
        try:
            return worker.compile(job)
        finally:
            self._idle.put(worker)

    def close(self):
        for worker in self._started:
            worker.close()


class _Worker:
    """One child process: a pickled job in (length-prefixed), one status byte out (0: compiled)."""

    def __init__(self, env):
        self.process = None
        try:
            setup = json.dumps({"sys_path": sys.path, "package_path": list(sys.modules["hf_mamba"].__path__)})
            self.process = subprocess.Popen(
                [sys.executable, "-c", _CHILD, setup], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL, env=env,
            )
        except Exception:  # noqa: BLE001 - no interpreter, no package path: this process compiles
            self.close()

    def compile(self, job):
        if self.process is None:
            return False
        try:
            data = _frame({k: v for k, v in job.items() if k != "src"})
        except Exception:  # noqa: BLE001 - an unpicklable job: this process compiles it
            return False
        try:
            self.process.stdin.write(data)
            self.process.stdin.flush()
            status = self.process.stdout.read(1)
        except OSError:  # a dead worker
            status = b""
        if not status:  # dead: this process compiles from now on
            self.close()
        return status == b"\0"

    def close(self):
        """Idle or dead here (never mid-compile), so nothing is lost: stop it at once."""
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            for pipe in (self.process.stdin, self.process.stdout):
                with contextlib.suppress(OSError):  # a write the dead child never read
                    pipe.close()
            self.process = None


def _frame(obj):
    """obj pickled, after its length (8 bytes): a job that fails to unpickle leaves the stream in step."""
    data = pickle.dumps(obj)
    return struct.pack("<Q", len(data)) + data


def _receive(stream):
    """The next object _frame framed, or None at the end of the stream."""
    size = stream.read(8)
    if len(size) < 8:
        return None
    return pickle.loads(stream.read(struct.unpack("<Q", size)[0]))


def compile_job(compile_fn):
    """What a worker needs to compile what Triton's submitted function would (its closure holds the
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
    }


def in_cache(job):
    """Whether Triton's cache holds job's kernel already (the test its `compile` makes)."""
    src = job["src"]
    try:
        backend = make_backend(job["target"])
        options = backend.parse_options(dict(job["options"], **src.parse_options()))
        key = get_cache_key(src, backend, options, env_vars=job["env_vars"])
        group = get_cache_manager(hashlib.sha256(key.encode("utf-8")).hexdigest()).get_group(f"{src.name[:150]}.json")
    except Exception:  # noqa: BLE001 - another Triton: let a worker try
        return False
    return bool(group)


# The child's program: the kernels package without the model (and Transformers) around it, which would take
# seconds more to import, then `serve`. Its stdout carries only the replies: anything printed goes to stderr.
_CHILD = "; ".join([
    "import json, os, sys, types",
    "replies = os.fdopen(os.dup(1), 'wb')",
    "os.dup2(2, 1)",
    "setup = json.loads(sys.argv[1])",
    "sys.path[:0] = [p for p in setup['sys_path'] if p not in sys.path]",
    "package = types.ModuleType('hf_mamba')",
    "package.__path__ = setup['package_path']",
    "sys.modules['hf_mamba'] = package",
    "__import__('hf_mamba.kernels._compile_processes', fromlist=['_']).serve(sys.stdin.buffer, replies)",
])


def serve(jobs, replies):
    """The worker's loop: compile each job read from jobs, reply with its status byte, until jobs ends."""
    while True:
        try:
            job = _receive(jobs)
        except Exception:  # noqa: BLE001 - a job that does not unpickle here: the parent compiles it
            replies.write(b"\1")
            replies.flush()
            continue
        if job is None:
            return
        try:
            status = compile_here(job)
        except Exception:  # noqa: BLE001 - the parent compiles it again and reports the error
            status = 1
        replies.write(bytes([status]))
        replies.flush()


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
    """Compile job into TRITON_CACHE_DIR; 0, or 3 where the kernel found is not the parent's (another
    source), which the parent then compiles itself."""
    fn = _kernel(job)
    if fn.cache_key != job["cache_key"]:
        return 3
    source = ASTSource(fn, job["signature"], job["constexprs"], job["attrs"])
    triton_compile(source, target=job["target"], options=job["options"], _env_vars=job["env_vars"])
    return 0
