"""Where a decoding step's time goes: each family's LM step split by module.

    python -m benchmarks.profile_step [--families transformer,memsizer] [--length 256]
        [--batch 1] [--threads 1] [--repeats 3] [--out FILE.json]

The decode suite's language models (benchmarks/models.py) generate --length
tokens greedily through fairseq's SequenceGenerator while forward hooks time
three kinds of module: the layers' attention (a self-attention module, or a
whole GAU, which stands in for attention and FFN), the FFN matrix products
(fc1, fc2) and the output projection onto the vocabulary. What is left of a
step ("rest": embeddings, layer norms, residuals, fairseq's layer and search
code) is the step's time minus the three. Milliseconds per step, the median
over --repeats runs; timings, so run it on an otherwise idle machine.
"""
import argparse
import json
import time
from pathlib import Path

import torch

from . import models, suites
from .measure import threads

KINDS = ("attention", "ffn", "output", "rest")


def timed_modules(model) -> dict:
    """{kind: [modules]} of an LM's decoder."""
    layers = model.decoder.layers
    attention = [getattr(layer, "self_attn", None) or layer.gau for layer in layers]
    ffn = [fc for layer in layers for fc in (getattr(layer, "fc1", None), getattr(layer, "fc2", None)) if fc is not None]
    return {"attention": attention, "ffn": ffn, "output": [model.decoder.output_projection]}


def add_timers(model, seconds: dict) -> list:
    """Forward hooks adding each timed module's time to seconds[kind]; returns the handles."""
    handles = []
    for kind, modules in timed_modules(model).items():
        def pre(module, args):
            module._started = time.perf_counter()

        def post(module, args, out, kind=kind):
            seconds[kind] += time.perf_counter() - module._started

        for m in modules:
            handles += [m.register_forward_pre_hook(pre), m.register_forward_hook(post)]
    return handles


def profile(family: str, length: int, batch: int, repeats: int) -> dict:
    """ms per step by kind (median over the runs) for one family's LM."""
    model, d, info = models.build("lm", family)
    suites.timed_generation(model, d, 8, batch, "cpu")  # warm-up
    runs = []
    for _ in range(repeats):
        seconds = dict.fromkeys(KINDS[:-1], 0.0)
        handles = add_timers(model, seconds)
        total, steps, _, _ = suites.timed_generation(model, d, length, batch, "cpu")
        for h in handles:
            h.remove()
        n = len(steps) + 1
        run = {kind: 1000 * s / n for kind, s in seconds.items()}
        run["total"] = 1000 * total / n
        run["rest"] = run["total"] - sum(run[k] for k in KINDS[:-1])
        runs.append(run)
    return {"family": family, "arch": info["arch"], "params": info["params"], "length": length, "batch": batch,
            "ms_per_step": {k: suites.median([r[k] for r in runs]) for k in (*KINDS, "total")}}


def table(records) -> str:
    lines = ["| model | " + " | ".join(KINDS) + " | total ms/step |", "|---|" + "---:|" * (len(KINDS) + 1)]
    for r in records:
        ms = r["ms_per_step"]
        lines.append(f"| {r['arch']}, {r['params'] / 1e6:.2f}M, L={r['length']}, batch {r['batch']} | "
                     + " | ".join(f"{ms[k]:.2f}" for k in (*KINDS, "total")) + " |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.profile_step", description=__doc__.split("\n\n")[0])
    p.add_argument("--families", default=",".join(models.FAMILIES))
    p.add_argument("--length", type=int, default=256, help="tokens generated (default 256)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, help="also write the records as JSON")
    args = p.parse_args(argv)
    families = args.families.split(",")
    for family in families:
        if family not in models.FAMILIES:
            p.error(f"--families: unknown family {family!r} (choose from {', '.join(models.FAMILIES)})")
    for name in ("length", "batch", "threads", "repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name} {getattr(args, name)}: must be a positive integer")
    with threads(args.threads), torch.no_grad():
        records = [profile(f, args.length, args.batch, args.repeats) for f in families]
    if args.out:
        args.out.write_text(json.dumps(records, indent=1))
    print(table(records))


if __name__ == "__main__":
    main()
