"""Measuring tools shared by the suites: repeated timings, peak memory, the
bytes held in fairseq's incremental state, and what machine this is."""
import ctypes
import functools
import gc
import hashlib
import os
import platform
import statistics
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from linear_fairseq.modules.incremental import SPARES

# --dtype: the training suites' weights and activations (half precision as fairseq's --bf16 / --fp16 run a model)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def summary(values):
    """Median and spread of repeated measurements."""
    values = [float(v) for v in values]
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "runs": values,
    }


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


# -- memory -------------------------------------------------------------------
def status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def release_free_memory() -> None:
    """Return freed heap to the OS, so one run's leftovers do not hide the next one's peak."""
    gc.collect(1)  # young objects: a full collection of fairseq's heap takes ~0.2 s
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters
HEAP_BLOCKS_UP_TO = 2**30
GLIBC_DEFAULT = 128 * 1024  # both thresholds as a process starts


def _mallopt(trim: int, mmap: int) -> bool:
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc.mallopt(M_TRIM_THRESHOLD, trim) == 1 and libc.mallopt(M_MMAP_THRESHOLD, mmap) == 1
    except (OSError, AttributeError):  # not glibc
        return False


@contextmanager
def freed_memory(mode: str):
    """mode "kept": within the block glibc keeps freed memory for reuse rather
    than hand it back to the OS (blocks up to 1 GiB come from the heap instead
    of mappings of their own, and the heap's free top is not trimmed); after it,
    glibc's starting thresholds (128 KiB), held fixed. By default a training
    step's large temporaries are mapped anew and faulted in page by page every
    step, which on the development CPU took a quarter to a third of a FLASH
    step (system time, varying from run to run). "default": the allocator as
    it is. Yields what the block ran with: the mode, or why "kept" was not."""
    kept = mode == "kept" and _mallopt(2**31 - 1, HEAP_BLOCKS_UP_TO)
    try:
        yield mode if kept or mode != "kept" else "default (glibc's mallopt is not available here)"
    finally:
        if kept:
            _mallopt(GLIBC_DEFAULT, GLIBC_DEFAULT)


def reset_peak_rss() -> bool:
    """Reset the kernel's high-water mark of this process's RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class PeakMemory:
    """Peak memory of a block above what was held when it started. CPU: the
    process's resident set (the kernel's high-water mark, reset at the start;
    where it cannot be reset, RSS sampled every 5 ms by a thread). CUDA:
    torch's max_memory_allocated."""

    def __init__(self, device: str):
        self.device = device
        self.peak = 0

    def __enter__(self):
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            return self
        release_free_memory()
        self.base = status_kib("VmRSS") * 1024
        self.sampler = None
        if not reset_peak_rss():
            self.sampler = threading.Thread(target=self._sample, daemon=True)
            self.peak_rss, self.running = self.base, True
            self.sampler.start()
        return self

    def _sample(self):
        while self.running:
            self.peak_rss = max(self.peak_rss, status_kib("VmRSS") * 1024)
            time.sleep(0.005)

    def __exit__(self, *exc):
        if self.device == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.base
        elif self.sampler is None:
            self.peak = status_kib("VmHWM") * 1024 - self.base
        else:
            self.running = False
            self.sampler.join()
            self.peak = self.peak_rss - self.base
        return False

    @property
    def mib(self) -> float:
        return self.peak / 2**20


def softmax_cache_bytes(incremental_state) -> int:
    """Bytes of the caches of fairseq's own attention (the buffers holding
    prev_key) in an incremental state: a hybrid stack's softmax layers."""
    if isinstance(incremental_state, dict):
        if "prev_key" in incremental_state:
            return state_bytes(incremental_state)
        return sum(softmax_cache_bytes(v) for v in incremental_state.values())
    if isinstance(incremental_state, (list, tuple)):
        return sum(softmax_cache_bytes(v) for v in incremental_state)
    return 0


def state_bytes(incremental_state) -> int:
    """Bytes of every tensor in a fairseq incremental state (nested dicts), the
    decoder's spares aside (scratch a reorder writes into, not carried by a hypothesis;
    they count in the peak memory)."""
    if isinstance(incremental_state, torch.Tensor):
        return incremental_state.numel() * incremental_state.element_size()
    if isinstance(incremental_state, dict):
        return sum(state_bytes(v) for k, v in incremental_state.items() if k != SPARES)
    if isinstance(incremental_state, (list, tuple)):
        return sum(state_bytes(v) for v in incremental_state)
    return 0


# -- time budget -----------------------------------------------------------------
def projected_seconds(history, size):
    """Time of a run at `size` from measured (size, seconds) pairs: the last two
    fitted by t = a n + b n^2 (a, b >= 0; a linear family has b ~ 0, softmax
    decoding grows toward n^2); from one pair, the worst case t ~ n^2."""
    if not history:
        return 0.0
    if len(history) == 1:
        (n1, t1), = history
        return t1 * (size / n1) ** 2
    (n0, t0), (n1, t1) = history[-2:]
    b = max(0.0, (t1 / n1 - t0 / n0) / (n1 - n0))
    a = max(0.0, t1 / n1 - b * n1)
    return a * size + b * size**2


def autotune_briefly() -> None:
    """Where GPU_CHECK_AUTOTUNE_MS is set (scripts/gpu_check.sh sets it), Triton's autotuner
    times each configuration over about that many milliseconds (and a tenth of it warming
    up) rather than its default 100 (and 25): fla-core's chunked kernels try up to 48
    configurations each, for every new head size and dtype, and the check meets several.
    Call it before the first autotuned launch (an autotuner keeps the timer it first took)."""
    text = os.environ.get("GPU_CHECK_AUTOTUNE_MS")
    if not text:
        return
    try:
        ms = float(text)
    except ValueError:
        ms = -1.0
    if not ms > 0:
        raise SystemExit(f"GPU_CHECK_AUTOTUNE_MS={text}: give milliseconds above 0, e.g. 10")
    import triton.testing
    triton.testing.do_bench = functools.partial(triton.testing.do_bench, warmup=ms / 10, rep=ms)


@contextmanager
def threads(n):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


# -- the machine -------------------------------------------------------------------
def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def code_digest() -> str:
    """sha256 of the code a measurement runs through: the plugin and the
    harness (*.py) and the model configs the suites read (configs/mt/model)."""
    from .models import RECOMMENDED

    root = Path(__file__).resolve().parents[1]
    files = sorted([*root.glob("linear_fairseq/**/*.py"), *root.glob("benchmarks/*.py"), *RECOMMENDED.glob("*.yaml")])
    h = hashlib.sha256()
    for f in files:
        h.update(f.relative_to(root).as_posix().encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def machine(device: str) -> dict:
    import fairseq

    info = {
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "threads": torch.get_num_threads(),
        "cpus_usable": len(os.sched_getaffinity(0)),  # fewer than cpu_count when pinned (taskset)
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "fairseq": getattr(fairseq, "__version__", "unknown"),
        "device": device,
    }
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info
