#!/usr/bin/env python
"""Device checks of the attention math (linear_fairseq/ops) for every family.

1. fp32 parity on the device: every fast form against the quadratic reference,
   outputs and gradients: MemSizer (chunked, step), each kernel feature map
   (the chunk loop, the chunkwise-parallel form, step), FLASH (mixed chunk, step).
2. fp16 / bf16 inputs at T = 4096 and 16384: finite, and error vs fp32.
3. (CUDA only) forward+backward time and peak memory of the causal training
   forms against torch's scaled_dot_product_attention (causal) and, where
   fla-core imports, its `chunk_linear_attn` on the same elu+1 inputs,
   T = 1024 / 4096 / 16384.

Writes JSON (--out) and prints a summary. Needs torch (the ops import without
fairseq):  python benchmarks/gpu_ops_check.py --device cuda
"""
import argparse
import json
import math
import platform
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from linear_fairseq.ops import flash as Q  # noqa: E402
from linear_fairseq.ops import memsizer as M  # noqa: E402
from linear_fairseq.ops import performer as K  # noqa: E402

EPS = 1e-6  # the normalizer clamp (--kernel-eps) of rfa and t2r
MAPS = ("elu", "favor", "rfa", "t2r")
KERNEL_FORMS = {"chunked": K.causal_chunked, "parallel": K.causal_parallel}
dev = "cuda"


def rel_err(a, b):
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).abs().max() / b.abs().max().clamp(min=1.0))


def grad_err(out, ref, leaves):
    w = torch.randn_like(ref)
    g_out = torch.autograd.grad((out * w).sum(), leaves, retain_graph=True, allow_unused=True)
    g_ref = torch.autograd.grad((ref * w).sum(), leaves, retain_graph=True, allow_unused=True)
    return max(rel_err(a, b) for a, b in zip(g_out, g_ref) if b is not None)


# -- inputs ----------------------------------------------------------------------
def memsizer_inputs(B, T, k, d, dtype=torch.float32, seed=0):
    g = torch.Generator(device=dev).manual_seed(seed)
    p = M.slot_weights(torch.randn(B, T, 4, k, device=dev, generator=g)).to(dtype)
    return [p, torch.randn(B, T, k, device=dev, generator=g, dtype=dtype),
            torch.randn(B, T, d, device=dev, generator=g, dtype=dtype)]


def kernel_inputs(name, B, H, T, D, dtype=torch.float32, seed=0, m=64):
    """(phi_q, phi_k, key log-scale, query log-scale), v, gate logits (rfa only)."""
    g = torch.Generator(device=dev).manual_seed(seed)
    q, k, v = (torch.randn(B, H, T, D, device=dev, generator=g, dtype=dtype) for _ in range(3))
    gate = torch.randn(B, H, T, device=dev, generator=g) * 2 if name == "rfa" else None
    cpu = torch.Generator().manual_seed(seed)
    if name == "elu":
        return (K.elu_features(q), K.elu_features(k), None, None), v, gate
    if name == "favor":
        W = K.orthogonal_gaussian(m, D, cpu).to(dev)
        (pq, sq), (pk, s) = K.favor_features(q, W), K.favor_features(k, W)
        return (pq, pk, s, sq), v, gate
    if name == "rfa":
        W = torch.randn(m, D, generator=cpu).to(dev)
        return (K.rfa_features(q, W), K.rfa_features(k, W), None, None), v, gate
    w, b = torch.randn(H, m, D, generator=cpu).to(dev), torch.randn(H, m, generator=cpu).to(dev)
    return (K.t2r_features(q, w, b), K.t2r_features(k, w, b), None, None), v, gate


def flash_inputs(B, T, s, e, dtype=torch.float32, seed=0):
    g = torch.Generator(device=dev).manual_seed(seed)
    return [torch.randn(B, T, n, device=dev, generator=g, dtype=dtype) for n in (s, s, s, s, e)]


# -- 1. parity ---------------------------------------------------------------------
def memsizer_parity(T):
    xs = [x.requires_grad_() for x in memsizer_inputs(2, T, 8, 32)]
    ref, out = M.naive(*xs, causal=True), M.causal_chunked(*xs, chunk_size=64)
    state, steps = None, []
    with torch.no_grad():
        for t in range(T):
            o, state = M.causal_step(xs[0][:, t], xs[1][:, t], xs[2][:, t], state)
            steps.append(o)
    return [{"family": "memsizer", "form": "chunked", "T": T, "out_vs_naive": rel_err(out, ref),
             "grad_vs_naive": grad_err(out, ref, xs)},
            {"family": "memsizer", "form": "step", "T": T, "out_vs_naive": rel_err(torch.stack(steps, 1), ref)}]


def kernel_parity(name, T):
    (pq, pk, s, sq), v, gate = kernel_inputs(name, 2, 2, T, 16, m=256 if name == "rfa" else 64)
    leaves = [x.detach().requires_grad_() for x in (pq, pk, v)]
    ref = K.naive(*leaves, True, None, s, gate, q_log_scale=sq, eps=EPS)
    rows = []
    for form, f in KERNEL_FORMS.items():
        out, _ = f(*leaves, None, s, gate, sq, chunk_size=64, eps=EPS)
        rows.append({"family": f"kernel-{name}", "form": form, "T": T, "out_vs_naive": rel_err(out, ref),
                     "grad_vs_naive": grad_err(out, ref, leaves)})
    state, steps = None, []
    at = lambda x, t: None if x is None else x[:, :, t]  # noqa: E731
    with torch.no_grad():
        for t in range(T):
            o, state = K.causal_step(pq[:, :, t], pk[:, :, t], v[:, :, t], state, None, at(s, t), at(gate, t),
                                     at(sq, t), eps=EPS)
            steps.append(o)
    rows.append({"family": f"kernel-{name}", "form": "step", "T": T,
                 "out_vs_naive": rel_err(torch.stack(steps, 2), ref)})
    return rows


def flash_parity(T, G=64, norm="keys"):
    xs = [x.requires_grad_() for x in flash_inputs(2, T, 32, 64)]
    ref = Q.naive(*xs, True, chunk_size=G, relu2_norm=norm)
    out = Q.mixed_chunk(*xs, True, chunk_size=G, relu2_norm=norm)
    state, steps = None, []
    with torch.no_grad():
        for t in range(T):
            o, state = Q.causal_step(*(x[:, t] for x in xs), state, chunk_size=G, relu2_norm=norm)
            steps.append(o)
    return [{"family": "flash", "form": "mixed_chunk", "T": T, "out_vs_naive": rel_err(out, ref),
             "grad_vs_naive": grad_err(out, ref, xs)},
            {"family": "flash", "form": "step", "T": T, "out_vs_naive": rel_err(torch.stack(steps, 1), ref)}]


def parity(lengths):
    rows = []
    for T in lengths:
        rows += memsizer_parity(T) + flash_parity(T)
        for name in MAPS:
            rows += kernel_parity(name, T)
    return rows


# -- 2. low precision --------------------------------------------------------------
def low_precision(lengths):
    rows = []
    for T in lengths:
        for dtype in (torch.float16, torch.bfloat16):
            low = lambda x: None if x is None else x.to(dtype)  # noqa: E731
            p, k, v = memsizer_inputs(2, T, 32, 256)
            ref, out = M.causal_chunked(p, k, v, chunk_size=64), M.causal_chunked(*map(low, (p, k, v)), chunk_size=64)
            rows.append({"family": "memsizer", "T": T, "dtype": str(dtype), "finite": bool(torch.isfinite(out).all()),
                         "rel_err_vs_fp32": rel_err(out, ref)})
            xs = flash_inputs(1, T, 128, 256)
            ref = Q.mixed_chunk(*xs, True, chunk_size=256, relu2_norm="keys")
            out = Q.mixed_chunk(*map(low, xs), True, chunk_size=256, relu2_norm="keys")
            rows.append({"family": "flash", "T": T, "dtype": str(dtype), "finite": bool(torch.isfinite(out).all()),
                         "rel_err_vs_fp32": rel_err(out, ref)})
            for name in MAPS:
                (pq, pk, s, sq), v, gate = kernel_inputs(name, 1, 4, T, 64, m=128)
                ref, _ = K.causal_parallel(pq, pk, v, None, s, gate, sq, chunk_size=64, eps=EPS)
                out, _ = K.causal_parallel(*map(low, (pq, pk, v)), None, low(s), gate, low(sq), chunk_size=64, eps=EPS)
                rows.append({"family": f"kernel-{name}", "T": T, "dtype": str(dtype),
                             "finite": bool(torch.isfinite(out).all()), "rel_err_vs_fp32": rel_err(out, ref)})
    return rows


# -- 3. speed -------------------------------------------------------------------------
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


def fla_linear_attn():
    """fla-core's chunk_linear_attn, or None where fla-core does not import."""
    try:
        from fla.ops.linear_attn import chunk_linear_attn
    except Exception:  # not installed, or no Triton for this device
        return None
    return chunk_linear_attn


def speed_cases(B, H, T, D):
    """name -> a function that builds the inputs and returns one forward+backward."""
    def sdpa(dtype):
        q, k, v = (torch.randn(B, H, T, D, device=dev, dtype=dtype, requires_grad=True) for _ in range(3))
        return lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()

    def memsizer():
        xs = [x.requires_grad_() for x in memsizer_inputs(B, T, 32, H * D)]
        return lambda: M.causal_chunked(*xs, chunk_size=64).sum().backward()

    def kernel(name, form, dtype=torch.float32):
        (pq, pk, s, sq), v, gate = kernel_inputs(name, B, H, T, D, m=round(D * math.log(D)))
        leaves = [x.detach().to(dtype).requires_grad_() for x in (pq, pk, v)]
        f = KERNEL_FORMS[form]
        return lambda: f(*leaves, None, s, gate, sq, chunk_size=64, eps=EPS)[0].float().sum().backward()

    def fla(dtype=torch.bfloat16):
        (pq, pk, _, _), v, _ = kernel_inputs("elu", B, H, T, D)
        leaves = [x.detach().to(dtype).transpose(1, 2).contiguous().requires_grad_() for x in (pq, pk, v)]  # (B, T, H, D)
        return lambda: fla_linear_attn()(*leaves, scale=1.0, normalize=True)[0].float().sum().backward()

    def flash(dtype=torch.float32):
        xs = [x.requires_grad_() for x in flash_inputs(B, T, 128, 2 * H * D, dtype)]
        return lambda: Q.mixed_chunk(*xs, True, chunk_size=256, relu2_norm="keys").float().sum().backward()

    cases = {"sdpa-fp32": lambda: sdpa(torch.float32), "sdpa-bf16": lambda: sdpa(torch.bfloat16),
             "memsizer-chunked": memsizer, "flash-mixed-chunk": flash,
             "flash-mixed-chunk-bf16": lambda: flash(torch.bfloat16),
             "kernel-elu-parallel": lambda: kernel("elu", "parallel"),
             "kernel-elu-parallel-bf16": lambda: kernel("elu", "parallel", torch.bfloat16),
             "kernel-favor-parallel": lambda: kernel("favor", "parallel"),
             "kernel-rfa-parallel": lambda: kernel("rfa", "parallel")}
    if T <= 4096:  # the loop, for the record of what the parallel form replaces
        cases["kernel-elu-chunked-loop"] = lambda: kernel("elu", "chunked")
    if fla_linear_attn() is not None:
        cases["fla-chunk_linear_attn-elu-bf16"] = fla
    return cases


def speed(lengths):
    rows = []
    B, H, D = 4, 8, 64
    for T in lengths:
        for name, make in speed_cases(B, H, T, D).items():
            torch.cuda.empty_cache()
            try:
                ms, mib = timed(make())
            except torch.cuda.OutOfMemoryError:
                ms, mib = float("nan"), float("nan")
            rows.append({"op": name, "T": T, "B": B, "H": H, "head_dim": D, "fwd_bwd_ms": ms,
                         "tokens_per_s": B * T / (ms / 1000), "peak_mib": mib})
    return rows


def fla_agreement(T=1024):
    """fla-core's chunk_linear_attn against our parallel form on the same elu+1 features (bf16 vs fp32)."""
    if fla_linear_attn() is None:
        return [{"fla_core": "not importable"}]
    (pq, pk, _, _), v, _ = kernel_inputs("elu", 2, 4, T, 64)
    ours, _ = K.causal_parallel(pq, pk, v, chunk_size=64, eps=EPS)
    bf = lambda x: x.bfloat16().transpose(1, 2).contiguous()  # noqa: E731
    theirs = fla_linear_attn()(bf(pq), bf(pk), bf(v), scale=1.0, normalize=True)[0].transpose(1, 2)
    return [{"T": T, "fla_bf16_vs_ours_fp32": rel_err(theirs, ours)}]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("gpu_ops.json"))
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--quick", action="store_true", help="short sequences only (the test suite's CPU run)")
    args = ap.parse_args()
    global dev
    dev = args.device
    if dev == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu_ops_check: no CUDA device here (--device cpu runs the parity and precision checks)")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    name = torch.cuda.get_device_name() if dev == "cuda" else platform.processor() or "cpu"
    report = {"device": name, "torch": torch.__version__, "python": platform.python_version()}
    sections = [(parity, (7, 100) if args.quick else (7, 300, 1000)),
                (low_precision, (512,) if args.quick else (4096, 16384))]
    if dev == "cuda":
        sections += [(speed, (1024, 4096, 16384)), (fla_agreement, ())]
    for section, lengths in sections:
        report[section.__name__] = rows = section(lengths) if lengths else section()
        print(f"== {section.__name__}")
        for row in rows:
            print("  " + "  ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
    args.out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
