"""Where a decoding step's time goes: each family's step split by module.

    python -m benchmarks.profile_step [--families transformer,memsizer] [--length 256]
        [--batch 1] [--threads 1] [--repeats 3] [--out FILE.json]
    python -m benchmarks.profile_step --task mt [--families transformer,memsizer,memsizer-rec]
        [--src-len 512] [--beam 64] [--length 48] [--batch 2] ...

The benchmark suites' models (benchmarks/models.py) generate --length tokens
through fairseq's SequenceGenerator (LMs greedily, --task mt by beam search
over --batch random sources of --src-len tokens; rows as in the sum and beam
suites: <family> as its paper places its attention, <family>-rec with the
roles of its recommended config) while timers add up:

  attention  the decoder layers' self-attention modules, or whole GAUs (a GAU
             stands in for attention and FFN)
  cross      the decoder layers' cross-attention (mt)
  ffn        the decoder's FFN matrix products (fc1, fc2)
  output     the output projection onto the vocabulary
  encoder    the encoder pass (mt; once per generation, spread over its steps)
  reorder    beam search's reordering of the incremental state and encoder
             output after each step
  rest       the step's time minus all of the above: embeddings, layer norms,
             residuals, fairseq's layer and search code

Milliseconds per decoding step, the median over --repeats runs; timings, so
run it on an otherwise idle machine.
"""
import argparse
import json
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from fairseq.sequence_generator import EnsembleModel

from . import suites
from .measure import threads
from .turns import add_generation_args, build, generation_rows

MODULE_KINDS = ("attention", "cross", "ffn", "output")
SEARCH_KINDS = {"encoder": ("forward_encoder",), "reorder": ("reorder_incremental_state", "reorder_encoder_out")}
KINDS = (*MODULE_KINDS, *SEARCH_KINDS, "rest")


def timed_modules(model) -> dict:
    """{kind: [modules]} of a model's decoder."""
    layers = model.decoder.layers
    cross = [getattr(layer, "encoder_attn", None) or getattr(layer, "cross_attn", None) for layer in layers]
    return {
        "attention": [getattr(layer, "self_attn", None) or layer.gau for layer in layers],
        "cross": [m for m in cross if m is not None],
        "ffn": [fc for layer in layers for fc in (getattr(layer, "fc1", None), getattr(layer, "fc2", None))
                if fc is not None],
        "output": [model.decoder.output_projection],
    }


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


@contextmanager
def timed_search(seconds: dict):
    """Adds the time of SequenceGenerator's calls to its EnsembleModel (the
    encoder pass, the reorders) to seconds[kind]; these call the models'
    methods directly, so module hooks do not see them."""
    originals = {name: getattr(EnsembleModel, name) for names in SEARCH_KINDS.values() for name in names}

    def timer(kind, original):
        def timed(self, *args, **kwargs):
            start = time.perf_counter()
            try:
                return original(self, *args, **kwargs)
            finally:
                seconds[kind] += time.perf_counter() - start
        return timed

    for kind, names in SEARCH_KINDS.items():
        for name in names:
            setattr(EnsembleModel, name, timer(kind, originals[name]))
    try:
        yield
    finally:
        for name, original in originals.items():
            setattr(EnsembleModel, name, original)


def profile(task: str, row: str, length: int, batch: int, repeats: int, beam: int = 1, src_len: int = 0) -> dict:
    """ms per step by kind (median over the runs) for one row's model."""
    model, d, info, generate = build(task, row)
    generate(8, batch, min(beam, 2), min(src_len, 8))  # warm-up
    runs = []
    for _ in range(repeats):
        seconds = dict.fromkeys(KINDS[:-1], 0.0)
        handles = add_timers(model, seconds)
        with timed_search(seconds):
            total, steps, _, _ = generate(length, batch, beam, src_len)
        for h in handles:
            h.remove()
        n = len(steps) + 1
        run = {kind: 1000 * s / n for kind, s in seconds.items()}
        run["total"] = 1000 * total / n
        run["rest"] = run["total"] - sum(run[k] for k in KINDS[:-1])
        runs.append(run)
    record = {"family": row, "arch": info["arch"], "params": info["params"], "task": task, "length": length,
              "batch": batch, "ms_per_step": {k: suites.median([r[k] for r in runs]) for k in (*KINDS, "total")}}
    if task == "mt":
        record.update(beam=beam, src_len=src_len)
    return record


def table(records) -> str:
    lines = ["| model | " + " | ".join(KINDS) + " | total ms/step |", "|---|" + "---:|" * (len(KINDS) + 1)]
    for r in records:
        ms = r["ms_per_step"]
        where = f"L={r['length']}, batch {r['batch']}"
        if r["task"] == "mt":
            where = f"{r['family']}, S={r['src_len']}, beam {r['beam']}, {r['length']} tokens, {r['batch']} sentences"
        lines.append(f"| {r['arch']}, {r['params'] / 1e6:.2f}M, {where} | "
                     + " | ".join(f"{ms[k]:.2f}" for k in (*KINDS, "total")) + " |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.profile_step", description=__doc__.split("\n\n")[0])
    add_generation_args(p, "rows to profile (default: every family; with --task mt every row of the sum and "
                           "beam suites)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, help="also write the records as JSON")
    args = p.parse_args(argv)
    mt = args.task == "mt"
    rows = generation_rows(p, args, counts=("repeats",))
    with threads(args.threads), torch.no_grad():
        records = [profile(args.task, row, args.length, args.batch, args.repeats,
                           *((args.beam, args.src_len) if mt else ())) for row in rows]
    if args.out:
        args.out.write_text(json.dumps(records, indent=1))
    print(table(records))


if __name__ == "__main__":
    main()
