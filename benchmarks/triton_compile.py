"""Compile every Triton kernel of the plugin for NVIDIA GPUs, on a machine without one.

    python -m benchmarks.triton_compile [--arch 90,80] [--out FILE.json [--replace]]

Triton's interpreter (which the tests use where there is no GPU) runs a kernel
as numpy code; it does not type the kernel, lay it out for a GPU's threads and
memory, or run ptxas, so a kernel that is right there can still fail to
compile on a GPU. This check decodes three tokens on the CPU with each
family's benchmark models (benchmarks/models.py: the LM and the translation
model) with their defaults and with each option set that changes the
family's decoding path (Family.variants), their modules told they run on
Triton, in float32, bfloat16 and float16, without and with padding. It
records the arguments of every kernel launch (the launches themselves do not
run) and compiles each distinct specialization, as Triton's launcher would
make it from those arguments, for each GPU architecture with Triton's own
compiler and ptxas, down to the cubin; and it checks the kernel's shared
memory against what the architecture gives a block. Nothing is timed or run
on a GPU. Needs Triton with its NVIDIA backend (the test extra installs it;
a CUDA torch brings it), and runs without TRITON_INTERPRET=1: the kernels
are then Triton's compilable functions (the tests start it in a subprocess
without it).
"""
import argparse
import contextlib
import importlib
import json
import os
import pkgutil
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from linear_fairseq import families, ops

from . import models
from .op_counts import triton_modules

# shared memory a block may use (bytes; the opt-in maximum), by compute capability
SHARED = {80: 166912, 86: 101376, 89: 101376, 90: 232448}
ARCH_NAMES = {80: "A100", 86: "RTX 30xx / A10", 89: "L4 / RTX 40xx", 90: "H100 / H200"}
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def rows() -> list:
    """(row, kind, family, flags): each family's benchmark models ("lm", "mt") with their
    defaults, and each option set that changes its decoding path (Family.variants)."""
    out = []
    for family in families.FAMILIES.values():
        out += [(f"{family.name} {kind}", kind, family.name, ()) for kind in ("lm", "mt")]
        out += [(f"{family.name} {name}", v.kind, family.name, v.flags) for name, v in family.variants.items()]
    return out


def kernels() -> dict:
    """{"module.name": (module, name)}: every Triton function of the ops/*_triton.py modules."""
    from triton.runtime.jit import JITFunction

    found = {}
    for info in pkgutil.iter_modules(ops.__path__):
        if info.name.endswith("_triton"):
            module = importlib.import_module(f"{ops.__name__}.{info.name}")
            found.update({f"{info.name}.{name}": (module, name) for name, value in vars(module).items()
                          if isinstance(value, JITFunction)})
    return found


class Recorder:
    """Stands in for a kernel: `kernel[grid](*args, **kwargs)` records the launch instead of running it."""

    def __init__(self, name: str, calls: list):
        self.name, self.calls = name, calls

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append((self.name, args, kwargs))


@contextlib.contextmanager
def recording(calls: list, found: dict):
    """Every function of `found` replaced by a Recorder appending to `calls`."""
    saved = {key: getattr(module, name) for key, (module, name) in found.items()}
    for key, (module, name) in found.items():
        setattr(module, name, Recorder(key, calls))
    try:
        yield
    finally:
        for key, (module, name) in found.items():
            setattr(module, name, saved[key])


def on_triton(model) -> bool:
    """Tell the model's modules that can run on Triton that they do; False where it has none."""
    modules = triton_modules(model)
    for m in modules:
        m.runs_on_triton = lambda x: True
    return bool(modules)


def launches(model, kind: str, padded: bool, found: dict) -> list:
    """The kernel launches of three decoding steps of `model` (batch 2; with `padded`, the
    first row's first step is padding, and a translation model's second source is shorter)."""
    pad = model.decoder.padding_idx
    tokens = torch.randint(4, models.VOCAB, (2, 3), generator=torch.Generator().manual_seed(0))
    if padded:
        tokens[0, 0] = pad
    encoder_out = {}
    if kind == "mt":
        source = torch.randint(4, models.VOCAB, (2, 5), generator=torch.Generator().manual_seed(1))
        lengths = torch.tensor([5, 3 if padded else 5])
        source[1, : 5 - int(lengths[1])] = pad  # fairseq pads sources on the left
        encoder_out = {"encoder_out": model.encoder(source, src_lengths=lengths)}
    calls, state = [], {}
    with recording(calls, found), torch.no_grad():
        for t in range(1, tokens.shape[1] + 1):
            model.decoder(tokens[:, :t], incremental_state=state, **encoder_out)
    return calls


def compile_launch(kernel, args, kwargs, arch: int):
    """Triton's compile of `kernel` specialized on these arguments as its launcher
    would specialize them (types, alignment, integers equal to 1), for sm_<arch>."""
    from triton import compile as triton_compile
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    kwargs = dict(kwargs, debug=False, instrumentation_mode="")
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
    key = (arch, tuple(signature.items()), tuple(sorted(constexprs.items(), key=str)), repr(attrs))
    return key, lambda: triton_compile(ASTSource(kernel, signature, constexprs, attrs), target=target,
                                       options=options.__dict__)


def check(archs, dtypes=DTYPES) -> list:
    """One record per distinct (kernel, specialization, architecture): where it came from,
    whether it compiled, its shared memory and the architecture's limit."""
    found = kernels()
    records, seen, without = [], set(), set()
    for row, kind, family, flags in rows():
        for dtype in dtypes:
            if family in without:
                break
            model = models.build(kind, family, dtype=dtype, extra=list(flags))[0]
            if not on_triton(model):
                without.add(family)  # no module of the family runs on Triton
                break
            for padded in (False, True):
                for name, args, kwargs in launches(model, kind, padded, found):
                    module, attr = found[name]
                    for arch in archs:
                        key, build = compile_launch(getattr(module, attr), args, kwargs, arch)
                        if (name, key) in seen:
                            continue
                        seen.add((name, key))
                        records.append(compiled(name, build, arch, row=row, dtype=str(dtype).split(".")[-1],
                                                padded=padded))
    return records


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


def compiled(kernel: str, build, arch: int, **where) -> dict:
    record = {"kernel": kernel, "arch": f"sm_{arch}", **where}
    start = time.perf_counter()
    try:
        binary = build()
    except Exception as e:  # the compiler's message is the finding
        return {**record, "ok": False, "error": f"{type(e).__name__}: {str(e)[-1500:]}"}
    shared, limit = binary.metadata.shared, SHARED.get(arch)
    fits = limit is None or shared <= limit
    return {**record, "ok": "cubin" in binary.asm and fits, "shared_bytes": shared, "shared_limit": limit,
            "num_warps": binary.metadata.num_warps, **resources(binary.asm.get("cubin", b"")),
            "seconds": round(time.perf_counter() - start, 2),
            **({} if fits else {"error": f"needs {shared} bytes of shared memory; sm_{arch} offers {limit}"})}


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
    ap.add_argument("--out", type=Path, help="also write the records as JSON")
    ap.add_argument("--replace", action="store_true", help="rewrite --out where it holds an earlier check")
    args = ap.parse_args(argv)
    archs = arch_list(ap, args.arch)
    why = problem()
    if not why and args.out and args.out.exists() and not args.replace:
        why = f"{args.out} holds an earlier check; --replace to check anew (rewriting it), or another --out"
    if why:
        print(f"triton_compile: {why}", file=sys.stderr)
        return 1
    records = check(archs)
    for r in records:
        where = f"{r['kernel']} sm={r['arch']} {r['row']}, {r['dtype']}{', padded' if r['padded'] else ''}"
        print(f"{'ok ' if r['ok'] else 'FAIL'} {where}: " +
              (f"{r['shared_bytes']} of {r['shared_limit']} bytes shared, {r.get('registers', '?')} registers "
               f"and {r.get('stack_bytes', '?')} stack bytes a thread, {r['num_warps']} warps, {r['seconds']} s"
               if r["ok"]
               else r["error"].splitlines()[0]))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        import triton
        versions = {"triton": triton.__version__, "torch": torch.__version__}
        args.out.write_text(json.dumps({**versions, "archs": archs, "records": records}, indent=1))
    failed = [r for r in records if not r["ok"]]
    print(f"triton_compile: {len(records) - len(failed)} of {len(records)} compiles ok")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
