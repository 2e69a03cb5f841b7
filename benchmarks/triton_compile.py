"""Compile the Triton kernels the models launch on a GPU, on a machine without one.

    python -m benchmarks.triton_compile [--arch 90,80] [--passes decode,train]
        [--dtypes float32,bfloat16,float16] [--families memsizer] [--out FILE.json [--replace]]

Triton's interpreter (which the tests use where there is no GPU) runs a kernel
as numpy code; it does not type the kernel, lay it out for a GPU's threads and
memory, or run ptxas, so a kernel that is right there can still fail to
compile on a GPU. This check runs each family's benchmark models
(benchmarks/models.py: the LM and the translation model), with their
defaults and with each option set that changes the family's decoding path
(Family.variants), on the CPU with their modules told they run on Triton,
in each precision:

  decode  three decoding steps, without and with a padded step: the plugin's
          own kernels (ops/*_triton.py);
  train   one forward and backward pass of the LM over two of FLASH's chunks:
          the kernels it trains on on CUDA: kernel attention's (fla-core's,
          where it imports, and the FAVOR+ feature kernels) and FLASH's mixed
          chunk kernels.

Every Triton launch is recorded instead of run (the outputs are left as they
were allocated), and each distinct specialization, as Triton's launcher
would make it from those arguments, is compiled for each GPU architecture
with Triton's compiler and ptxas, down to the cubin (a kernel whose tiles
depend on the GPU, through its `tiles_for`, with that GPU's); an autotuned kernel
counts as compiled when one of its configurations does (its autotuner skips
those that do not), the first in its list. The record holds the kernel's
shared memory (against what the architecture gives a block), and its
registers and stack a thread (cuobjdump on the cubin), and the operand types
of its tensor-core products (from the PTX; none where its products run on the
FMA units, as float32 ones in IEEE do). FLASH's training pass runs once
with each tiling its GPU chooses from (ops.mixed_chunk_triton.TILES); a
tiling that needs more shared memory than an architecture gives a block,
where another compiles, is left out there as that choice leaves it out, and
is no failure. fla-core picks its
configuration lists when it is imported, from the device it finds; here it
finds none, so on a GPU its lists may differ. Nothing is timed or run on a
GPU. Needs Triton with its NVIDIA backend (the test extra installs it; a
CUDA torch brings it), and runs without TRITON_INTERPRET=1: the kernels are
then Triton's compilable functions (the tests start it in a subprocess
without it).
"""
import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from unittest import mock

import torch

from linear_fairseq import families

from . import models
from .op_counts import told_triton

# shared memory a block may use (bytes; the opt-in maximum), by compute capability
SHARED = {70: 98304, 75: 65536, 80: 166912, 86: 101376, 89: 101376, 90: 232448}
ARCH_NAMES = {70: "V100", 75: "T4 / RTX 20xx", 80: "A100", 86: "RTX 30xx / A10", 89: "L4 / RTX 40xx",
              90: "H100 / H200"}
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
DTYPE_NAMES = tuple(str(d).split(".")[-1] for d in DTYPES)


def rows(names=None) -> list:
    """(row, kind, family, flags): each family's benchmark models ("lm", "mt") with their
    defaults, and each option set that changes its decoding path (Family.variants);
    names: only these families'."""
    out = []
    for family in families.FAMILIES.values():
        if names is not None and family.name not in names:
            continue
        out += [(f"{family.name} {kind}", kind, family.name, ()) for kind in ("lm", "mt")]
        out += [(f"{family.name} {name}", v.kind, family.name, v.flags) for name, v in family.variants.items()]
    return out


@contextlib.contextmanager
def recording(calls: list):
    """Every Triton launch (the plugin's kernels and fla-core's) appended to `calls` as
    (kernel, args, kwargs, configs) instead of run; configs: an autotuned kernel's
    candidate configurations, None for a plain launch."""
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    saved = JITFunction.run, Autotuner.run
    JITFunction.run = lambda self, *args, grid, warmup, **kwargs: calls.append((self, args, kwargs, None))
    Autotuner.run = lambda self, *args, grid=None, warmup=False, **kwargs: calls.append((self.fn, args, kwargs,
                                                                                          self.configs))
    try:
        yield
    finally:
        JITFunction.run, Autotuner.run = saved


def decoding(model, kind: str, padded: bool, batch: int = 2, steps: int = 3):
    """`steps` decoding steps of `model` over `batch` rows (with `padded`, the first row's first
    step is padding, and a translation model's second source is shorter)."""
    model.eval()
    pad = model.decoder.padding_idx
    tokens = torch.randint(4, models.VOCAB, (batch, steps), generator=torch.Generator().manual_seed(0))
    if padded:
        tokens[0, 0] = pad
    encoder_out = {}
    if kind == "mt":
        source = torch.randint(4, models.VOCAB, (2, 5), generator=torch.Generator().manual_seed(1))
        lengths = torch.tensor([5, 3 if padded else 5])
        source[1, : 5 - int(lengths[1])] = pad  # fairseq pads sources on the left
        encoder_out = {"encoder_out": model.encoder(source, src_lengths=lengths)}
    state = {}
    with torch.no_grad():
        for t in range(1, tokens.shape[1] + 1):
            model.decoder(tokens[:, :t], incremental_state=state, **encoder_out)


def training(model, kind: str, padded: bool, rows: int = 2, length: int = 300):
    """One forward and backward pass of a language model over `rows` rows of `length` tokens
    (by default 300, past FLASH's first chunk of 256: its kernels compile as a longer pass
    launches them; with one chunk, N = 1 is specialized and the reads of earlier chunks' sums
    drop out; padding does not apply to the LM's blocks), once with each of the tiles a GPU
    chooses FLASH's kernels from (ops.mixed_chunk_triton.TILES)."""
    from linear_fairseq.ops import mixed_chunk_triton

    if kind != "lm" or padded:
        return
    model.train()
    tokens = torch.randint(4, models.VOCAB, (rows, length), generator=torch.Generator().manual_seed(0))
    for tiles in mixed_chunk_triton.TILES:
        fit = mixed_chunk_triton.Fit(tiles)
        with mock.patch.object(mixed_chunk_triton, "fitted", lambda *a, fit=fit, **k: fit):
            model.decoder(tokens)[0].float().sum().backward()


PASSES = {"decode": decoding, "train": training}


def launches(model, kind: str, passes) -> list:
    """(pass, padded, kernel, args, kwargs, configs) of every Triton launch of `passes` on `model`."""
    found = []
    for name in passes:
        for padded in (False, True):
            calls = []
            with recording(calls):
                PASSES[name](model, kind, padded)
            found += [(name, padded, *call) for call in calls]
    return found


def with_heuristics(kernel, args, kwargs):
    """The JIT function under `kernel` and the keyword arguments its heuristics add."""
    from triton.runtime.autotuner import Heuristics

    while isinstance(kernel, Heuristics):
        named = {**dict(zip(kernel.arg_names, args)), **kwargs}
        kwargs = {**kwargs, **{name: rule(named) for name, rule in kernel.values.items()}}
        kernel = kernel.fn
    return kernel, kwargs


def compile_launch(kernel, args, kwargs, arch: int):
    """Triton's compile of `kernel` specialized on these arguments as its launcher
    would specialize them (types, alignment, integers equal to 1), for sm_<arch>."""
    from triton import compile as triton_compile
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend

    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    kwargs = dict(kwargs, debug=False, instrumentation_mode="")
    bound, specialization, options = launcher_binder(kernel, backend)(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
    key = (arch, tuple(signature.items()), tuple(sorted(constexprs.items(), key=str)), repr(attrs),
           tuple(sorted((k, str(v)) for k, v in options.__dict__.items())))
    return key, lambda: triton_compile(ASTSource(kernel, signature, constexprs, attrs), target=target,
                                       options=options.__dict__)


def launcher_binder(kernel, backend):
    """What Triton's launcher (JITFunction.run) calls on a launch's arguments, for `backend`'s
    GPU: it returns them bound to `kernel`'s parameters, their specialization (types, 16-byte
    alignment, integers equal to 1) and the compile options."""
    from triton.runtime.jit import create_function_from_signature

    return create_function_from_signature(kernel.signature, kernel.params, backend)


def on_arch(kernel, kwargs: dict, arch: int) -> dict:
    """A launch's keyword arguments on sm_<arch>: a kernel whose tiles depend on the GPU
    (its `tiles_for(capability)`) takes that GPU's; the others, those recorded."""
    rule = getattr(with_heuristics(kernel, (), {})[0], "tiles_for", None)
    return {**kwargs, **rule(arch)} if rule else kwargs


def candidates(kernel, args, kwargs, configs, arch: int) -> list:
    """(key, build) of each way the launch may compile: the one, or each autotuned configuration
    (kwargs: the launch's on this architecture, on_arch)."""
    kernel, kwargs = with_heuristics(kernel, args, kwargs)
    return [compile_launch(kernel, args, {**kwargs, **config.all_kwargs()}, arch) for config in configs] \
        if configs else [compile_launch(kernel, args, kwargs, arch)]


def check(archs, dtypes=DTYPES, passes=tuple(PASSES), names=None) -> list:
    """One record per distinct (kernel, specialization, architecture) of each pass: where it
    came from, whether it compiled (an autotuned kernel: the first of its configurations
    that does, as its autotuner skips those that do not), its shared memory, registers and
    stack, and the architecture's limit."""
    records, seen, without = [], set(), set()
    for row, kind, family, flags in rows(names):
        for dtype in dtypes:
            if family in without:
                break
            model = models.build(kind, family, dtype=dtype, extra=list(flags))[0]
            with told_triton(model) as modules:
                found = launches(model, kind, passes) if modules else None
            if found is None:
                without.add(family)  # no module of the family runs on Triton
                break
            for name, padded, kernel, args, kwargs, configs in found:
                for arch in archs:
                    here = on_arch(kernel, kwargs, arch)
                    ways = candidates(kernel, args, here, configs, arch)
                    title = f"{kernel.fn.__module__}.{kernel.fn.__name__}"
                    if (title, ways[0][0]) not in seen:
                        seen.add((title, ways[0][0]))
                        records.append(compiled(title, ways, arch, row=row, dtype=str(dtype).split(".")[-1],
                                                padded=padded, **{"pass": name},
                                                tiles=tiling(here)))
    return records


def tiling(kwargs: dict) -> dict:
    """A launch's tiles: its BLOCK_* constants and the warps it asks for."""
    return {key: value for key, value in kwargs.items() if key.startswith("BLOCK") or key == "num_warps"}


def left_out(records: list) -> list:
    """The records of FLASH's training kernels in a tiling that needs more shared memory than
    the architecture gives a block, where another of ops.mixed_chunk_triton.TILES compiles for
    the same launch: a GPU's choice of tiles (mixed_chunk_triton.fitted) leaves out those
    whose launch runs out of resources, so they are no failure. Marked "left_out"; returned."""
    from linear_fairseq.ops import mixed_chunk_triton

    def launch(r):
        return r["kernel"], r["arch"], r["dtype"], r["row"], r["pass"], r["padded"]

    chosen = mixed_chunk_triton.__name__ + "."
    compiles = {launch(r) for r in records if r["ok"]}
    found = [r for r in records if not r["ok"] and r["kernel"].startswith(chosen) and "shared_needed" in r
             and launch(r) in compiles]
    for r in found:
        r["left_out"] = "its GPU chooses other tiles (mixed_chunk_triton.fitted)"
    return found


def resources(cubin: bytes) -> dict:
    """Registers a thread and stack bytes a thread (spilled registers and the stack frames
    of library calls such as sin and cos) of a compiled kernel, as cuobjdump reads them
    from the cubin (Triton's NVIDIA backend carries cuobjdump); {} where it is missing."""
    import triton.backends.nvidia
    tool = Path(triton.backends.nvidia.__file__).parent / "bin" / "cuobjdump"
    if not tool.exists():
        return {}
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "kernel.cubin"
        path.write_bytes(cubin)
        usage = subprocess.run([str(tool), "--dump-resource-usage", str(path)], capture_output=True, text=True).stdout
    found = dict(re.findall(r"\b(REG|STACK):(\d+)", usage))
    return {"registers": int(found["REG"]), "stack_bytes": int(found["STACK"])} if len(found) == 2 else {}


def tensor_cores(ptx: str) -> dict:
    """The operand types of the tensor-core products (mma, wgmma) in a kernel's PTX, e.g.
    ["bf16"]; [] where its products run on the FMA units (float32 in IEEE)."""
    products = re.findall(r"\bw?gmma\.mma_async\.\S+|\bmma\.sync\.\S+", ptx)
    kinds = (re.findall(r"\.(bf16|f16|tf32|e4m3|e5m2|s8)\b", op) for op in products)
    return {"tensor_cores": sorted({kind for found in kinds for kind in found})}


def compiled(kernel: str, ways: list, arch: int, **where) -> dict:
    record = {"kernel": kernel, "arch": f"sm_{arch}", **where, "configs": len(ways)}
    start = time.perf_counter()
    errors = []
    for tried, (_, build) in enumerate(ways, 1):
        try:
            binary = build()
        except Exception as e:  # the compiler's message is the finding
            errors.append(f"{type(e).__name__}: {str(e)[-1500:]}")
            continue
        shared, limit = binary.metadata.shared, SHARED.get(arch)
        if limit is None or shared <= limit:
            return {**record, "ok": "cubin" in binary.asm, "tried": tried, "skipped": [e[:300] for e in errors],
                    "shared_bytes": shared, "shared_limit": limit, "num_warps": binary.metadata.num_warps,
                    **resources(binary.asm.get("cubin", b"")), **tensor_cores(binary.asm.get("ptx", "")),
                    "seconds": round(time.perf_counter() - start, 2)}
        errors.append(f"needs {shared} bytes of shared memory; sm_{arch} offers {limit}")
    return {**record, "ok": False, "tried": len(ways), "error": errors[-1],
            **({"shared_needed": shared} if errors[-1].startswith("needs ") else {})}


def most(records: list, key: str):
    """The largest `key` among the compiled records ("–" where none compiled)."""
    found = [r[key] for r in records if r["ok"] and key in r]
    return f"{max(found):,}" if found else "–"


def table(records: list, archs: list) -> str:
    """One row a kernel: its specializations compiled (and tilings left out); on each
    architecture the most registers and stack bytes a thread any of them takes; the
    most shared memory a block; the operand types of its tensor-core products."""
    names = [f"sm_{a}" for a in archs]
    lines = ["| kernel | compiled | " + " | ".join(names) + " | shared bytes | tensor cores |",
             "| --- | ---: | " + "---: | " * len(names) + "---: | --- |"]
    kernels = {}
    for r in records:
        kernels.setdefault(r["kernel"], []).append(r)
    for kernel, found in kernels.items():
        ok = sum(r["ok"] for r in found)
        spared = sum("left_out" in r for r in found)
        cells = []
        for arch in names:
            on = [r for r in found if r["arch"] == arch]
            cells.append(f"{most(on, 'registers')} / {most(on, 'stack_bytes')}")
        operands = sorted({t for r in found if r["ok"] for t in r.get("tensor_cores", [])})
        lines.append(f"| `{kernel.removeprefix('linear_fairseq.ops.')}` | {ok} of {len(found)}"
                     + (f" ({spared} left out)" if spared else "") + " | " + " | ".join(cells)
                     + f" | {most(found, 'shared_bytes')} | {', '.join(operands) or 'none'} |")
    return "\n".join(lines) + "\n"


def write_table(path: Path, data: dict) -> None:
    """path.md beside the JSON: the versions, architectures and table(records)."""
    archs = ", ".join(f"sm_{a}" for a in data["archs"])
    path.with_suffix(".md").write_text(
        f"Triton kernels the models launch on a GPU, compiled without one (`python -m benchmarks.triton_compile`; "
        f"Triton {data['triton']}, torch {data['torch']}; {archs}), every precision and model variant "
        "together; \"left out\": a tiling of FLASH's training kernels that needs more shared memory than the "
        "architecture gives a block, where another compiles. On each architecture: the most registers / stack bytes "
        "a thread any specialization takes (a stack is spilled registers, or the frame of a library call such as "
        "sin); shared bytes: the most a block takes on any; tensor cores: the operand types of its products on any "
        "(none: all on the FMA units):\n\n" + table(data["records"], data["archs"]))


def problem() -> str:
    """Why the check cannot run here ('' where it can)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return "TRITON_INTERPRET=1 makes the kernels interpreted functions: run it without"
    try:
        import triton.backends.nvidia  # noqa: F401
    except ImportError as e:
        return f"Triton with its NVIDIA backend is needed ({e})"
    return ""


def arch_list(parser, text: str) -> list:
    try:
        archs = [int(a) for a in text.split(",")]
    except ValueError:
        parser.error(f"--arch {text!r}: give compute capabilities as whole numbers, e.g. 90 or 80,90")
    for a in archs:
        if a not in SHARED:
            parser.error(f"--arch {a}: choose from {', '.join(map(str, SHARED))}")
    return archs


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.triton_compile", description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", default="90", help="compute capabilities, comma-separated (default 90: "
                                                 "H100 / H200; " + ", ".join(f"{a}: {n}" for a, n in
                                                                             ARCH_NAMES.items()) + ")")
    ap.add_argument("--passes", default=",".join(PASSES), help=f"of {', '.join(PASSES)} (default both)")
    ap.add_argument("--dtypes", default=",".join(DTYPE_NAMES),
                    help="the models' precisions (default float32,bfloat16,float16)")
    ap.add_argument("--families", help=f"only these families' models, comma-separated (default all: "
                                       f"{', '.join(families.FAMILIES)})")
    ap.add_argument("--out", type=Path, help="also write the records as JSON, and their table beside it (.md)")
    ap.add_argument("--replace", action="store_true", help="rewrite --out where it holds an earlier check")
    args = ap.parse_args(argv)
    archs = arch_list(ap, args.arch)
    names = args.families.split(",") if args.families else None
    for option, given, allowed in (("--passes", args.passes, PASSES), ("--dtypes", args.dtypes, DTYPE_NAMES),
                                   ("--families", args.families or "", families.FAMILIES)):
        for value in given.split(",") if given else ():
            if value not in allowed:
                ap.error(f"{option} {value!r}: choose from {', '.join(allowed)}")
    why = problem()
    if not why and args.out and args.out.exists() and not args.replace:
        why = f"{args.out} holds an earlier check; --replace to check anew (rewriting it), or another --out"
    if why:
        print(f"triton_compile: {why}", file=sys.stderr)
        return 1
    with warnings.catch_warnings():  # fla-core says it finds no GPU here, which this check knows
        warnings.filterwarnings("ignore", message="Triton is not supported on current platform")
        records = check(archs, [getattr(torch, d) for d in args.dtypes.split(",")], args.passes.split(","), names)
    spared = left_out(records)
    for r in records:
        config = f", config {r['tried']} of {r['configs']}" if r["configs"] > 1 else ""
        where = (f"{r['kernel']} sm={r['arch']} {r['pass']} {r['row']}, {r['dtype']}"
                 f"{', padded' if r['padded'] else ''}{config}")
        print(f"{'ok ' if r['ok'] else 'LEFT' if 'left_out' in r else 'FAIL'} {where}: " +
              (f"{r['shared_bytes']} of {r['shared_limit']} bytes shared, {r.get('registers', '?')} registers "
               f"and {r.get('stack_bytes', '?')} stack bytes a thread, {r['num_warps']} warps, {r['seconds']} s"
               if r["ok"]
               else r["error"].splitlines()[0] + (f"; {r['left_out']}" if "left_out" in r else "")))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        import triton
        versions = {"triton": triton.__version__, "torch": torch.__version__}
        data = {**versions, "archs": archs, "records": records}
        args.out.write_text(json.dumps(data, indent=1))
        write_table(args.out, data)
    failed = [r for r in records if not r["ok"] and "left_out" not in r]
    print(f"triton_compile: {len(records) - len(failed) - len(spared)} of {len(records)} compiles ok"
          + (f"; {len(spared)} tilings of FLASH's training kernels left out where they need more shared memory "
             f"than the architecture gives a block and another tiling compiles" if spared else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
