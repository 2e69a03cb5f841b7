#!/usr/bin/env python
"""Device checks of the attention math (linear_fairseq/ops) for every family.

The families are the registered ones; each brings its cases in
benchmarks/ops_cases/<family>.py (a family without one is listed as such):

1. fp32 parity on the device: every training form against the quadratic
   reference, outputs and gradients, and the decoding recurrence's outputs.
2. fp16 / bf16 inputs at T = 4096 and 16384: finite, and error vs fp32.
3. (CUDA only) the decoding steps on Triton kernels (every family's, and the
   sliding window's of local precision): each family's benchmark LM, and each
   with the recommended window, 300 steps on the kernels against the torch steps.
4. (CUDA only) training on Triton kernels (kernel attention: fla-core's chunked
   kernels and FAVOR+'s feature kernels; FLASH: its mixed chunk kernels; the
   sliding window: its own): each family's benchmark LM, and each with the
   window, 2 rows of 2048 tokens in fp32 and bf16, the loss and gradients of a
   training pass on the kernels against the torch forms, and each pass's time.
5. (CUDA only) forward+backward time and peak memory of the timed training
   forms, fp32 and bf16, against torch's scaled_dot_product_attention (causal)
   and, where fla-core imports, its own `chunk_linear_attn` on elu+1 inputs,
   T = 1024 / 4096 / 16384.

They run in that order, the checks of the kernels' results before the timings
of every form, and the JSON is written after each.

Writes JSON (--out) and prints a summary. Needs torch and fairseq (importing
the plugin registers the families):  python benchmarks/gpu_ops_check.py --device cuda
"""
import argparse
import functools
import importlib
import json
import platform
import sys
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import linear_fairseq  # noqa: E402,F401  registers the families
from benchmarks import ops_cases  # noqa: E402
from benchmarks.measure import autotune_briefly  # noqa: E402
from linear_fairseq import families  # noqa: E402
from linear_fairseq.ops import performer_fla  # noqa: E402
from linear_fairseq.ops.common import triton_unavailable  # noqa: E402

LOW = (torch.float16, torch.bfloat16)


def rel_err(a, b):
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).abs().max() / b.abs().max().clamp(min=1.0))


def grad_err(out, ref, leaves):
    w = torch.randn_like(ref)
    g_out = torch.autograd.grad((out * w).sum(), leaves, retain_graph=True, allow_unused=True)
    g_ref = torch.autograd.grad((ref * w).sum(), leaves, retain_graph=True, allow_unused=True)
    return max(rel_err(a, b) for a, b in zip(g_out, g_ref) if b is not None)


def all_cases(device) -> tuple:
    """(every registered family's ops cases, the families without any)."""
    cases, missing = [], []
    for name in families.names(baseline=False):
        found = ops_cases.for_family(name)
        cases += found(device) if found else []
        missing += [] if found else [name]
    return cases, missing


def leaves_of(case, xs):
    return [x.requires_grad_() for x in xs[:case.leaves]] + xs[case.leaves:]


def timed(fn, reps=5):
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2], torch.cuda.max_memory_allocated() / 2**20


def kernel_versions(device: torch.device) -> dict:
    """Triton's and fla-core's versions, or why they do not import; and on CUDA why
    RFA's gate does not train on fla-core's kernel there (performer_fla.gate_trouble),
    or None."""
    triton, fla = triton_unavailable(), performer_fla.unavailable()
    found = {"triton": triton or importlib.import_module("triton").__version__,
             "fla_core": fla or importlib.import_module("fla").__version__}
    if device.type == "cuda" and not (triton or fla):
        found["fla_core_gate"] = performer_fla.gate_trouble(device)
    return found


# -- 1. parity ---------------------------------------------------------------------
def parity(cases, device, lengths):
    rows = []
    for T in lengths:
        for case in cases:
            xs = leaves_of(case, case.inputs(2, T, torch.float32, device))
            ref = case.reference(xs)
            for form, f in case.forms.items():
                out = f(xs)
                rows.append({"family": case.name, "form": form, "T": T, "out_vs_naive": rel_err(out, ref),
                             "grad_vs_naive": grad_err(out, ref, xs[:case.leaves])})
            for form, step in (("step", case.step), ("fused-step", case.fused_step)):
                if step is not None:
                    rows.append({"family": case.name, "form": form, "T": T, "out_vs_naive": rel_err(step(xs), ref)})
    return rows


# -- 2. low precision --------------------------------------------------------------
def low_precision(cases, device, lengths):
    rows = []
    for T in lengths:
        for case in cases:
            form = (case.timed or tuple(case.forms))[0]
            with torch.no_grad():
                ref = case.forms[form](case.inputs(1, T, torch.float32, device, large=True))
                for dtype in LOW:
                    out = case.forms[form](case.inputs(1, T, dtype, device, large=True))
                    rows.append({"family": case.name, "form": form, "T": T, "dtype": str(dtype),
                                 "finite": bool(torch.isfinite(out).all()), "rel_err_vs_fp32": rel_err(out, ref)})
    return rows


# -- the benchmark LMs on Triton kernels (3, 4) -------------------------------------
def triton_lms(device, rows: dict, extra=(), dtype=torch.float32):
    """(row, benchmark LM in `dtype`, its modules that can run on Triton kernels, why
    they do not here or None) for each of `rows` (row -> (family, its flags), as lm_rows
    gives them) whose LM has such modules."""
    from benchmarks import models
    from benchmarks.op_counts import triton_modules

    probe = torch.zeros(1, device=device)
    for row, (family, flags) in rows.items():
        model = models.build("lm", family, device=str(device), dtype=dtype, extra=[*extra, *flags])[0]
        modules = triton_modules(model)
        if modules:
            yield row, model, modules, None if all(m.runs_on_triton(probe) for m in modules) else \
                "auto chose the torch forms here"


def lm_rows(families=None) -> dict:
    """row -> (family, flags): each family (default all) as it is, then each that offers
    local precision with the recommended sliding window (suites.LOCAL)."""
    from benchmarks import models, suites

    families = families or models.FAMILIES
    window = {row: (family, flags) for row, (family, flags) in suites.local_rows().items()
              if flags and family in families}
    return {**{family: (family, ()) for family in families}, **window}


def told(modules, fused: bool):
    """The modules on the Triton kernels where they run them (their own choice: auto, the
    kernels on CUDA), or on the torch forms."""
    for m in modules:
        if fused:
            m.__dict__.pop("runs_on_triton", None)
        else:
            m.runs_on_triton = lambda x: False


# -- 3. fused decoding steps (CUDA) ---------------------------------------------------
def fused_steps(cases, device, lengths):
    """Every family that decodes on Triton kernels (modules with runs_on_triton), and
    every family with the recommended sliding window (suites.LOCAL; the window decodes
    on its kernel): its benchmark LM's outputs over T steps of random tokens (2 rows,
    fp32) on the kernels, the default on CUDA, against the torch steps; where the
    kernels cannot run, why."""
    from benchmarks import models

    rows = []
    for family, model, modules, why in triton_lms(device, lm_rows()):
        model.eval()
        for T in lengths:
            tokens = torch.randint(4, models.VOCAB, (2, T), device=device)
            outs = []
            for fused in (False, True):
                told(modules, fused)
                state = {}
                with torch.no_grad():
                    outs.append(torch.cat([model.decoder(tokens[:, :t + 1], incremental_state=state)[0]
                                           for t in range(T)], dim=1))
            rows.append({"family": family, "form": "fused-step", "T": T, "ran": why or "yes",
                         "out_vs_torch_step": rel_err(outs[1], outs[0])})
    return rows


# -- 4. training on Triton kernels (CUDA) --------------------------------------------
def fused_training(cases, device, lengths, families=None, extra=(), dtypes=(torch.float32, torch.bfloat16)):
    """Every family whose modules can run on Triton kernels, and every family with the
    recommended sliding window (which trains on its kernels): its benchmark LM's loss and
    gradients of one training pass over T tokens (2 rows) in each of `dtypes` (the LM's
    weights and activations, as the train suites run it) on the kernels, the default on
    CUDA, against the torch forms in the same dtype; a family whose pass is the same on
    both (it trains on torch) is named so; where the kernels cannot run, why. On CUDA
    each form's pass is timed too (median ms of `timed`), the kernels' worth told apart
    from the rest of the model, and FLASH's rows name the tiles its kernels chose by
    timing each (with those times). `families` (default all) and `extra` (flags for the
    LMs) make it small for the tests."""
    rows = []
    for dtype in dtypes:
        for family, model, modules, why in triton_lms(device, lm_rows(families), extra, dtype):
            model.train()
            rows += [{"family": family, "form": "fused-train", "T": T, "dtype": str(dtype).split(".")[-1],
                      **training_pair(model, modules, T, device, why), **tiles_chosen(modules, device, dtype)}
                     for T in lengths]
    return rows


def tiles_chosen(modules, device, dtype) -> dict:
    """The tiles the family's training kernels run with here, where it chooses them (FLASH's
    units: the fastest of their timed passes on CUDA, with each one's ms; one for the LM, whose
    units share their sizes)."""
    fits = {m.kernel_fit(device, dtype) for m in modules if hasattr(m, "kernel_fit")}
    if not fits:
        return {}
    fit, = fits
    return {"tiles": str(fit.tiles) if fit.tiles else fit.why,
            "tile_ms": {str(tiles): round(ms, 3) for tiles, ms in fit.ms}}


def training_pair(model, modules, T: int, device, why) -> dict:
    """One training pass of the LM over 2 rows of T random tokens on the torch forms and
    on the kernels: how they differ, and on CUDA each one's time."""
    from benchmarks import models, suites

    tokens = torch.randint(4, models.VOCAB, (2, T + 1), device=device)
    passes, pass_ms = [], {}
    for fused in (False, True):
        told(modules, fused)
        loss = suites.train_pass(model, tokens).detach()
        passes.append([loss] + [p.grad for p in model.parameters() if p.grad is not None])
        if device.type == "cuda":
            pass_ms["kernels_ms" if fused else "torch_ms"] = timed(lambda: suites.train_pass(model, tokens))[0]
    same = all(torch.equal(a, b) for a, b in zip(*passes))
    return {"ran": why or ("the same pass: it trains on torch" if same else "yes"),
            "loss_vs_torch": rel_err(passes[1][0], passes[0][0]),
            "grad_vs_torch": max(rel_err(a, b) for a, b in zip(passes[1][1:], passes[0][1:])), **pass_ms}


# -- 5. speed -----------------------------------------------------------------------
def fla_linear_attn():
    """fla-core's chunk_linear_attn, or None where fla-core does not import."""
    try:
        from fla.ops.linear_attn import chunk_linear_attn
    except Exception:  # not installed, or no Triton for this device
        return None
    return chunk_linear_attn


def baselines(B, H, T, D, device):
    """name -> a function that builds the inputs and returns one forward+backward."""
    def sdpa(dtype):
        q, k, v = (torch.randn(B, H, T, D, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
        return lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()

    def fla(dtype=torch.bfloat16):
        q, k, v = (torch.randn(B, T, H, D, device=device, dtype=dtype) for _ in range(3))
        q, k = (F.elu(x.float()).add(1.0).to(dtype).requires_grad_() for x in (q, k))
        v.requires_grad_()
        return lambda: fla_linear_attn()(q, k, v, scale=1.0, normalize=True)[0].float().sum().backward()

    out = {"sdpa-fp32": lambda: sdpa(torch.float32), "sdpa-bf16": lambda: sdpa(torch.bfloat16)}
    if fla_linear_attn() is not None:
        out["fla-core-chunk_linear_attn-elu-bf16"] = fla
    return out


def family_forms(cases, B, T, device):
    """name -> a function that builds the inputs and returns one forward+backward of a family's timed form."""
    def make(case, form, dtype):
        xs = leaves_of(case, case.inputs(B, T, dtype, device, large=True))
        return lambda: case.forms[form](xs).float().sum().backward()

    return {f"{case.name}-{form}{suffix}": functools.partial(make, case, form, dtype)
            for case in cases for form in case.timed or tuple(case.forms) if form in case.forms
            for dtype, suffix in ((torch.float32, ""), (torch.bfloat16, "-bf16"))}


def speed(cases, device, lengths):
    rows = []
    B, H, D = 4, 8, 64
    for T in lengths:
        for name, make in {**baselines(B, H, T, D, device), **family_forms(cases, B, T, device)}.items():
            torch.cuda.empty_cache()
            try:
                ms, mib = timed(make())
            except torch.cuda.OutOfMemoryError:
                ms, mib = float("nan"), float("nan")
            rows.append({"op": name, "T": T, "B": B, "fwd_bwd_ms": ms, "tokens_per_s": B * T / (ms / 1000),
                         "peak_mib": mib})
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("gpu_ops.json"))
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--quick", action="store_true", help="short sequences only (the test suite's CPU run)")
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu_ops_check: no CUDA device here (--device cpu runs the parity and precision checks)")
    autotune_briefly()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    device = torch.device(args.device)
    name = torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu"
    cases, missing = all_cases(device)
    report = {"device": name, "torch": torch.__version__, "python": platform.python_version(),
              "families_without_ops_cases": missing, **kernel_versions(device)}
    sections = [(parity, (7, 100) if args.quick else (7, 300, 1000)),
                (low_precision, (512,) if args.quick else (4096, 16384))]
    if args.device == "cuda":
        sections += [(fused_steps, (300,)),  # 300: past FLASH's first chunk
                     (fused_training, (2048,)), (speed, (1024, 4096, 16384))]
    failed = []
    for section, lengths in sections:  # the JSON after each section: a check stopped early keeps what it did
        print(f"== {section.__name__}", flush=True)
        try:
            report[section.__name__] = rows = section(cases, device, lengths)
        except Exception as error:  # noqa: BLE001  the other sections still run; named at the end
            report[f"{section.__name__}_error"] = f"{type(error).__name__}: {error}"
            failed.append(section.__name__)
            traceback.print_exc()
            rows = []
        for row in rows:
            print("  " + "  ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
        args.out.write_text(json.dumps(report, indent=1))
    if failed:
        sys.exit(f"gpu_ops_check: {', '.join(failed)} failed (the traceback above; {args.out} has the rest)")


if __name__ == "__main__":
    main()
