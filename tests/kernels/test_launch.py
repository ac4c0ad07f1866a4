"""The fast launch path (`hf_mamba.kernels._launch.launch`): a cached compiled kernel is reused only
for arguments Triton would specialise alike."""

import concurrent.futures
import os
import threading

import pytest
import torch
import triton
import triton.language as tl
from hf_mamba.kernels import _launch


def test_signature_separates_what_triton_specialises_on():
    sig = _launch._signature
    x = torch.zeros(64)
    # ints: == 1, divisibility by 16, 32-bit range (16 and 32 specialise alike; 1, 2 and 2^40 do not)
    assert sig((16,)) == sig((32,)) == sig((0,))
    assert len({sig((1,)), sig((2,)), sig((16,)), sig((2**40,)), sig((2**40 + 1,))}) == 5
    # bools are not ints; None, floats by value
    assert sig((True,)) != sig((1,)) and sig((False,)) != sig((0,))
    assert sig((None,)) != sig((0,)) and sig((1e-5,)) != sig((1e-6,))
    # tensors: dtype and a 16-byte aligned data pointer
    assert sig((x,)) == sig((torch.ones(8),)) == sig((x[4:],))
    assert sig((x,)) != sig((x[1:],)) and sig((x,)) != sig((x.to(torch.bfloat16),))
    assert sig((torch.nn.Parameter(x),)) == sig((x,))
    # anything else: no key, so the ordinary launch path
    assert sig((x, object())) is None


def test_trailing_values_follow_the_signature():
    def kernel(p, n, A: tl.constexpr, B: tl.constexpr = 7):
        pass

    fake = type("Fake", (), {"fn": staticmethod(kernel)})()
    assert _launch._trailing_values(fake, 2, {"A": 3, "num_warps": 4}) == (3, 7)
    assert _launch._trailing_values(fake, 2, {"B": 1, "A": 3}) == (3, 1)


@triton.jit
def _strided_copy_kernel(p_x, p_y, n, s_x, s_y, SCALE: tl.constexpr, BLOCK: tl.constexpr):
    o = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = o < n
    tl.store(p_y + o * s_y, tl.load(p_x + o * s_x, mask=m) * SCALE, mask=m)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the fast path runs on CUDA only")
def test_fast_launch_reuses_only_matching_kernels():
    """Launches that alternate strides of 1 and 2, aligned and unaligned pointers, dtypes and
    constexprs all compute what a plain launch does; repeats reuse a cached kernel."""
    base = torch.arange(4096, device="cuda", dtype=torch.float32)
    cases = [
        (base, 1, 1, 2.0), (base[1:], 1, 1, 2.0), (base, 2, 1, 2.0), (base[3:], 2, 1, 3.0),
        (base.to(torch.bfloat16), 1, 1, 2.0), (base, 1, 16, 2.0), (base[16:], 16, 1, 2.0),
    ]
    _launch._compiled.clear()
    for _ in range(3):  # the first round fills the cache, the later ones launch from it
        for x, s_x, s_y, scale in cases:
            n = 100
            y = torch.full((n * s_y + 5,), -1.0, device="cuda", dtype=x.dtype)
            _launch.launch(
                _strided_copy_kernel, (triton.cdiv(n, 64),), x, y[1:], n, s_x, s_y, SCALE=scale, BLOCK=64
            )
            expected = torch.full_like(y, -1.0)
            expected[1:][: n * s_y : s_y] = x[: n * s_x : s_x][:n] * scale
            torch.testing.assert_close(y, expected, rtol=0, atol=0)
    assert len(_launch._compiled) == len(cases)


@triton.jit
def _scaled_copy_kernel(p_x, p_y, n, s_x, s_y, SCALE: tl.constexpr, BLOCK: tl.constexpr):
    """What _strided_copy_kernel computes, written another way (the stand-in while it compiles)."""
    o = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = o < n
    x = tl.load(p_x + o * s_x, mask=m, other=0.0)
    tl.store(p_y + o * s_y, x * SCALE, mask=m)


class _FakeKernel:
    """Stands for a JITFunction in `launch_once_compiled`'s decisions (nothing compiles or runs)."""

    __name__ = "fake_kernel"


def _fake_background(monkeypatch, compile_fn):
    """launch_once_compiled as on CUDA, its launches recorded and its background compile `compile_fn`."""
    launched = []
    monkeypatch.setattr(_launch, "_FAST_PATH", True)
    monkeypatch.setattr(_launch, "JITFunction", _FakeKernel)
    monkeypatch.setattr(_launch, "launch", lambda kernel, grid, *a, **k: launched.append(kernel))
    monkeypatch.setattr(_launch, "_launch_keyed", lambda kernel, *a: launched.append(kernel))
    monkeypatch.setattr(_launch, "_compile", compile_fn)
    monkeypatch.setattr(_launch, "_background", {})
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: capturing[0])
    return launched


capturing = [False]  # what the stubbed torch.cuda.is_current_stream_capturing answers


def test_fallback_runs_until_the_kernel_compiled_in_the_background(monkeypatch):
    """The first call starts one background compile per specialisation and launches the fallback, as do
    calls until that compile is done; then the kernel launches. Other arguments' specialisations compile
    on their own."""

    release = threading.Event()

    def compile_fn(future, kernel, device, grid, args, constexprs):
        started.append((kernel, args, constexprs))
        release.wait(10)
        future.set_result(None)

    started = []
    launched = _fake_background(monkeypatch, compile_fn)
    kernel, fallback = _FakeKernel(), _FakeKernel()
    x = torch.zeros(64)
    for _ in range(3):
        _launch.launch_once_compiled(kernel, fallback, (1,), x, 16, BLOCK=64)
    assert launched == [fallback] * 3 and len(started) == 1
    # the compile got stand-ins: no reference to x, the same dtype and alignment
    (_, args, constexprs), = started
    assert args[0] is not x and args[0].dtype == x.dtype and args[0].data_ptr() % 16 == 0
    assert args[1] == 16 and constexprs == {"BLOCK": 64}
    release.set()
    _launch.wait_for_background_compiles(timeout=10)
    capturing[0] = True  # a CUDA graph capture: the kernel never launched, so the fallback still runs
    try:
        _launch.launch_once_compiled(kernel, fallback, (1,), x, 16, BLOCK=64)
    finally:
        capturing[0] = False
    assert launched[-1] is fallback
    _launch.launch_once_compiled(kernel, fallback, (1,), x, 16, BLOCK=64)
    assert launched[-1] is kernel
    # an unaligned pointer is another specialisation: its own compile, the fallback meanwhile
    release.clear()
    _launch.launch_once_compiled(kernel, fallback, (1,), x[1:], 16, BLOCK=64)
    assert launched[-1] is fallback and len(started) == 2 and started[-1][1][0].data_ptr() % 16 == 4
    release.set()
    _launch.wait_for_background_compiles(timeout=10)


def test_failed_background_compile_keeps_the_fallback_and_warns_once(monkeypatch):
    def compile_fn(future, *args):
        future.set_exception(RuntimeError("ptxas died"))

    launched = _fake_background(monkeypatch, compile_fn)
    kernel, fallback = _FakeKernel(), _FakeKernel()
    _launch.launch_once_compiled(kernel, fallback, (1,), 3)
    with pytest.warns(UserWarning, match="compiling fake_kernel failed .*ptxas died"):
        _launch.launch_once_compiled(kernel, fallback, (1,), 3)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _launch.launch_once_compiled(kernel, fallback, (1,), 3)
    assert launched == [fallback] * 3


def test_no_background_compile_without_a_distinct_fallback(monkeypatch):
    launched = _fake_background(monkeypatch, lambda *a: pytest.fail("nothing compiles in the background"))
    kernel = _FakeKernel()
    _launch.launch_once_compiled(kernel, kernel, (1,), 3)
    assert launched == [kernel]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the background compile runs on CUDA only")
def test_background_compile_on_cuda():
    """A real background compile: the fallback computes the result until the kernel is built (in another
    thread, from stand-in arguments), then the kernel does, through the fast path."""
    x = torch.arange(1000, device="cuda", dtype=torch.float32)
    args = (x, torch.zeros_like(x), 1000, 1, 1)
    constexprs = dict(SCALE=3.5, BLOCK=64)
    key = (_strided_copy_kernel, torch.cuda.current_device(), _launch._signature(args), *constexprs.items())
    assert key not in _launch._compiled and key not in _launch._background
    results = []
    for _ in range(2):
        y = torch.zeros_like(x)
        _launch.launch_once_compiled(_strided_copy_kernel, _scaled_copy_kernel, (16,), x, y, *args[2:], **constexprs)
        results.append(y)
        assert key in _launch._background  # started by the first call
        _launch.wait_for_background_compiles(timeout=120)
    assert _launch._background[key].exception() is None
    assert key in _launch._compiled  # the second call launched the kernel itself
    for y in results:
        torch.testing.assert_close(y, x * 3.5, rtol=0, atol=0)


def test_compile_ahead_hands_each_compile_to_its_pool(monkeypatch):
    """compile_ahead's pass compiles each launch: what Triton submits (here a fake kernel's warmup submits as
    a JITFunction's does under AsyncCompileMode) runs in a pool thread, which then builds its launcher; a
    kernel Triton already had (warmup returns it) submits nothing."""
    import inspect

    from triton.runtime import _async_compile

    compiled = object()
    ran, built = [], []

    class Compiling:  # Triton's JITFunction.warmup for a kernel not compiled yet
        def warmup(self, *args, grid, **constexprs):
            mode = _async_compile.active_mode.get()
            extra = [lambda future: None] if "cleanup_fn" in inspect.signature(mode.submit).parameters else []
            return mode.submit("key", lambda: ran.append(threading.current_thread().name) or compiled,
                               lambda kernel: None, *extra)

    class Cached:
        def warmup(self, *args, grid, **constexprs):
            return compiled

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(_launch, "_build_launcher", lambda k: built.append((k, threading.current_thread().name)))

    def dry_pass():
        _launch.launch(Compiling(), (4,), 7, BLOCK=16)
        _launch.launch(Cached(), (1,), 3)

    assert _launch.compile_ahead(dry_pass)
    assert len(ran) == 1 and ran[0].startswith("hf_mamba-compile")
    assert built == [(compiled, ran[0])]  # the launcher, in the thread that compiled it
    assert _launch._COMPILE_ONLY.get() is None  # after the pass, launches run again


COMPILE_IN_A_CHILD = """
import json, os, sys
os.environ.pop("TRITON_INTERPRET", None)
import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import make_backend
from triton.runtime import driver

TARGET = GPUTarget("cuda", 90, 32)
launchers, stages_run = [], []


class NoGpuDriver:  # what JITFunction.warmup asks of the driver, answered as an H100's; nothing launches
    def get_current_device(self):
        return 0

    def get_current_stream(self, device):
        return 0

    def get_current_target(self):
        return TARGET

    def launcher_cls(self, src, metadata):
        launchers.append(metadata.name)


driver.set_active(NoGpuDriver())
backend_class = type(make_backend(TARGET))
add_stages = backend_class.add_stages


def counted_add_stages(self, stages, options, *rest):  # each compiler stage this process runs, counted
    add_stages(self, stages, options, *rest)
    for name, stage in list(stages.items()):
        stages[name] = lambda src, metadata, stage=stage, name=name: stages_run.append(name) or stage(src, metadata)


backend_class.add_stages = counted_add_stages
from hf_mamba.kernels import _compile_processes, _launch
from hf_mamba.kernels.rms_norm import triton_rms_norm

children = []  # what each worker compile returned
worker_compile = _compile_processes._Worker.compile
_compile_processes._Worker.compile = lambda self, job: children.append(worker_compile(self, job)) or children[-1]
x, w = torch.randn(8, 64, dtype=torch.bfloat16), torch.ones(64)
passes = []
# with workers; again (Triton's cache has it now); without workers, into another, empty cache
for processes, cache in (("1", sys.argv[1]), ("1", sys.argv[1]), ("", sys.argv[2])):
    os.environ["HF_MAMBA_COMPILE_PROCESSES"] = processes
    triton.knobs.cache.dir = cache
    triton_rms_norm._rms_norm_fwd_kernel.device_caches.clear()  # forget the kernel in this process
    del children[:], stages_run[:], launchers[:]
    assert _launch.compile_ahead(
        lambda: triton_rms_norm._norm_fwd(x, None, w, 1e-5, torch.float32, torch.bfloat16, True)
    )
    passes.append({"children": list(children), "stages": list(stages_run), "launchers": list(launchers)})
print(json.dumps(passes))
"""


def test_compile_ahead_compiles_in_a_child_process(tmp_path):
    """compile_ahead compiles a real kernel (for sm_90, no GPU needed) in a worker process into Triton's cache,
    where this process finds it without running a compiler stage, then builds its launcher; a second pass
    finds the cache and asks no worker. Without HF_MAMBA_COMPILE_PROCESSES=1 this process compiles (which
    also shows the stage count sees compiles)."""
    import json
    import subprocess
    import sys

    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    command = [sys.executable, "-c", COMPILE_IN_A_CHILD, str(tmp_path / "a"), str(tmp_path / "b")]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    workers, cached, threads = json.loads(result.stdout.splitlines()[-1])
    assert workers == {"children": [True], "stages": [], "launchers": ["_rms_norm_fwd_kernel"]}
    assert cached == {"children": [], "stages": [], "launchers": ["_rms_norm_fwd_kernel"]}
    assert threads["children"] == [] and {"ttir", "ptx"} <= set(threads["stages"])
    assert threads["launchers"] == ["_rms_norm_fwd_kernel"]


def test_launcher_builds_only_where_needed_and_never_raise(monkeypatch):
    """_build_launcher builds a compiled kernel's launcher unless it has one; a build that fails is left to
    the kernel's first launch (which reports it), so a pass ahead or a background compile is not lost."""
    from types import SimpleNamespace

    built = []
    active = SimpleNamespace(launcher_cls=lambda src, metadata: built.append(src))
    driver = SimpleNamespace(active=active)
    monkeypatch.setattr(_launch, "triton", SimpleNamespace(runtime=SimpleNamespace(driver=driver)))
    _launch._build_launcher(SimpleNamespace(_run=None, src="new", metadata=None))
    _launch._build_launcher(SimpleNamespace(_run=object(), src="launched before", metadata=None))
    _launch._build_launcher(None)
    assert built == ["new"]

    def failing(src, metadata):
        raise RuntimeError("no C compiler")

    active.launcher_cls = failing
    _launch._build_launcher(SimpleNamespace(_run=None, src="new", metadata=None))  # no error


@pytest.mark.skipif(not torch.cuda.is_available(), reason="compile_ahead runs on CUDA only")
def test_compile_ahead_leaves_the_first_launch_nothing_to_build():
    """After compile_ahead, a new specialisation's kernel and launcher are built (the launcher in the
    pool), and its first launch computes the right result."""

    built = []
    build = _launch._build_launcher

    def recording_build(compiled):
        built.append(threading.current_thread().name)
        build(compiled)

    x = torch.arange(300, device="cuda", dtype=torch.float32)
    y = torch.zeros_like(x)
    args = (x, y, 300, 1, 1)
    constexprs = dict(SCALE=5.25, BLOCK=32)  # a specialisation no other test compiles
    _launch._build_launcher = recording_build
    try:
        assert _launch.compile_ahead(lambda: _launch.launch(_strided_copy_kernel, (10,), *args, **constexprs))
    finally:
        _launch._build_launcher = build
    assert built and all(name.startswith("hf_mamba-compile") for name in built)
    torch.testing.assert_close(y, torch.zeros_like(x), rtol=0, atol=0)  # nothing ran
    _launch.launch(_strided_copy_kernel, (10,), *args, **constexprs)
    torch.testing.assert_close(y, x * 5.25, rtol=0, atol=0)


def test_exit_waits_for_a_background_compile(tmp_path):
    """A process that ends while a kernel compiles in the background waits for the compile and exits cleanly:
    a daemon thread would be stopped inside Triton's C++ compiler at exit, which aborts the process."""
    import subprocess
    import sys
    import textwrap

    done = tmp_path / "compiled"
    # the kernels without the model around them (hf_mamba's own __init__ imports Transformers: seconds)
    script = textwrap.dedent(f"""
        import sys
        import time
        import types
        package = types.ModuleType("hf_mamba")
        package.__path__ = {list(sys.modules["hf_mamba"].__path__)!r}
        sys.modules["hf_mamba"] = package
        from hf_mamba.kernels import _launch

        class Kernel:
            def warmup(self, *args, grid, **constexprs):
                time.sleep(1.0)
                open({str(done)!r}, "w").close()

        _launch.torch.cuda.device = lambda device: __import__("contextlib").nullcontext()
        key = ("kernel", 0, (), )
        assert not _launch._compiled_in_background(key, Kernel(), 0, (1,), (), {{}})
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert done.exists()


def test_compile_workers_survive_failed_jobs_and_dead_children(monkeypatch):
    """A job a worker cannot compile (its kernel's module does not exist) answers False and leaves the worker
    serving the next; a worker that dies answers False from then on, so its compiles fall back to this
    process; an unpicklable job answers False too."""
    from hf_mamba.kernels import _compile_processes

    monkeypatch.setenv("HF_MAMBA_COMPILE_PROCESSES", "1")
    missing = {"src": None, "module": "hf_mamba.kernels.no_such_module", "qualname": "kernel", "file": "/nowhere.py"}
    workers = _compile_processes.compile_workers(1)
    try:
        assert workers.compile(missing) is False
        assert workers.compile({**missing, "unpicklable": lambda: None}) is False
        assert workers.compile(missing) is False
        (worker,) = workers._started
        assert worker.process is not None and worker.process.poll() is None  # still serving
    finally:
        workers.close()
    monkeypatch.setattr(_compile_processes, "_CHILD", "import sys; sys.exit(0)")  # a child that dies at once
    workers = _compile_processes.compile_workers(1)
    try:
        assert workers.compile(missing) is False and workers._started[0].process is None
        assert workers.compile(missing) is False
    finally:
        workers.close()
    monkeypatch.setenv("HF_MAMBA_COMPILE_PROCESSES", "0")
    assert _compile_processes.compile_workers(4) is None


def test_background_compiles_start_once_no_compile_ahead_pass_runs():
    """A background compile (`launch_once_compiled`'s faster kernel) started during compile_ahead's passes waits
    until the last has ended: it would compete with their compiles, which the first step waits for."""
    started = threading.Event()

    class Kernel:  # stands in for a JITFunction: records when its compile begins
        def warmup(self, *args, grid, **constexprs):
            started.set()

    future = concurrent.futures.Future()
    thread = threading.Thread(target=_launch._compile, args=(future, Kernel(), -1, (1,), [], {}))
    with _launch._ahead_pass():
        with _launch._ahead_pass():  # nested passes (generate()'s inside a training step's, say)
            thread.start()
            assert not started.wait(0.2)
        assert not started.wait(0.2)  # one pass still runs
    assert started.wait(10)
    thread.join(10)
    assert future.result(0) is None and _launch._ahead_passes == 0
