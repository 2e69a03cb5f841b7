"""Each row's generation speed against the first row's, timed in turns, with the
code of the tree it runs in.

    python -m benchmarks.turns [--task lm|mt] [--families transformer,flash]
        [--length N] [--batch N] [--beam N] [--src-len N] [--runs 3] [--bad-below RATIO]

The suites' models (benchmarks/models.py; rows as in profile_step: families, and
with --task mt the sum and beam suites' rows, <family>-rec among them) generate
whole sequences (suites.timed_generation: LMs --length tokens greedily, --task mt
by beam search over --batch random sources of --src-len tokens), every row once
a round, --runs rounds. Prints one JSON line: each row's runs (tokens/s, or
sentences/s with --task mt), their median and its ratio to the first row's.

Two versions of the code compare on one machine when it runs in each one's tree
in turn (`git worktree add /tmp/old REV`):

    (cd /tmp/old && python /path/to/this/benchmarks/turns.py --task mt --families transformer,flash)
    python -m benchmarks.turns --task mt --families transformer,flash

Run as a file, it puts the current directory first on the module path, so that
tree's `benchmarks` and `linear_fairseq` run; it calls only models.build,
suites.seq2seq_rows, suites.random_source and suites.timed_generation, which the
trees since 2026-12-03 have. --bad-below R exits 1 where a row's ratio to the
first is below R, so that `git bisect run` can use it. Timings: run it on an otherwise idle
machine, one thread (--threads, default 1).
"""
import argparse
import json
import os
import sys

if __name__ == "__main__" and __package__ in (None, ""):  # run as a file: the current tree's code
    sys.path.insert(0, os.getcwd())

import torch  # noqa: E402

from benchmarks import models, suites  # noqa: E402


def add_generation_args(p: argparse.ArgumentParser, rows_help: str):
    """The options that say what is generated (profile_step's and these)."""
    p.add_argument("--task", choices=["lm", "mt"], default="lm")
    p.add_argument("--families", help=rows_help)
    p.add_argument("--length", type=int, default=None, help="tokens generated (default 256, 48 with --task mt)")
    p.add_argument("--batch", type=int, default=None, help="sequences (default 1, 2 sources with --task mt)")
    p.add_argument("--beam", type=int, default=64, help="beam width (--task mt; default 64)")
    p.add_argument("--src-len", type=int, default=512, help="source tokens (--task mt; default 512)")
    p.add_argument("--threads", type=int, default=1)


def generation_rows(p: argparse.ArgumentParser, args, counts=()) -> list:
    """The rows asked for, every name and count checked (p.error names a bad one), and
    --length and --batch given their task's defaults."""
    mt = args.task == "mt"
    known = list(suites.seq2seq_rows()) if mt else models.FAMILIES
    rows = args.families.split(",") if args.families else known
    for row in rows:
        if row not in known:
            p.error(f"--families: unknown {'row' if mt else 'family'} {row!r} (choose from {', '.join(known)})")
    if args.length is None:
        args.length = 48 if mt else 256
    if args.batch is None:
        args.batch = 2 if mt else 1
    for name in ("length", "batch", "beam", "src_len", "threads", *counts):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} {getattr(args, name)}: must be a positive integer")
    return rows


def build(task: str, row: str):
    """(model, dictionary, info, generate) where generate(length, batch, beam, src_len) times one
    generation (suites.timed_generation; --task mt over random sources, the same for every row
    at each call of a round: each row's draw is seeded alike)."""
    if task == "lm":
        model, d, info = models.build("lm", row)
        return model, d, info, lambda length, batch, beam, src_len: suites.timed_generation(
            model, d, length, batch, "cpu")
    family, placement = suites.seq2seq_rows()[row]
    model, d, info = models.build("mt", family, placement=placement)
    g = torch.Generator().manual_seed(0)
    return model, d, info, lambda length, batch, beam, src_len: suites.timed_generation(
        model, d, length, batch, "cpu", beam, suites.random_source(d, batch, src_len, g, "cpu"))


def generator(task: str, row: str, args):
    """A function that generates once with the row's model and returns its speed."""
    generate = build(task, row)[3]
    units = args.batch * (args.length if task == "lm" else 1)  # tokens, or sentences
    return lambda: units / generate(args.length, args.batch, args.beam, args.src_len)[0]


def in_turns(runs: dict, rounds: int) -> dict:
    """Row -> its speeds, every row once a round after one untimed warm-up each."""
    for run in runs.values():
        run()
    speeds = {row: [] for row in runs}
    for _ in range(rounds):
        for row, run in runs.items():
            speeds[row].append(run())
    return speeds


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.turns", description=__doc__.split("\n\n")[0])
    add_generation_args(p, "rows to time, the first the one the others are compared with (default: every "
                           "family; with --task mt every row of the sum and beam suites)")
    p.add_argument("--runs", type=int, default=3, help="rounds, every row once a round (default 3)")
    p.add_argument("--bad-below", type=float, help="exit 1 where another row's ratio to the first is below this")
    args = p.parse_args(argv)
    rows = generation_rows(p, args, counts=("runs",))
    torch.set_num_threads(args.threads)
    with torch.no_grad():
        speeds = in_turns({row: generator(args.task, row, args) for row in rows}, args.runs)
    medians = {row: sorted(xs)[len(xs) // 2] for row, xs in speeds.items()}
    ratios = {row: medians[row] / medians[rows[0]] for row in rows}
    print(json.dumps({"unit": "sentences/s" if args.task == "mt" else "tokens/s", "runs": speeds,
                      "median": medians, "ratio": {row: round(r, 3) for row, r in ratios.items()}}))
    if args.bad_below is not None and any(ratios[row] < args.bad_below for row in rows[1:]):
        sys.exit(1)


if __name__ == "__main__":
    main()
