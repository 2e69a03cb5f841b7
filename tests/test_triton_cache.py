"""Kernels compiled ahead for the GPU check (benchmarks.triton_cache): a launch
through Triton's runtime on an sm_90 GPU finds them, and scripts/gpu_check.sh
unpacks them and says what they spared."""
import io
import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Built, then replayed in a fresh cache with Triton's driver answering as an sm_90 GPU: every
# launch of the recorded workloads through JITFunction.run (each configuration of an autotuned
# one, as its autotuner runs them) counts the kernels Triton compiles (its first stage, make_ttir).
REPLAY = r"""
import json, sys
from pathlib import Path
from triton.backends.nvidia import compiler as nvidia
from benchmarks import triton_cache as tc
from benchmarks.triton_compile import with_heuristics

out, fresh = Path(sys.argv[1]), Path(sys.argv[2])
tc.TRAIN, tc.DECODE_BATCHES = (("float32", 2, 300),), (1, 16)
rows = [("memsizer", ("--short-conv", "4", "--local-window", "64"))]
built = tc.build(90, out, workloads=("models",), family_rows=rows, log=lambda *a: None)

def replay(cache):
    import os
    os.environ["TRITON_CACHE_DIR"] = str(cache)
    calls, compiled = [], []
    with tc.shown_gpu(90):
        for family, flags in rows:
            tc.model_launches(family, flags, calls)  # recorded as they come: (kernel, args, kwargs, configs)
        first = nvidia.CUDABackend.make_ttir
        nvidia.CUDABackend.make_ttir = staticmethod(lambda *a, **k: (compiled.append(1), first(*a, **k))[1])
        try:
            for kernel, args, kwargs, configs in calls:
                kernel, kwargs = with_heuristics(kernel, args, kwargs)
                for config in configs or [None]:
                    extra = config.all_kwargs() if config else {}
                    kernel.run(*args, grid=(1,), warmup=True, **kwargs, **extra)
                    kernel.device_caches.clear()  # the next launch looks in the cache on disk again
        finally:
            nvidia.CUDABackend.make_ttir = first
    return len(calls), len(compiled)

record = fresh / "record.json"
os_cache = fresh / "unpacked"
import os
os.environ["TRITON_CACHE_DIR"] = str(os_cache)
line = tc.unpack(out, record)
launches, from_ahead = replay(os_cache)
_, from_nothing = replay(fresh / "empty")
print(json.dumps({"built": built, "line": line, "record": json.loads(record.read_text()), "launches": launches,
                  "compiled_with_cache": from_ahead, "compiled_without": from_nothing}))
"""


def test_kernels_compiled_ahead_are_found_by_a_launch_on_an_sm_90_gpu(tmp_path):
    """The builder records a workload's launches (MemSizer's LM with local precision: its
    decoding step and window kernels at batch 1 and 16, and its training pass's window
    kernels), compiles each specialization into a cache and packs it; unpacked into a
    fresh cache, every launch of the same workload through Triton's JIT runtime, its
    driver answering as an sm_90 GPU, finds its kernel and compiles none, where with an
    empty cache the same launches compile one kernel for each specialization."""
    pytest.importorskip("triton.backends.nvidia", reason="the kernels compile with Triton's NVIDIA backend")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compilable kernels
    r = subprocess.run([sys.executable, "-c", REPLAY, str(tmp_path / "kernels.tar.xz"), str(tmp_path)], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    found = json.loads(r.stdout.strip().splitlines()[-1])
    built, record = found["built"], found["record"]
    assert built["arch"] == 90 and built["kernels"] >= 4 and not built["failed"]
    assert record["entries_before"] == built["kernels"] and record["matches"]
    assert found["launches"] > built["kernels"]  # many launches, few specializations
    assert found["compiled_with_cache"] == 0
    assert found["compiled_without"] == built["kernels"]
    assert "unpacked into" in found["line"] and "this machine's versions are the same" in found["line"]


def archive(path: Path, manifest: dict, kernels=("abc",)) -> Path:
    """A stand-in for what the builder packs: a manifest and one cache entry a kernel, its
    group file naming its files where they were compiled."""
    group = {"child_paths": {"k.json": "/elsewhere/k.json", "k.cubin": "/elsewhere/k.cubin"}}
    with tarfile.open(path, "w:xz") as tar:
        for name, data in [("manifest.json", json.dumps(manifest).encode())] + [
                (f"cache/{k}/{file}", data) for k in kernels for file, data in (
                    ("__grp__k.json", json.dumps(group).encode()), ("k.json", b"{}"), ("k.cubin", b"\0"))]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


MANIFEST = {"kernels": 2, "arch": 90, "triton": "0.0.1", "python": "3.0", "fla_core": None, "commit": "abc1234"}


def test_gpu_check_unpacks_the_kernels_compiled_ahead_and_says_what_they_spared(tmp_path):
    """With GPU_CHECK_KERNELS an archive, the check puts its kernels into Triton's cache
    before its steps, says in one line what they were built with against this machine,
    counts the kernels compiled during the check, and the block says both."""
    python = tmp_path / "python"
    python.write_text(f'#!/bin/sh\ncase "$2" in benchmarks.gpu_block|benchmarks.triton_cache) exec {sys.executable} '
                      f'"$@";; esac\nexit 0\n')
    python.chmod(0o755)
    cache, out = tmp_path / "triton", tmp_path / "out"
    env = {**os.environ, "PYTHON": str(python), "TRITON_CACHE_DIR": str(cache),
           "GPU_CHECK_KERNELS": str(archive(tmp_path / "k.tar.xz", MANIFEST, ("abc", "def")))}
    r = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), str(out)], capture_output=True, text=True,
                       env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert sorted(p.name for p in cache.iterdir()) == ["abc", "def"]
    assert json.loads((cache / "def" / "__grp__k.json").read_text()) == {"child_paths": {
        "k.json": str(cache / "def" / "k.json"), "k.cubin": str(cache / "def" / "k.cubin")}}  # where they are now
    first = r.stdout.splitlines()[0]
    assert re.fullmatch(rf"triton_cache: 2 kernels compiled ahead for sm_90 \(Triton 0\.0\.1, Python 3\.0, fla-core "
                        rf"None, code at abc1234\) unpacked into {cache}; this machine has Triton \S+, Python \S+, "
                        rf"fla-core \S+: its launches will not find them and compile", first), first
    assert "triton_cache: the check compiled 0 kernels on this machine" in r.stdout
    record = json.loads((out / "triton_cache.json").read_text())
    assert record["entries_before"] == record["entries_after"] == 2 and not record["matches"]
    block = (out / "gpu_check.md").read_text()
    assert ("Triton kernels compiled ahead: 2 for sm_90 (Triton 0.0.1, Python 3.0, fla-core None, code at abc1234), "
            "**not** the GPU machine's versions; the check compiled 0 more there.") in block


def test_gpu_check_goes_on_without_an_archive_it_cannot_read(tmp_path):
    """A broken archive is one line, and the check runs without kernels compiled ahead."""
    python = tmp_path / "python"
    python.write_text(f'#!/bin/sh\ncase "$2" in benchmarks.gpu_block|benchmarks.triton_cache) exec {sys.executable} '
                      f'"$@";; esac\nexit 0\n')
    python.chmod(0o755)
    broken = tmp_path / "k.tar.xz"
    broken.write_bytes(b"not an archive")
    out = tmp_path / "out"
    r = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), str(out)], capture_output=True, text=True,
                       env={**os.environ, "PYTHON": str(python), "TRITON_CACHE_DIR": str(tmp_path / "triton"),
                            "GPU_CHECK_KERNELS": str(broken)})
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.splitlines()[0].startswith(f"triton_cache: {broken} is not what benchmarks.triton_cache packs (")
    assert r.stdout.splitlines()[0].endswith("); build it again with bash scripts/gpu_cache.sh")
    assert "the check compiled" not in r.stdout and not (out / "triton_cache.json").exists()
    assert "Every Triton kernel compiled during the check (no kernels compiled ahead)." in \
        (out / "gpu_check.md").read_text()


def test_autotuning_is_brief_only_where_the_check_asks(monkeypatch):
    """GPU_CHECK_AUTOTUNE_MS shortens the timing Triton's autotuner takes (triton.testing.do_bench,
    which its driver hands every autotuner); unset, it is left as it is; a bad value is one line."""
    testing = pytest.importorskip("triton.testing", reason="Triton's autotuner")
    from benchmarks.measure import autotune_briefly

    full = testing.do_bench
    monkeypatch.delenv("GPU_CHECK_AUTOTUNE_MS", raising=False)
    autotune_briefly()
    assert testing.do_bench is full
    monkeypatch.setattr(testing, "do_bench", full)  # put back after the test
    monkeypatch.setenv("GPU_CHECK_AUTOTUNE_MS", "10")
    autotune_briefly()
    assert testing.do_bench.func is full and testing.do_bench.keywords == {"warmup": 1.0, "rep": 10.0}
    for bad in ("ten", "0", "-5"):
        monkeypatch.setenv("GPU_CHECK_AUTOTUNE_MS", bad)
        with pytest.raises(SystemExit) as stop:
            autotune_briefly()
        assert str(stop.value) == f"GPU_CHECK_AUTOTUNE_MS={bad}: give milliseconds above 0, e.g. 10"
