"""Where a training step's time goes: each train-suite row's forward + backward,
profiled by operator.

    python -m benchmarks.profile_train [--families transformer_sdpa,flash] [--ctx 2048]
        [--tokens 8192] [--device cpu|cuda] [--dtype float32,bfloat16] [--top 8] [--out FILE.json]

The train suite's models (benchmarks.suites.train_model: fairseq's softmax LM,
the same with torch's SDPA, one LM per family) take one step over --tokens
tokens cut into sequences of --ctx, after two warm-up steps, under
torch.profiler. For each row and dtype it records the step's time, what a GPU
launched (on CUDA: the kernels and memory operations the profiler saw; on the
CPU: the aten operators that do work, as benchmarks.op_counts counts them, one
per kernel a GPU would launch) and the operators that took the most time
(device time on CUDA, CPU time otherwise): which ones to cut, and whether a step
is bound by its launches (many kernels, little time each) or by its
arithmetic. One profiled step, so the times carry the profiler's overhead; the
train suite's timings are the measured word on speed.
"""
import argparse
import json
import logging
import warnings
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from . import op_counts, report, suites
from .measure import DTYPES, autotune_briefly


def device_events(prof) -> list:
    """The profiled events that ran on the GPU (kernels, copies, fills)."""
    return [e for e in prof.events() if e.device_type == DeviceType.CUDA]


def top_ops(prof, device: str, top: int) -> list:
    """The `top` aten operators by their own time (device time on CUDA), with their calls."""
    key = "self_device_time_total" if device == "cuda" else "self_cpu_time_total"
    ops = [a for a in prof.key_averages() if a.key.startswith("aten::") and getattr(a, key) > 0]
    total = sum(getattr(a, key) for a in ops) or 1.0
    ops.sort(key=lambda a: getattr(a, key), reverse=True)
    return [{"op": a.key, "calls": a.count, "ms": getattr(a, key) / 1000, "share": getattr(a, key) / total}
            for a in ops[:top]]


def profile_row(row: str, ctx: int, tokens: int, device: str, dtype: torch.dtype, top: int) -> dict:
    model, d, info = suites.train_model(row, device, dtype=dtype)
    B = max(1, tokens // ctx)
    batch = torch.randint(d.nspecial, len(d), (B, ctx + 1), generator=torch.Generator().manual_seed(0)).to(device)
    for _ in range(2):
        suites.train_step(model, batch, device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        seconds = suites.train_step(model, batch, device)  # timed between device syncs
    launches = len(device_events(prof)) if device == "cuda" else len(op_counts.leaf_aten(prof))
    return {"family": row, "arch": info["arch"], "params": info["params"], "ctx": ctx, "batch": B,
            "dtype": str(dtype).removeprefix("torch."), "device": device, "step_ms": 1000 * seconds,
            "launches": launches, "launches_are": "device events" if device == "cuda" else "aten operators",
            "top": top_ops(prof, device, top)}


def dtype_list(parser, text: str) -> list:
    names = text.split(",")
    for name in names:
        if name not in DTYPES:
            parser.error(f"--dtype: unknown {name!r} (choose from {', '.join(DTYPES)}, comma-separated)")
    return names


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.profile_train", description=__doc__.split("\n\n")[0])
    p.add_argument("--families", help=f"rows to profile (default: every row, {', '.join(suites.TRAIN_ROWS)})")
    p.add_argument("--ctx", type=int, default=2048, help="tokens per sequence (default 2048)")
    p.add_argument("--tokens", type=int, default=8192, help="tokens per batch (default 8192, as the train suite)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--dtype", default="float32", help="weights and activations, comma-separated for several "
                                                      f"({', '.join(DTYPES)}; default float32)")
    p.add_argument("--top", type=int, default=8, help="operators listed per row (default 8)")
    p.add_argument("--out", type=Path, help="also write the records as JSON")
    args = p.parse_args(argv)
    autotune_briefly()
    rows = args.families.split(",") if args.families else list(suites.TRAIN_ROWS)
    for row in rows:
        if row not in suites.TRAIN_ROWS:
            p.error(f"--families: unknown row {row!r} (choose from {', '.join(suites.TRAIN_ROWS)})")
    dtypes = dtype_list(p, args.dtype)
    for name in ("ctx", "tokens", "top"):
        if getattr(args, name) < 1:
            p.error(f"--{name} {getattr(args, name)}: must be a positive integer")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch sees no CUDA device")
    logging.disable(logging.WARNING)
    warnings.filterwarnings("ignore")
    records = [profile_row(row, args.ctx, args.tokens, args.device, DTYPES[name], args.top)
               for name in dtypes for row in rows]
    if args.out:
        args.out.write_text(json.dumps(records, indent=1) + "\n")
    print(report.profile_table(records))


if __name__ == "__main__":
    main()
