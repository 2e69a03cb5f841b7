"""The GPU block of docs/performance.md, from what scripts/gpu_check.sh wrote.

    python -m benchmarks.gpu_block OUT [--readme docs/performance.md]

Reads OUT/gpu_ops.json, OUT/{train,train-bf16,decode,local}/results.json,
OUT/train_profile.json and OUT/train_check.json, and writes OUT/gpu_check.md: the device and versions,
then the GPU targets of the "Fast on the GPU" issue as measured (kernel
attention's forward+backward against SDPA, the first GPU run and fla-core; LM
training against softmax with SDPA, in float32 and in bfloat16; decoding at L = 256, batch 1 against
softmax), the parity and precision checks, the training step's kernels and
its costliest operators, and the fairseq-train runs (--fp16, --amp).
A file the check did not write is named as not measured. --readme replaces
the block between the gpu markers in that file. It runs anywhere (no GPU).
"""
import argparse
import itertools
import json
import math
import sys
from pathlib import Path
from typing import Optional

from . import report
from .report import LINEAR, lookup, ratio, target, target_table

BEGIN, END = "<!-- gpu:begin -->", "<!-- gpu:end -->"
SUITES = ("train", "train-bf16", "decode", "local")  # folders under OUT
TRAINED_IN = {"train": "", "train-bf16": " bf16"}  # the training suites' folders, how a target names their dtype
# forward+backward ms at T = 4096, fp32, of the chunk loop the first GPU run timed
# (one H200, code at 3d86c7c; ../shared/gpu/gpu-2026-12-04.md), the reference of
# the "20x faster than today" target
FIRST_RUN_4096_MS = {"performer-elu": 91.6, "performer-favor": 95.1}
SDPA, FLA_CORE = "sdpa-bf16", "fla-core-chunk_linear_attn-elu-bf16"
SOFTMAX_SDPA = "transformer_sdpa"


def read(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except json.JSONDecodeError as e:
        sys.exit(f"benchmarks.gpu_block: {path} is not JSON ({e}); rerun the step that writes it")


def ms(speed: list, op: str, T: int) -> Optional[float]:
    """The median forward+backward ms of `op` at length T (None: not timed, or out of memory)."""
    for row in speed:
        if row["op"] == op and row["T"] == T and not math.isnan(row["fwd_bwd_ms"]):
            return row["fwd_bwd_ms"]
    return None


def kernel_targets(speed: list) -> list:
    """Kernel attention's forward+backward targets, for each feature map timed."""
    out = []
    for fam in dict.fromkeys(row["op"].rsplit("-parallel", 1)[0] for row in speed if "-parallel" in row["op"]):
        out.append(target(f"{fam} parallel (torch) bf16: SDPA bf16's time / ours, T=16384",
                          ratio(ms(speed, SDPA, 16384), ms(speed, f"{fam}-parallel-bf16", 16384)), 1.0))
        if fam in FIRST_RUN_4096_MS:
            out.append(target(f"{fam} parallel fp32: the first GPU run's chunk loop / ours, T=4096",
                              ratio(FIRST_RUN_4096_MS[fam], ms(speed, f"{fam}-parallel", 4096)), 20.0))
        for T in (4096, 16384):
            out.append(target(f"{fam} fla bf16: fla-core's chunk_linear_attn time / ours (within 1.3x), T={T}",
                              ratio(ms(speed, FLA_CORE, T), ms(speed, f"{fam}-fla-bf16", T)), round(1 / 1.3, 2)))
    return out


def tokens_per_s(suites: dict, folder: str, family: str, **key) -> Optional[float]:
    """`family`'s tokens/s in the suite results OUT/<folder> holds (a train-* folder holds the train suite)."""
    results = suites.get(folder)
    return None if results is None else lookup(results[folder.split("-")[0]], "tokens_per_s", family=family, **key)


def model_targets(suites: dict) -> list:
    """LM training against softmax with SDPA; decoding against softmax, whose
    tokens/s ratio at batch 1 is the inverse ratio of ms a step."""
    out = []
    for f in LINEAR:
        for (folder, dtype), (T, wanted) in itertools.product(TRAINED_IN.items(), ((2048, 1.0), (8192, 2.0))):
            out.append(target(f"train {f}{dtype}: tokens/s vs softmax with SDPA, context {T}",
                              ratio(*(tokens_per_s(suites, folder, x, ctx=T) for x in (f, SOFTMAX_SDPA))), wanted))
        out.append(target(f"decode {f}: softmax's ms a step / ours, L=256, batch 1",
                          ratio(*(tokens_per_s(suites, "decode", x, L=256, batch=1) for x in (f, report.BASELINE))),
                          1.0))
    return out


def checks(ops: dict) -> list:
    """Parity and low-precision rows, one line per family."""
    lines = ["| family | forms vs naive, max relative error (outputs / gradients) | fp16, bf16 finite | "
             "max relative error vs fp32 |", "|---|---|:---:|---:|"]
    for fam in dict.fromkeys(row["family"] for row in ops.get("parity", [])):
        par = [r for r in ops["parity"] if r["family"] == fam]
        low = [r for r in ops.get("low_precision", []) if r["family"] == fam]
        grads = [r["grad_vs_naive"] for r in par if "grad_vs_naive" in r]
        lines.append(f"| {fam} | {max(r['out_vs_naive'] for r in par):.1e} / "
                     + (f"{max(grads):.1e}" if grads else "-") + " | "
                     + ("yes" if low and all(r["finite"] for r in low) else "**no**" if low else "-") + " | "
                     + (f"{max(r['rel_err_vs_fp32'] for r in low):.1e}" if low else "-") + " |")
    fused = ops.get("fused_steps", [])
    if fused:
        lines += ["", "| family | decoding on Triton kernels ran | LM outputs vs the torch steps, max relative error |",
                  "|---|---|---:|"]
        lines += [f"| {r['family']} ({r['T']} steps) | {r['ran']} | {r['out_vs_torch_step']:.1e} |" for r in fused]
    trained = ops.get("fused_training", [])
    if trained:
        lines += ["", "| family | training on Triton kernels ran | loss / gradients vs the torch forms, max relative "
                  "error | ms a pass, torch forms / kernels | tiles (ms a timed pass of the unit) |",
                  "|---|---|---:|---:|---|"]
        lines += [f"| {r['family']} ({r['dtype']}, 2 x {r['T']} tokens) | {r['ran']} | "
                  f"{r['loss_vs_torch']:.1e} / {r['grad_vs_torch']:.1e} | {pass_times(r)} | {tiles(r)} |"
                  for r in trained]
    return lines


def pass_times(row: dict) -> str:
    """A fused-training row's ms a training pass on the torch forms and on the kernels, and their ratio."""
    if "torch_ms" not in row:
        return "not timed"
    return f"{row['torch_ms']:.1f} / {row['kernels_ms']:.1f} ({row['torch_ms'] / row['kernels_ms']:.2f}x)"


def tiles(row: dict) -> str:
    """The tiles a fused-training row's kernels chose, and each candidate's time; - where the family has none."""
    if "tiles" not in row:
        return "-"
    timed = ", ".join(f"{name} {ms:.2f}" for name, ms in row["tile_ms"].items())
    return f"{row['tiles']} ({timed})" if timed else row["tiles"]


def train_runs(check: dict) -> list:
    lines = [f"`fairseq-train`, {check['updates']} updates on generated data (`benchmarks.train_check`):", "",
             "| family | precision | trained (finite, falling loss) | first / last loss | words/s |",
             "|---|---|:---:|---|---:|"]
    for run in check["runs"]:
        losses, wps = run.get("losses") or [None], run.get("wps") or [None]
        loss = "-" if losses[0] is None else f"{losses[0]:.2f} / {losses[-1]:.2f}"
        lines.append(f"| {run['family']} | {run['precision']} | {'yes' if run['ok'] else '**no**'} | {loss} | "
                     + ("-" if wps[-1] is None else f"{wps[-1]:,.0f}") + " |")
    return lines


FILES = ("gpu_ops.json", *(f"{suite}/results.json" for suite in SUITES), "train_profile.json", "train_check.json")


def header(ops: Optional[dict], suites: dict) -> str:
    """Where and when: the device, torch, Triton, fla-core (and why RFA's gate trained on torch,
    where it did), the suites' date and code digest."""
    run = next((s for s in suites.values() if s), {})
    machine = run.get("machine", {})
    ops = ops or {}
    return (f"Measured by `bash scripts/gpu_check.sh` on {ops.get('device') or machine.get('gpu', 'unknown')}, "
            f"torch {ops.get('torch') or machine.get('torch', 'unknown')}"
            + (f", Triton {ops['triton']}" if "triton" in ops else "")
            + (f", fla-core: {ops['fla_core']}" if "fla_core" in ops else "")
            + (f" (RFA's gate trained on torch: {ops['fla_core_gate']})" if ops.get("fla_core_gate") else "")
            + (f"; suites run {run['created']}, code digest {run['code']}" if "created" in run else "") + ".")


def compiled(cache: Optional[dict]) -> str:
    """What the kernels compiled ahead (benchmarks.triton_cache) spared the check, where it had them."""
    if not cache:
        return "Every Triton kernel compiled during the check (no kernels compiled ahead)."
    built = cache["built_with"]
    here = f"; the check compiled {cache['compiled_here']} more there" if "compiled_here" in cache else ""
    return (f"Triton kernels compiled ahead: {built['kernels']} for sm_{built['arch']} (Triton {built['triton']}, "
            f"Python {built['python']}, fla-core {built['fla_core']}, code at {built['commit']}), "
            + ("the GPU machine's versions" if cache["matches"] else "**not** the GPU machine's versions") + here
            + ".")


def block(out: Path) -> str:
    found = {name: read(out / name) for name in FILES}
    ops, check, steps = found["gpu_ops.json"], found["train_check.json"], found["train_profile.json"]
    suites = {suite: found[f"{suite}/results.json"] for suite in SUITES}
    targets = kernel_targets((ops or {}).get("speed", [])) + model_targets(suites)
    parts = [header(ops, suites), "", compiled(read(out / "triton_cache.json")), "", target_table(targets)]
    if ops:
        parts += ["**Parity and precision** (gpu_ops.json)", "", *checks(ops), ""]
    if steps:
        parts += ["**A training step by operator** (train_profile.json)", "", report.profile_table(steps), ""]
    if check:
        parts += train_runs(check) + [""]
    ran = [f"{suite}/results.md" for suite in SUITES if suites[suite]]
    parts.append(f"Tables of each suite: {', '.join(ran)}." if ran else "No suite ran.")
    missing = [name for name, x in found.items() if x is None]
    if missing:
        parts += ["", f"Not measured (the check wrote no such file under its OUT): {', '.join(missing)}."]
    failed = [f"{key[:-len('_error')]} ({error})" for key, error in (ops or {}).items() if key.endswith("_error")]
    if failed:
        parts += ["", f"Failed in gpu_ops.json: {'; '.join(failed)}."]
    return "\n".join(parts) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m benchmarks.gpu_block", description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path, help="the folder scripts/gpu_check.sh wrote")
    ap.add_argument("--readme", type=Path, help="a file whose gpu block is replaced")
    args = ap.parse_args(argv)
    if not args.out.is_dir():
        sys.exit(f"benchmarks.gpu_block: {args.out} is not a folder; give the OUT of scripts/gpu_check.sh")
    text = block(args.out)
    (args.out / "gpu_check.md").write_text(text)
    print(text)
    if args.readme:
        report.update_readme(args.readme, text, args.out, BEGIN, END)


if __name__ == "__main__":
    main()
