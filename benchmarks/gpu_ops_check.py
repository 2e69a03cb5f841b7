#!/usr/bin/env python
"""Device checks of the attention math (linear_fairseq/ops), runnable without fairseq.

1. fp32 parity on the device: chunked and recurrent forms vs the quadratic
   reference, outputs and gradients, for MemSizer and every kernel feature map.
2. fp16 / bf16 inputs at T = 4096 and 16384: finite, and error vs fp32.
3. (CUDA only) forward+backward time and peak memory of the causal training
   forms vs torch's scaled_dot_product_attention (causal), T = 1024 / 4096 / 16384.

Writes JSON (--out) and prints a summary. Loads the ops files by path, so a
GPU machine needs only torch:  python benchmarks/gpu_ops_check.py --device cuda
"""
import argparse
import importlib.util
import json
import math
import platform
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

OPS = Path(__file__).resolve().parents[1] / "linear_fairseq" / "ops"


def load(name):
    spec = importlib.util.spec_from_file_location(f"ops_{name}", OPS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


M, K = load("memsizer"), load("performer")
EPS = 1e-6  # the normalizer clamp (--kernel-eps) of rfa and t2r
dev = "cuda"


def rel_err(a, b):
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).abs().max() / b.abs().max().clamp(min=1.0))


# -- inputs ----------------------------------------------------------------------
def memsizer_inputs(B, T, k, d, dtype=torch.float32, seed=0):
    g = torch.Generator(device=dev).manual_seed(seed)
    p = M.slot_weights(torch.randn(B, T, 4, k, device=dev, generator=g)).to(dtype)
    return [p, torch.randn(B, T, k, device=dev, generator=g, dtype=dtype),
            torch.randn(B, T, d, device=dev, generator=g, dtype=dtype)]


def kernel_inputs(name, B, H, T, D, dtype=torch.float32, seed=0, m=64):
    g = torch.Generator(device=dev).manual_seed(seed)
    q, k, v = (torch.randn(B, H, T, D, device=dev, generator=g, dtype=dtype) for _ in range(3))
    gate = torch.randn(B, H, T, device=dev, generator=g) * 2 if name == "rfa" else None
    cpu = torch.Generator().manual_seed(seed)
    if name == "elu":
        feats = (K.elu_features(q), K.elu_features(k), None)
    elif name == "favor":
        W = K.orthogonal_gaussian(m, D, cpu).to(dev)
        (pq, _), (pk, s) = K.favor_features(q, W), K.favor_features(k, W)
        feats = (pq, pk, s)
    elif name == "rfa":
        W = torch.randn(m, D, generator=cpu).to(dev)
        feats = (K.rfa_features(q, W), K.rfa_features(k, W), None)
    else:
        w, b = torch.randn(H, m, D, generator=cpu).to(dev), torch.randn(H, m, generator=cpu).to(dev)
        feats = (K.t2r_features(q, w, b), K.t2r_features(k, w, b), None)
    return feats, v, gate


# -- 1. parity ---------------------------------------------------------------------
def parity():
    rows = []
    for T in (7, 300, 1000):
        xs = [x.requires_grad_() for x in memsizer_inputs(2, T, 8, 32)]
        ref = M.naive(*xs, causal=True)
        out = M.causal_chunked(*xs, chunk_size=64)
        w = torch.randn_like(ref)
        g_ref = torch.autograd.grad((ref * w).sum(), xs)
        g_out = torch.autograd.grad((out * w).sum(), xs)
        state, steps = None, []
        with torch.no_grad():
            for t in range(T):
                o, state = M.causal_step(xs[0][:, t], xs[1][:, t], xs[2][:, t], state)
                steps.append(o)
        rows.append({"family": "memsizer", "T": T, "chunked_vs_naive": rel_err(out, ref),
                     "step_vs_naive": rel_err(torch.stack(steps, 1), ref),
                     "grad_vs_naive": max(rel_err(a, b) for a, b in zip(g_out, g_ref))})
    for name in ("elu", "favor", "rfa", "t2r"):
        for T in (7, 300, 1000):
            (pq, pk, s), v, gate = kernel_inputs(name, 2, 2, T, 16, m=256 if name == "rfa" else 64)
            leaves = [x.detach().requires_grad_() for x in (pq, pk, v)]
            ref = K.naive(*leaves, True, None, s, gate, eps=EPS)
            out, _ = K.causal_chunked(*leaves, None, s, gate, chunk_size=64, eps=EPS)
            w = torch.randn_like(ref)
            g_ref = torch.autograd.grad((ref * w).sum(), leaves)
            g_out = torch.autograd.grad((out * w).sum(), leaves)
            state, steps = None, []
            at = lambda x, t: None if x is None else x[:, :, t]  # noqa: E731
            with torch.no_grad():
                for t in range(T):
                    o, state = K.causal_step(pq[:, :, t], pk[:, :, t], v[:, :, t], state, None, at(s, t), at(gate, t),
                                             eps=EPS)
                    steps.append(o)
            rows.append({"family": f"kernel-{name}", "T": T, "chunked_vs_naive": rel_err(out, ref),
                         "step_vs_naive": rel_err(torch.stack(steps, 2), ref),
                         "grad_vs_naive": max(rel_err(a, b) for a, b in zip(g_out, g_ref))})
    return rows


# -- 2. low precision --------------------------------------------------------------
def low_precision():
    rows = []
    for T in (4096, 16384):
        for dtype in (torch.float16, torch.bfloat16):
            p, k, v = memsizer_inputs(2, T, 32, 256)
            ref = M.causal_chunked(p, k, v, chunk_size=64)
            out = M.causal_chunked(p.to(dtype), k.to(dtype), v.to(dtype), chunk_size=64)
            rows.append({"family": "memsizer", "T": T, "dtype": str(dtype), "finite": bool(torch.isfinite(out).all()),
                         "rel_err_vs_fp32": rel_err(out, ref)})
            for name in ("elu", "favor", "rfa", "t2r"):
                (pq, pk, s), v, gate = kernel_inputs(name, 1, 4, T, 64, m=128)
                ref, _ = K.causal_chunked(pq, pk, v, None, s, gate, chunk_size=64, eps=EPS)
                low = lambda x: None if x is None else x.to(dtype)  # noqa: E731
                out, _ = K.causal_chunked(low(pq), low(pk), low(v), None, low(s), gate, chunk_size=64, eps=EPS)
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


def speed():
    rows = []
    B, H, D = 4, 8, 64
    for T in (1024, 4096, 16384):
        def sdpa(dtype):
            q, k, v = (torch.randn(B, H, T, D, device=dev, dtype=dtype, requires_grad=True) for _ in range(3))
            return lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()

        def memsizer():
            xs = [x.requires_grad_() for x in memsizer_inputs(B, T, 32, H * D)]
            return lambda: M.causal_chunked(*xs, chunk_size=64).sum().backward()

        def favor():
            (pq, pk, s), v, _ = kernel_inputs("favor", B, H, T, D, m=round(D * math.log(D)))
            leaves = [x.detach().requires_grad_() for x in (pq, pk, v)]
            return lambda: K.causal_chunked(*leaves, None, s, chunk_size=64, eps=EPS)[0].sum().backward()

        for name, make in (("sdpa-fp32", lambda: sdpa(torch.float32)), ("sdpa-bf16", lambda: sdpa(torch.bfloat16)),
                           ("memsizer-chunked", memsizer), ("kernel-favor-chunked", favor)):
            torch.cuda.empty_cache()
            ms, mib = timed(make())
            rows.append({"op": name, "T": T, "B": B, "H": H, "head_dim": D, "fwd_bwd_ms": ms,
                         "tokens_per_s": B * T / (ms / 1000), "peak_mib": mib})
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("gpu_ops.json"))
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    args = ap.parse_args()
    global dev
    dev = args.device
    if dev == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu_ops_check: no CUDA device (use --device cpu for the parity and precision checks)")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    name = torch.cuda.get_device_name() if dev == "cuda" else platform.processor() or "cpu"
    report = {"device": name, "torch": torch.__version__, "python": platform.python_version()}
    for section in (parity, low_precision) + ((speed,) if dev == "cuda" else ()):
        report[section.__name__] = rows = section()
        print(f"== {section.__name__}")
        for row in rows:
            print("  " + "  ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
    args.out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
