"""Host-side helpers shared by the Triton launchers of every kernel folder."""

import concurrent.futures
import contextlib
import contextvars
import functools
import inspect
import os
import threading
import warnings

import torch

try:
    import triton
    from triton.runtime.jit import JITFunction
except ImportError:  # the PyTorch paths import this module too, and need no Triton
    triton = JITFunction = None
try:  # Triton >= 3.4: compiles submitted to an executor
    from triton.runtime import _async_compile
except ImportError:
    _async_compile = None

from ._compile_processes import ProcessCompiles, compile_workers


def device_guard(t):
    """Launch on t's GPU (Triton launches on the current device); nothing for CPU tensors (interpreter)
    or when t's GPU is already current (entering torch.cuda.device costs host time every layer)."""
    if not t.is_cuda or t.device.index == torch.cuda.current_device():
        return contextlib.nullcontext()
    return torch.cuda.device(t.device)


def sm_count(device):
    """Multiprocessors of a CUDA device (4 for CPU tensors under the interpreter), cached: launch
    sizes read it every call."""
    return _cuda_sm_count(device.index) if device.type == "cuda" else 4


@functools.cache
def _cuda_sm_count(index):
    return torch.cuda.get_device_properties(index).multi_processor_count


def seq_idx_args(seq_idx):
    """The (pointer, batch stride, step stride) kernel arguments of optional (batch, seqlen) document ids."""
    return (seq_idx, *seq_idx.stride()) if seq_idx is not None else (None, 0, 0)


def wide_index(seqlen, *tensors):
    """Whether a kernel's time offsets (step x time stride) can pass 2^31 for these (..., seqlen) tensors
    (None skipped): then its WIDE_INDEX variant indexes time tiles in 64 bits (a 2^20-token forward reads
    xz with a time stride of 2 d_inner). Only then: 64-bit tile indices cost the scan's backward about 5%."""
    stride = max((abs(t.stride(-1)) for t in tensors if t is not None), default=0)
    return (seqlen + 256) * stride >= 2**31


def cdiv(a, b):
    """ceil(a / b) for host-side grid and loop sizes. Plain Python: triton.cdiv and
    triton.next_power_of_2 are constexpr functions in recent Triton, about 9 us per host call on the
    CI machine's CPU, and a layer's forward + backward made 15 such calls."""
    return -(-a // b)


def next_power_of_2(n):
    """The smallest power of two >= n (0 for n = 0), as triton.next_power_of_2."""
    return 1 << (n - 1).bit_length() if n > 0 else 0


def launch(kernel, grid, *args, **constexprs):
    """kernel[grid](*args, **constexprs), with less host work where the same kernel has launched
    before with arguments Triton specialises alike.

    Why: JITFunction.run binds and specialises every argument and builds a cache key on every call,
    22-79 us per launch for our kernels (21-65 arguments) on the H200's host, against 8-18 us for
    the compiled kernel's own launcher (docs/kernels.md, "Host time"); a layer's training step makes
    about eleven launches and the step is host-bound. Here a signature key (`_signature`: per
    argument what Triton specialises on, or something finer) maps to the CompiledKernel that Triton
    itself chose the first time, and later calls go straight to its launcher (found by the
    arguments' values first, `_args_key`, which is cheaper to build). Triton has no public
    call for that launcher (`CompiledKernel.run` with the arguments JITFunction.run passes it), so
    this follows Triton >= 3.4's calling convention; the interpreter, older Triton and
    `plain_launches()` take the ordinary path.
    """
    if _COMPILE_ONLY.get() is not None:
        _compile_only(kernel, grid, args, constexprs)
        return
    fast = _FAST_PATH and not _PLAIN.get() and isinstance(kernel, JITFunction)
    args_key = _args_key(args) if fast else None
    if args_key is None:
        kernel[grid](*args, **constexprs)
        return
    _launch_keyed(kernel, grid, args, constexprs, torch.cuda.current_device(), args_key)


def _launch_key(kernel, device, args_key, constexprs):
    """The key of `_launches`. id(kernel): a JITFunction hashes in Python (its source hash, under a lock);
    the entry keeps the kernel alive, so its id stays its own."""
    return (id(kernel), device, args_key, *constexprs, *constexprs.values())


def _launch_keyed(kernel, grid, args, constexprs, device, args_key, key=None):
    """`launch`'s fast path, for arguments whose `_args_key` is args_key (not None); key: their
    `_launch_key`, where the caller has built it already."""
    if _COMPILE_ONLY.get() is not None:
        _compile_only(kernel, grid, args, constexprs)
        return
    if key is None:
        key = _launch_key(kernel, device, args_key, constexprs)
    entry = _launches.get(key)
    if entry is None:
        entry = _compiled_entry(kernel, grid, args, constexprs, device)
        if entry is None:  # launched by Triton
            return
        if len(_launches) >= _MAX_LAUNCH_KEYS:
            _launches.clear()
        _launches[key] = entry
    _, compiled, trailing = entry
    values = (*args, *trailing)
    grid = (*grid, 1, 1)
    stream = _current_stream(device)
    hooks = triton.knobs.runtime
    compiled.run(
        grid[0], grid[1], grid[2], stream, compiled.function, compiled.packed_metadata,
        compiled.launch_metadata(grid, stream, *values), hooks.launch_enter_hook, hooks.launch_exit_hook,
        *values,
    )


def _compiled_entry(kernel, grid, args, constexprs, device):
    """(kernel, CompiledKernel, trailing parameter values) for arguments Triton specialises as these
    (`_signature`), or None after launching through Triton: the first launch with this signature
    (Triton compiles if needed and returns the kernel it ran), or one with a tensor keyword."""
    key = (kernel, device, _signature(args), *constexprs.items())
    entry = _compiled.get(key)
    if entry is None:
        compiled = kernel[grid](*args, **constexprs)
        if not any(isinstance(v, torch.Tensor) for v in constexprs.values()):  # a tensor keyword: never cached
            _compiled[key] = (kernel, compiled, _trailing_values(kernel, len(args), constexprs))
    return entry


_FAST_PATH = hasattr(triton, "knobs")  # the launcher's calling convention of Triton >= 3.4 (False without Triton)
# Two caches: `_compiled` by what Triton specialises on (a new sequence length finds its kernel there),
# `_launches` in front of it by the arguments' values (`_args_key`), cheaper to build per call; cleared
# when full, since every new shape adds keys.
_compiled = {}  # (kernel, device, signature, *constexprs) -> (kernel, CompiledKernel, trailing parameter values)
_launches = {}  # (id(kernel), device, args key, *constexpr names, *constexpr values) -> the same entry
_MAX_LAUNCH_KEYS = 4096


# True while `compile_ahead` runs its function: `launch` then compiles the kernel and runs nothing.
_COMPILE_ONLY = contextvars.ContextVar("hf_mamba_compile_only", default=None)
# Set inside `plain_launches()`: every launch goes through Triton's JITFunction.run.
_PLAIN = contextvars.ContextVar("hf_mamba_plain_launches", default=False)


@contextlib.contextmanager
def plain_launches():
    """Within this context `launch` takes Triton's ordinary path (to time or record it)."""
    token = _PLAIN.set(True)
    try:
        yield
    finally:
        _PLAIN.reset(token)


# compile_ahead passes running: a background compile (`launch_once_compiled`) starts once none is.
_ahead_passes = 0
_ahead_passes_changed = threading.Condition()


@contextlib.contextmanager
def _ahead_pass():
    """Counts a compile_ahead pass in `_ahead_passes` while it runs."""
    global _ahead_passes
    with _ahead_passes_changed:
        _ahead_passes += 1
    try:
        yield
    finally:
        with _ahead_passes_changed:
            _ahead_passes -= 1
            _ahead_passes_changed.notify_all()


def _after_ahead_passes():
    """Return once no compile_ahead pass runs. Why: a background compile started inside a pass (the scan
    backward's faster variant, 3.7 + 7.9 s of compiling on the CI machine's CPU) competes with the pass's
    own compiles for the host and Python's global lock, and the first step waits for those, not for it:
    on that CPU the 15 compiles of the 130M model's first training step took 7.3-8.1 s in 8 threads
    alone and 11.2-11.7 s beside the two background compiles (docs/kernels.md, "Compile ahead")."""
    with _ahead_passes_changed:
        _ahead_passes_changed.wait_for(lambda: _ahead_passes == 0)


def compile_ahead(fn, *args):
    """Compile the Triton kernels fn(*args) launches, side by side, without running them; returns
    whether it did (it needs Triton >= 3.4 and compiled kernels: nothing under TRITON_INTERPRET=1 or
    inside another such pass).

    fn runs with every `launch` replaced by Triton's warmup (compile only), whose compiles go to a pool
    of threads (Triton's AsyncCompileMode), each thread compiling (in a worker process with
    HF_MAMBA_COMPILE_PROCESSES=1, `_compile_processes`) and then building the kernel's launcher
    (`_build_launcher`); this returns once all are. Why: a first training step compiles about ten
    kernels one after another, 41 s of compiling on an H200 (20 s of it the scan backward's second
    pass), where side by side they take less (Python's global lock keeps threads from taking only as
    long as the slowest: docs/kernels.md, "Compile ahead"). The
    torch ops of fn run as usual on its own tensors, whose values are garbage, so fn must not read
    kernel results on the host. A failure here is only warned about: the kernels then compile where
    they launch, as without this pass, and a compile error shows there."""
    if _async_compile is None or os.environ.get("TRITON_INTERPRET") == "1":
        return False
    if _COMPILE_ONLY.get() is not None or _async_compile.active_mode.get() is not None:
        return False
    token = _COMPILE_ONLY.set(True)
    count = min(8, os.cpu_count() or 1)
    workers = compile_workers(count)
    try:
        pool = concurrent.futures.ThreadPoolExecutor(count, thread_name_prefix="hf_mamba-compile")
        with _ahead_pass(), pool:  # the pass counts until the pool has finished
            # each compile (in a worker process where workers are on), then its launcher, in one pool thread
            with _async_compile.AsyncCompileMode(ProcessCompiles(pool, _build_launcher, workers)), torch.no_grad():
                fn(*args)
    except Exception as exc:  # noqa: BLE001 - see the docstring
        warnings.warn(f"hf_mamba: compiling kernels ahead failed ({exc!r}); they compile as they launch", stacklevel=2)
        return False
    finally:
        _COMPILE_ONLY.reset(token)
        if workers is not None:
            workers.close()
    return True


def _compile_only(kernel, grid, args, constexprs):
    """`launch` inside compile_ahead's pass: compile (or find) the kernel, run nothing."""
    kernel.warmup(*args, grid=grid, **constexprs)


def _build_launcher(compiled):
    """Build a compiled kernel's host launcher, which Triton otherwise builds at its first launch. Triton
    3.6 (the GPU machine's) makes it a C extension module per kernel signature, 0.25-0.4 s of the C
    compiler each on the CI machine's CPU, kept in Triton's cache where that first launch finds it
    (Triton 3.9 builds none). Touches no CUDA state, so it may run in any thread, even while a CUDA
    graph captures. None (a compile whose hook returned nothing) is skipped. Best effort: where it fails,
    the kernel's first launch builds the launcher as without this, and reports what goes wrong."""
    if compiled is None or getattr(compiled, "_run", None) is not None:
        return
    try:
        triton.runtime.driver.active.launcher_cls(compiled.src, compiled.metadata)
    except Exception:  # noqa: BLE001, S110 - see the docstring
        pass


def launch_once_compiled(kernel, fallback, grid, *args, **constexprs):
    """launch(kernel, ...) once kernel is compiled for arguments specialised as these; until then
    launch(fallback, ...), a kernel that computes the same and compiles faster, while kernel compiles
    in a background thread (started by the first such call). Where the fast path does not apply
    (interpreter, older Triton, `plain_launches()`) kernel launches, compiling as it goes.

    Why: the scan backward's fastest kernel takes three times as long to compile as a variant a few
    percent slower, and its compile bounded the first training step (docs/kernels.md, "First calls").
    A compile that fails in the background is warned about, and fallback stays."""
    fast = _FAST_PATH and not _PLAIN.get() and isinstance(kernel, JITFunction) and isinstance(fallback, JITFunction)
    args_key = _args_key(args) if fast and fallback is not kernel else None
    if args_key is None:
        launch(kernel, grid, *args, **constexprs)
        return
    device = torch.cuda.current_device()
    launch_key = _launch_key(kernel, device, args_key, constexprs)
    if launch_key in _launches:  # the usual case after the first steps
        _launch_keyed(kernel, grid, args, constexprs, device, args_key, launch_key)
        return
    key = (kernel, device, _signature(args), *constexprs.items())
    # While a CUDA graph captures, only a kernel launched before (its module loaded) switches in.
    ready = key in _compiled or (
        _compiled_in_background(key, kernel, device, grid, args, constexprs)
        and not torch.cuda.is_current_stream_capturing()
    )
    _launch_keyed(kernel if ready else fallback, grid, args, constexprs, device, args_key)


_background = {}  # (kernel, device, signature, *constexprs) -> concurrent.futures.Future of its compile


def _compiled_in_background(key, kernel, device, grid, args, constexprs):
    """Whether the background compile of `key` finished; starts it if none did."""
    future = _background.get(key)
    if future is None:
        future = _background[key] = concurrent.futures.Future()
        stand_ins = [_stand_in(a) for a in args]
        kwargs = {k: _stand_in(v) for k, v in constexprs.items()}
        # Not a daemon: the interpreter's exit waits for it. A daemon thread still compiling at exit is
        # stopped inside Triton's C++ compiler, which aborts the process (exit status 134).
        threading.Thread(
            target=_compile, args=(future, kernel, device, grid, stand_ins, kwargs),
            name="hf_mamba-background-compile",
        ).start()
        return False
    if not future.done():
        return False
    if future.exception() is not None:
        if not getattr(future, "warned", False):
            future.warned = True
            warnings.warn(
                f"hf_mamba: compiling {kernel.__name__} failed ({future.exception()!r}); a slower variant runs "
                "instead", stacklevel=3,
            )
        return False
    return True


def _compile(future, kernel, device, grid, args, constexprs):
    """Compile kernel for these arguments on `device` (in a thread of its own), once no compile_ahead pass runs."""
    try:
        _after_ahead_passes()
        workers = compile_workers(1) if _async_compile is not None else None
        with torch.cuda.device(device):
            if workers is None:
                _build_launcher(kernel.warmup(*args, grid=grid, **constexprs))
            else:  # in a worker process, so that it takes no host time from the steps running meanwhile
                try:
                    with concurrent.futures.ThreadPoolExecutor(1) as one:
                        with _async_compile.AsyncCompileMode(ProcessCompiles(one, _build_launcher, workers)):
                            kernel.warmup(*args, grid=grid, **constexprs)
                finally:
                    workers.close()
    except Exception as exc:  # noqa: BLE001 - reported where the result is read
        future.set_exception(exc)
    else:
        future.set_result(None)


def wait_for_background_compiles(timeout=None):
    """Wait until every kernel compiling in the background (`launch_once_compiled`) is built, so that
    what runs next is what runs in the steady state (benchmarks call this before timing)."""
    concurrent.futures.wait(list(_background.values()), timeout)


def _stand_in(a):
    """What Triton specialises a tensor argument on, without keeping the tensor (and its memory) alive
    while a compile runs: a small CPU tensor of the same dtype whose data pointer has the same alignment
    modulo 16."""
    if not isinstance(a, torch.Tensor):
        return a
    misalign = a.data_ptr() % 16
    return torch.empty(64, dtype=a.dtype)[misalign // a.element_size() :]


# The current CUDA stream's handle, as Triton's own launch path reads it (torch.cuda.current_stream
# builds a Stream object per call).
_current_stream = getattr(torch._C, "_cuda_getCurrentRawStream", lambda d: torch.cuda.current_stream(d).cuda_stream)


def _args_key(args):
    """The arguments as a hashable tuple at least as fine as `_signature`, cheaper to build: ints by
    value, tensors by dtype and their data pointer's offset from 16 bytes; None where `_signature` is."""
    key = []
    for a in args:
        kind = a.__class__
        if kind is int or a is None:
            key.append(a)
        elif kind is torch.Tensor or isinstance(a, torch.Tensor):  # the class test first: isinstance costs more
            key.append((a.dtype, a.data_ptr() & 15))
        elif kind is bool or kind is float:  # True == 1 and 2.0 == 2: kept apart from ints
            key.append((kind, a))
        else:
            return None
    return tuple(key)


def _signature(args):
    """What Triton specialises on, per argument, or something finer, as a hashable tuple; None where
    an argument is of a kind this does not know (the ordinary path handles it).

    Triton (3.x) specialises an int on == 1 and on divisibility by 16, and types it i32, i64 or
    u64 by its range; a tensor on its dtype and on a 16-byte aligned data pointer; None, bools
    and floats by value here (finer than Triton, which only types them)."""
    key = []
    for a in args:
        kind = a.__class__
        if kind is int:
            key.append(1 if a == 1 else (a & 15 == 0, -0x80000000 <= a < 0x80000000, a < 0x8000000000000000))
        elif a is None or kind is bool or kind is float:
            key.append((kind, a))
        elif isinstance(a, torch.Tensor):
            key.append((a.dtype, a.data_ptr() & 15 == 0))
        else:
            return None
    return tuple(key)


def _trailing_values(kernel, n_positional, constexprs):
    """The values of the kernel's parameters after the first n_positional, in signature order, as
    Triton's launcher takes them (constexprs included): given as keywords, or their defaults."""
    params = list(inspect.signature(kernel.fn).parameters.values())[n_positional:]
    return tuple(constexprs[p.name] if p.name in constexprs else p.default for p in params)
