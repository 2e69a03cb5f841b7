"""Compile, on a machine without a GPU, the Triton kernels scripts/gpu_check.sh
launches, into a Triton cache the check unpacks.

    python -m benchmarks.triton_cache [--arch 90] [--out .gpu/triton-cache.tar.xz]
    (bash scripts/gpu_cache.sh runs it with the Python and Triton of the GPU machine)

On a GPU, Triton compiles a kernel the first time a launch brings a new
specialization of it (its argument types, which integers equal 1 or divide by
16, which pointers are aligned), and an autotuned kernel compiles and times
every configuration in its list for each new autotune key. fla-core's chunked
kernels, which kernel attention trains on, try up to 48 configurations each:
one forward and backward is about 120 compilations for each head size and
dtype, and the check meets several of those. Compiled there, they take minutes
of the check's time.

This runs the check's workloads on the CPU with every Triton launch recorded,
not run (benchmarks.triton_compile.recording):
  decode   each family's benchmark LM, and with local precision's window, 33
           steps at batch 1, 2 and 16 (the decode and local suites, the
           device check's fused steps);
  train    the same LMs' training pass at the suites' shapes (TRAIN) in
           float32, bfloat16 and float16 and under float16 autocast (fairseq's
           --amp), FLASH's kernels with each tiling and as `fitted` times them;
  ops      kernel attention's fla-core form and fused step on the device check's
           inputs (benchmarks/ops_cases/performer.py), and fla-core's own
           chunk_linear_attn as the check times it.
Each distinct specialization, every configuration of an autotuned one, is then
compiled for sm_<arch> as Triton's runtime keys it (benchmarks.triton_compile.
compile_launch), into one cache directory, packed with a manifest of what it
was built with. fla-core reads the GPU it runs on when it is imported, to pick
its configuration lists; here it is shown the GPU of --arch (`shown_gpu`).

Triton finds an entry only where its own build (its version and Python's minor
version), the kernels' sources and fla-core's version are those it was built
with; a launch that finds none compiles as usual.
"""
import argparse
import contextlib
import functools
import io
import json
import os
import platform
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import torch

from . import models
from .op_counts import told_triton
from .triton_compile import SHARED, candidates, decoding, on_arch, problem, recording, training

ROOT = Path(__file__).resolve().parents[1]
DECODE_BATCHES = (1, 2, 16)
DECODE_STEPS = 33  # steps 1, 2 .. 32: a position equal to 1, one that divides by 16, and others
# (dtype, rows, tokens) of the check's training passes: the train suites (8192 tokens a batch at
# contexts 512, 2048, 8192), the device check's and the profile's passes (2 and 4 rows of 2048),
# fairseq-train's --fp16 and --amp (rows of 512); "amp": float32 weights under float16 autocast
TRAIN = tuple((dtype, rows, tokens) for dtype in ("float32", "bfloat16") for rows, tokens in
              ((16, 512), (4, 2048), (1, 8192), (2, 2048))) + (("float16", 16, 512), ("amp", 16, 512))
GPU_NAMES = {90: "NVIDIA H100 80GB HBM3", 80: "NVIDIA A100-SXM4-80GB"}  # what fla-core is shown (--arch)


@contextlib.contextmanager
def shown_gpu(arch: int):
    """Triton's driver and torch.cuda's device queries answer as one GPU of compute capability
    `arch` would (its name, capability, shared memory), so that fla-core, imported inside,
    picks the configuration lists it picks there; tensors stay on the CPU."""
    from triton.backends.compiler import GPUTarget
    from triton.runtime import driver

    props = {"max_shared_mem": SHARED[arch], "multiprocessor_count": 132}  # what fla-core reads (an H100's SMs)
    shown = SimpleNamespace(
        get_current_target=lambda: GPUTarget("cuda", arch, 32), get_current_device=lambda: 0,
        get_current_stream=lambda device=None: 0, is_active=lambda: True,
        utils=SimpleNamespace(get_device_properties=lambda index: props),
        get_device_interface=lambda: torch.cuda, get_active_torch_device=lambda: torch.device("cpu"))
    cuda = torch.cuda
    with mock.patch.object(cuda, "get_device_name", lambda *a: GPU_NAMES.get(arch, f"sm_{arch}")), \
            mock.patch.object(cuda, "get_device_capability", lambda *a: divmod(arch, 10)), \
            mock.patch.object(cuda, "device_count", lambda: 1), \
            mock.patch.object(cuda, "current_device", lambda: 0):
        saved, driver._active = driver._active, shown  # the driver's own active one (None: none found yet)
        try:
            yield
        finally:
            driver._active = saved


# -- the check's workloads, launches recorded ---------------------------------------
class Specializations:
    """What `recording` appends a launch to: each launch is turned at once into the ways it
    compiles for sm_<arch> (triton_compile.candidates), and those not seen before are kept,
    so that no launch's tensors outlive it. build: key -> (kernel name, compile)."""

    def __init__(self, arch: int):
        self.arch, self.build, self.launches = arch, {}, 0

    def append(self, call):
        kernel, args, kwargs, configs = call
        self.launches += 1
        name = getattr(kernel, "__name__", str(kernel))
        for key, compile_it in candidates(kernel, args, on_arch(kernel, kwargs, self.arch), configs, self.arch):
            self.build.setdefault(key, (name, compile_it))


def lm_rows() -> list:
    """(family, flags) of each benchmark LM the check runs: every family's, and with local precision."""
    from .suites import local_rows

    rows = [(family, ()) for family in models.FAMILIES]
    return rows + [(family, tuple(flags)) for family, flags in local_rows().values() if flags]


def flash_timings(model, dtype):
    """What ops.mixed_chunk_triton.fitted launches on a GPU for each GAU: one timed pass with each tiling."""
    from linear_fairseq.modules.flash_gau import GatedAttentionUnit
    from linear_fairseq.ops import mixed_chunk_triton as chunks

    units = [m for m in model.modules() if isinstance(m, GatedAttentionUnit) and m.causal and m.mode == "mixed"]
    for m in {(m.s, m.e, m.rope, m.offset_scale.gamma.dtype, tuple(m.options.items())): m for m in units}.values():
        chunks.fastest(chunks.TILES, functools.partial(
            chunks.timed, device=torch.device("cpu"), s=m.s, e=m.e, dtype=dtype,
            gamma_dtype=m.offset_scale.gamma.dtype, rope=m.rope, repeats=1, **m.options), m.s)


def model_launches(family: str, flags: tuple, calls: Specializations):
    """Every launch of one LM's decoding and training passes, into `calls`."""
    for precision, rows, tokens in (("float32", 0, 0),) + TRAIN:
        dtype = torch.float32 if precision == "amp" else getattr(torch, precision)
        model = models.build("lm", family, dtype=dtype, extra=list(flags))[0]
        with told_triton(model) as modules:
            if not modules:
                return
            with recording(calls):
                if not rows:  # decoding, as the suites decode: float32
                    for batch in DECODE_BATCHES:
                        decoding(model, "lm", False, batch=batch, steps=DECODE_STEPS)
                    continue
                autocast = torch.autocast("cpu", dtype=torch.float16) if precision == "amp" \
                    else contextlib.nullcontext()
                with autocast:
                    training(model, "lm", False, rows=rows, length=tokens)
                    flash_timings(model, torch.float16 if precision == "amp" else dtype)


def ops_launches(calls: Specializations):
    """Into `calls`, the launches of the device check's kernel attention cases where they run on
    fla-core (its `fla` form and fused step, ops_cases.performer.cases as a GPU has them; parity:
    2 rows of 7 and 300 tokens; speed: 4 rows in float32 and bfloat16, as fla-core's kernels take
    the lengths unspecialized), and of its baselines (fla-core's chunk_linear_attn)."""
    from .gpu_ops_check import baselines, leaves_of
    from .ops_cases import performer

    cpu = torch.device("cpu")
    with recording(calls):
        for case in performer.cases(torch.device("cuda", 0)):  # the GPU's cases (shown_gpu); inputs on the CPU
            if "fla" not in case.forms:
                continue  # fla-core does not import, or RFA's gate is left off it there
            for rows, tokens, dtype, large in ((2, 7, torch.float32, False), (2, 300, torch.float32, False),
                                               (4, 256, torch.float32, True), (4, 256, torch.bfloat16, True)):
                xs = leaves_of(case, case.inputs(rows, tokens, dtype, cpu, large=large))
                torch.autograd.grad(case.forms["fla"](xs).float().sum(), xs[:case.leaves], allow_unused=True)
                if not large:
                    case.fused_step(xs)
        for make in baselines(4, 8, 256, 64, cpu).values():  # SDPA's, and fla-core's where it imports
            make()()


# -- compiling into the cache ------------------------------------------------------------
def compile_all(calls: Specializations, log=print) -> dict:
    """Each specialization in `calls` compiled into Triton's cache (TRITON_CACHE_DIR);
    {"kernels": how many, "failed": those that did not compile, "seconds": ...}."""
    failed, start = [], time.perf_counter()
    for done, (name, compile_it) in enumerate(calls.build.values(), 1):
        try:
            compile_it()
        except Exception as e:  # noqa: BLE001  a configuration its autotuner would skip too
            failed.append(f"{name}: {type(e).__name__}: {str(e)[:200]}")
        if done % 100 == 0:
            log(f"triton_cache: {done} of {len(calls.build)} compiled ({time.perf_counter() - start:.0f} s)")
    return {"kernels": len(calls.build) - len(failed), "failed": failed,
            "seconds": round(time.perf_counter() - start)}


def versions() -> dict:
    """What an entry depends on: Triton's version, Python's minor version, fla-core's (and torch's)."""
    import triton

    try:
        import fla
        fla_version = fla.__version__
    except ImportError:
        fla_version = None
    return {"triton": triton.__version__, "python": ".".join(platform.python_version_tuple()[:2]),
            "torch": torch.__version__, "fla_core": fla_version}


def commit() -> str:
    """The code's commit (its kernels' sources), or None outside a git checkout."""
    try:
        found = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    except OSError:
        return None
    return found.stdout.strip() or None


KEPT = (".json", ".cubin")  # what a launch loads of an entry: its metadata (and group file) and its binary


def pack(cache: Path, manifest: dict, out: Path) -> None:
    """The entries of cache/ (their KEPT files: the IRs Triton keeps beside them are left out)
    and manifest.json into out (a .tar.xz), written whole or not at all."""
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    with tarfile.open(partial, "w:xz") as tar:
        for path in sorted(cache.glob("*/*")):
            if path.suffix in KEPT:
                tar.add(path, arcname=f"cache/{path.parent.name}/{path.name}")
        data = json.dumps(manifest, indent=1).encode()
        info = tarfile.TarInfo("manifest.json")
        info.size = len(data)
        tar.addfile(info, fileobj=io.BytesIO(data))
    partial.replace(out)


def build(arch: int, out: Path, workloads=("models", "ops"), family_rows=None, log=print) -> dict:
    """Record the workloads' launches, compile them into a fresh cache, pack it to `out`; the manifest."""
    with tempfile.TemporaryDirectory() as folder, shown_gpu(arch), \
            mock.patch.dict(os.environ, {"TRITON_CACHE_DIR": str(Path(folder) / "cache")}):
        calls = Specializations(arch)
        if "models" in workloads:
            for family, flags in family_rows or lm_rows():
                model_launches(family, flags, calls)
                log(f"triton_cache: {family} {' '.join(flags)}: {len(calls.build)} specializations so far")
        if "ops" in workloads:
            ops_launches(calls)
        result = compile_all(calls, log)
        manifest = {**versions(), "commit": commit(), "arch": arch, "built": time.strftime("%Y-%m-%d %H:%M"),
                    "launches": calls.launches, **result}
        pack(Path(folder) / "cache", manifest, out)
    return manifest


# -- on the GPU machine --------------------------------------------------------------------
def cache_dir() -> Path:
    """Where Triton keeps its cache here (TRITON_CACHE_DIR, else its default)."""
    from triton import knobs

    return Path(knobs.cache.dir)


def entries(folder: Path) -> int:
    """Compiled kernels in a Triton cache: one group file each."""
    return sum(1 for _ in folder.glob("*/__grp__*.json")) if folder.is_dir() else 0


def moved(entry: Path) -> None:
    """An entry's group files, which name its files by their paths where they were compiled,
    made to name them where they are now, those packed (Triton compiles again where a path
    it is given is missing)."""
    for group in entry.glob("__grp__*.json"):
        data = json.loads(group.read_text())
        data["child_paths"] = {name: str(entry / Path(path).name) for name, path in data["child_paths"].items()
                               if (entry / Path(path).name).exists()}
        group.write_text(json.dumps(data))


def unpack(archive: Path, record: Path) -> str:
    """The archive's kernels into Triton's cache here; `record` (JSON) says what they were built
    with, what this machine has, and the entries before the check. Returns one line saying so."""
    folder = cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    try:
        with tarfile.open(archive) as tar:
            built = json.load(tar.extractfile("manifest.json"))
            members = [m for m in tar.getmembers() if m.name.startswith("cache/") and m.isfile()]
            for m in members:
                m.name = m.name[len("cache/"):]
            tar.extractall(folder, members=members, filter="data")
        for entry in {folder / Path(m.name).parent for m in members if Path(m.name).name.startswith("__grp__")}:
            moved(entry)
    except (OSError, tarfile.TarError, KeyError, ValueError) as e:
        raise SystemExit(f"triton_cache: {archive} is not what benchmarks.triton_cache packs ({type(e).__name__}: "
                         f"{' '.join(str(e).split())}); build it again with bash scripts/gpu_cache.sh")
    here = versions()
    same = all(built.get(key) == value for key, value in here.items() if key != "torch")
    record.write_text(json.dumps({"built_with": built, "here": here, "matches": same,
                                  "entries_before": entries(folder), "folder": str(folder)}, indent=1))
    return (f"triton_cache: {built['kernels']} kernels compiled ahead for sm_{built['arch']} "
            f"(Triton {built['triton']}, Python {built['python']}, fla-core {built['fla_core']}, code at "
            f"{built['commit']}) unpacked into {folder}; " + ("this machine's versions are the same" if same else
                              f"this machine has Triton {here['triton']}, Python {here['python']}, fla-core "
                              f"{here['fla_core']}: its launches will not find them and compile"))


def tally(record: Path) -> str:
    """Adds to `record` the entries now, and how many kernels the check compiled here."""
    data = json.loads(record.read_text())
    data["entries_after"] = entries(Path(data["folder"]))
    data["compiled_here"] = data["entries_after"] - data["entries_before"]
    record.write_text(json.dumps(data, indent=1))
    return f"triton_cache: the check compiled {data['compiled_here']} kernels on this machine"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.triton_cache", description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", type=int, default=90, choices=sorted(GPU_NAMES),
                    help="the GPU's compute capability (default 90: H100 / H200)")
    ap.add_argument("--out", type=Path, default=ROOT / ".gpu" / "triton-cache.tar.xz")
    ap.add_argument("--families", help=f"only these families' LMs, comma-separated (default all: "
                                       f"{', '.join(models.FAMILIES)})")
    ap.add_argument("--unpack", type=Path, metavar="ARCHIVE", help="on the GPU machine: put ARCHIVE's kernels into "
                    "Triton's cache there, and write what they were built with to --record")
    ap.add_argument("--tally", action="store_true", help="on the GPU machine, after the check: add to --record how "
                                                         "many kernels were compiled there")
    ap.add_argument("--record", type=Path, help="the JSON --unpack writes and --tally adds to")
    args = ap.parse_args(argv)
    if (args.unpack or args.tally) and not args.record:
        ap.error("--unpack and --tally need --record FILE.json")
    if args.unpack or args.tally:
        print(unpack(args.unpack, args.record) if args.unpack else tally(args.record))
        return 0
    rows = None
    if args.families:
        names = models.family_list(ap, args.families)
        rows = [r for r in lm_rows() if r[0] in names]
    why = problem()
    if why:
        print(f"triton_cache: {why}", file=sys.stderr)
        return 1
    manifest = build(args.arch, args.out, family_rows=rows)
    print(f"triton_cache: {manifest['kernels']} kernels compiled for sm_{args.arch} in {manifest['seconds']} s "
          f"({len(manifest['failed'])} configurations that do not compile, as their autotuners skip them) -> "
          f"{args.out} (Triton {manifest['triton']}, Python {manifest['python']}, fla-core {manifest['fla_core']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
