"""What a greedy decoding step costs the host on a GPU's path: the CPU proxy for
batch-1 decoding on a GPU, where the host's time a step, not the arithmetic,
sets the pace.

    python -m benchmarks.host_step [--families transformer,flash] [--length 256]
        [--rounds 5] [--out FILE.json] [--replace]

Each family's benchmark LM (benchmarks/models.py) at tiny widths (TINY: d = 32,
FFN 64, its embeddings and output layer 32 wide too, and the flags of the
family's tiny test models: FLASH's s = 16 and chunks of 4), so that its
arithmetic costs next to nothing, runs on the CPU with one thread and its
modules on their CUDA path: told they run on Triton (op_counts.told_triton),
each Triton launch recorded and not run (triton_compile.recording) once
Triton's launcher has done its host work for it up to the driver (Bound: its
arguments bound and specialized for sm_90); where Triton or its NVIDIA backend
does not import, the torch steps (not under TRITON_INTERPRET=1, whose kernels
would run interpreted); the ops reading values back as on a GPU
(op_counts.reads_on_gpu); subnormal floats flushed to zero (flushed_subnormals).
A round decodes --length tokens of batch 1 from an empty state as fairseq's
greedy search drives the decoder: the reorder (0..B-1), then the step. The
families take turns, one round each (after an untimed one), --rounds rounds; a
row's figure is its median round's ms a step and its ratio to the first row's,
with the Triton launches a step and the compiled kernels they take (a launch
whose arguments Triton specializes differently from step to step would take
more than one a kernel, and compile each on a GPU), and the aten operators one
step dispatches (operators_a_step: a count, which the timings' noise leaves
alone).

What this leaves out: the cost of a launch in the driver (a CUDA launch costs
the host more than a CPU operator does, and a Triton launch's arguments are
packed for it too; benchmarks.op_counts counts the launches), the waits for
the device (op_counts counts the values read back), and fairseq's search
code around the decoder, the same for every family. Timings, not counts:
run it on an otherwise idle machine. Writes JSON and a markdown table beside
it; an existing FILE.json is rewritten only with --replace.
"""
import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Optional

import torch
from torch.profiler import ProfilerActivity, profile

from linear_fairseq import families as family_records
from linear_fairseq.ops.common import import_problem, triton_unavailable

from . import models, op_counts
from .turns import in_turns

TINY = ("--decoder-embed-dim", "32", "--decoder-ffn-embed-dim", "64", "--decoder-input-dim", "32",
        "--decoder-output-dim", "32")


def model_at_tiny_widths(family: str):
    """The family's benchmark LM at TINY widths, with the flags its record gives tiny models
    (Family.tiny: e.g. FLASH's s, which must not exceed d)."""
    return models.build("lm", family, extra=[*TINY, *family_records.get(family).tiny])[0].eval()


class Bound(list):
    """What triton_compile.recording appends a launch to: the kernel, after the host work
    Triton's launcher (JITFunction.run) does for the launch before the driver's: its
    arguments bound and specialized for an sm_90 GPU (triton_compile.launcher_binder),
    the key of its compiled kernel made. compiled: each kernel's keys so far (one per
    compiled kernel the launches would take)."""

    def __init__(self):
        super().__init__()
        self.binders, self.compiled = {}, {}

    def append(self, call):
        from triton.runtime.jit import compute_cache_key

        kernel, args, kwargs, _ = call
        if kernel not in self.binders:
            from triton.backends.compiler import GPUTarget
            from triton.compiler import make_backend

            from .triton_compile import launcher_binder
            self.binders[kernel] = launcher_binder(kernel, make_backend(GPUTarget("cuda", 90, 32)))
            self.compiled[kernel] = {}
        _, specialization, options = self.binders[kernel](*args, **kwargs, debug=False, instrumentation_mode="")
        compute_cache_key(self.compiled[kernel], specialization, options)
        super().append(kernel)

    def kernels_compiled(self) -> int:
        return sum(len(keys) for keys in self.compiled.values())


def unbound() -> Optional[str]:
    """Why Triton's launches cannot be bound for sm_90 here (None: they can): Triton, or
    its NVIDIA backend, missing (then the modules take their torch steps)."""
    return triton_unavailable() or import_problem("triton.backends.nvidia", "Triton's NVIDIA backend")


@contextlib.contextmanager
def flushed_subnormals():
    """This thread's CPU arithmetic with subnormal floats read and written as zero. A
    recorded launch leaves its outputs as allocated (uninitialized memory, often
    subnormal), and an x86 core takes many times longer on subnormal operands: a cost
    of the values, which a GPU's host never pays. Yields whether this CPU flushes them
    (x86 with SSE3 does); flushing is off after it (torch cannot say what it was before)."""
    try:
        yield torch.set_flush_denormal(True)
    finally:
        torch.set_flush_denormal(False)


@contextlib.contextmanager
def on_gpu_path(model):
    """The model's modules on their CUDA path as far as the CPU allows (module docstring);
    yields the list the Triton launches are recorded in."""
    launches = Bound()
    with contextlib.ExitStack() as stack:
        stack.enter_context(op_counts.reads_on_gpu())
        stack.enter_context(flushed_subnormals())
        if op_counts.triton_modules(model) and unbound() is None:
            from .triton_compile import recording
            stack.enter_context(op_counts.told_triton(model))
            stack.enter_context(recording(launches))
        yield launches


def greedy_steps(model, length: int):
    """A function step(t, state) that runs greedy search's step t (1 .. `length`) of batch 1
    on `model`'s decoder: the reorder (0..B-1) from step 2 on, then the step."""
    tokens = torch.randint(4, models.VOCAB, (1, length), generator=torch.Generator().manual_seed(0))
    keep = torch.arange(1)

    def step(t: int, state: dict):
        if t > 1:
            model.decoder.reorder_incremental_state_scripting(state, keep)
        model.decoder(tokens[:, :t], incremental_state=state)
    return step


def greedy_round(model, length: int):
    """A function that decodes `length` tokens as greedy search does and returns (ms a
    step, Triton launches a step, compiled Triton kernels they take)."""
    step = greedy_steps(model, length)

    def run() -> tuple:
        state = {}
        with torch.no_grad(), on_gpu_path(model) as launches:
            start = time.perf_counter()
            for t in range(1, length + 1):
                step(t, state)
            return (time.perf_counter() - start) / length * 1e3, len(launches) / length, launches.kernels_compiled()
    return run


def operators_a_step(model, prefix: int = 16) -> int:
    """The aten operators greedy search's step dispatches after `prefix` tokens (the reorder
    included), on the GPU path, counted by torch.profiler: views and allocations too, since
    each costs the host a dispatch where it launches no kernel. A count, not a timing."""
    step, state = greedy_steps(model, prefix + 1), {}
    with torch.no_grad(), on_gpu_path(model):
        for t in range(1, prefix + 1):
            step(t, state)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step(prefix + 1, state)
    return sum(1 for e in prof.events() if e.name.startswith("aten::"))


def measure(families, length: int, rounds: int) -> dict:
    tiny = {f: model_at_tiny_widths(f) for f in families}
    runs = in_turns({f: greedy_round(model, length) for f, model in tiny.items()}, rounds)
    times = step_times({f: [x for x, *_ in xs] for f, xs in runs.items()})
    return {f: {**times[f], "triton_launches_per_step": runs[f][0][1], "triton_kernels_compiled": runs[f][0][2],
                "aten_ops_per_step": operators_a_step(tiny[f])} for f in runs}


def step_times(ms: dict) -> dict:
    """{family: ms a step of each round}, the first family the one compared with -> each
    family's median ms a step, its ratio to the first's and the rounds, as recorded: the
    ratio is that of the recorded (rounded) medians, so the record reads consistently."""
    median = {f: round(sorted(xs)[len(xs) // 2], 4) for f, xs in ms.items()}
    first = median[next(iter(ms))]
    return {f: {"ms_per_step": median[f], "vs_first": round(median[f] / first, 3),
                "rounds": [round(x, 4) for x in xs]} for f, xs in ms.items()}


def table(rows: dict, first: str) -> str:
    lines = [f"| family | ms a step | vs {first} | Triton launches a step | aten operators a step |",
             "| --- | ---: | ---: | ---: | ---: |"]
    lines += [f"| {f} | {r['ms_per_step']:.3f} | {r['vs_first']:.2f}x | {r['triton_launches_per_step']:g} | "
              f"{r['aten_ops_per_step']} |" for f, r in rows.items()]
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.host_step", description=__doc__.split("\n\n")[0])
    p.add_argument("--families", default=",".join(models.FAMILIES),
                   help="rows, the first the one the others are compared with (default: every family)")
    p.add_argument("--length", type=int, default=256, help="tokens a round decodes (default 256)")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds, every row once a round (default 5)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/cpu/host-step.json"))
    p.add_argument("--replace", action="store_true", help="rewrite --out where it holds an earlier run")
    args = p.parse_args(argv)
    families = models.family_list(p, args.families)
    for name in ("length", "rounds"):
        if getattr(args, name) < 1:
            p.error(f"--{name} {getattr(args, name)}: must be a positive integer")
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("benchmarks.host_step: TRITON_INTERPRET=1 runs the kernels through Triton's interpreter: run it "
                 "without")
    if args.out.exists() and not args.replace:
        sys.exit(f"benchmarks.host_step: {args.out} holds an earlier run; --replace to measure anew (rewriting "
                 f"it), or another --out")
    torch.set_num_threads(1)
    rows = measure(families, args.length, args.rounds)
    launches = "bound for sm_90, not run" if unbound() is None else f"none: {unbound()}"
    with flushed_subnormals() as flushed:
        subnormals = "flushed to zero" if flushed else "not flushed (this CPU cannot)"
    result = {"torch": torch.__version__, "length": args.length, "rounds": args.rounds, "tiny": " ".join(TINY),
              "triton_launches": launches, "subnormals": subnormals, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    args.out.with_suffix(".md").write_text(
        f"Host time of a greedy decoding step on the GPU path at tiny widths (`python -m benchmarks.host_step "
        f"--length {args.length} --rounds {args.rounds}`; Triton launches {launches}; subnormals {subnormals}; "
        f"torch {torch.__version__}), "
        f"the median of {args.rounds} rounds of {args.length} tokens:\n\n" + table(rows, families[0]))
    print(table(rows, families[0]))


if __name__ == "__main__":
    main()
