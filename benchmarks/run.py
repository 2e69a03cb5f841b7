"""Speed and memory of every family against fairseq's softmax transformer.

    python -m benchmarks.run --suite decode|hybrid|mt|sum|beam|train|local|all [--device cpu|cuda] [--quick]
        [--out DIR] [--budget SECONDS] [--lengths 256,1024] [--dtype float32|bfloat16|float16]
        [--readme README.md] [--resume | --replace]

Writes DIR/results.json (raw measurements, machine, versions), DIR/results.md
(the tables and the targets), one PNG per suite, and prints the tables.
--readme replaces the block between the benchmark markers in that file with
results.md, so the README's table is reproduced by the same command.
The JSON is written after each suite; --resume keeps the suites an earlier
run with the same code, sizes, budget, repeats and machine wrote there, and
runs the rest. A DIR that holds an earlier run's results.json is refused
unless --resume finishes it or --replace measures it anew.
"""
import argparse
import datetime
import json
import logging
import sys
import warnings
from pathlib import Path

import torch

from scripts.progress import Progress

from .measure import DTYPES

SCHEMA = 1
FULL = {
    "decode": {"lengths": [256, 1024, 4096, 16384], "batches": [1, 16]},
    "hybrid": {"lengths": [256, 1024, 4096], "softmax_layers": "0"},
    "mt": {"src_lengths": [32, 128, 512, 2048], "sentences": 2, "beam": 4},
    "sum": {"src_lengths": [400, 1000], "tgt_len": 48, "sentences": 4, "beam": 4},
    "beam": {"beams": [1, 4, 16, 64], "src_len": 512, "tgt_len": 48, "sentences": 2},
    "train": {"contexts": [512, 2048, 8192], "tokens_per_batch": 8192},
    "local": {"lengths": [256, 4096], "batches": [1, 16], "contexts": [2048], "tokens_per_batch": 8192},
}
QUICK = {
    "decode": {"lengths": [16, 64], "batches": [1, 2]},
    "hybrid": {"lengths": [16, 64], "softmax_layers": "0"},
    "mt": {"src_lengths": [8, 16], "sentences": 2, "beam": 4},
    "sum": {"src_lengths": [16, 32], "tgt_len": 4, "sentences": 2, "beam": 2},
    "beam": {"beams": [1, 4], "src_len": 16, "tgt_len": 4, "sentences": 2},
    "train": {"contexts": [32, 64], "tokens_per_batch": 128},
    "local": {"lengths": [16, 64], "batches": [1], "contexts": [64], "tokens_per_batch": 128},
}
SUITES = tuple(FULL)


def lengths_arg(text: str) -> list:
    """--lengths: comma-separated positive integers."""
    try:
        lengths = [int(x) for x in text.split(",")]
    except ValueError:
        lengths = []
    if not lengths or min(lengths) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give positive whole numbers separated by commas, e.g. 256,1024")
    return lengths


def with_lengths(sizes: dict, lengths) -> dict:
    """The suites' sizes, with `lengths` (None: their own) for those that generate to lengths."""
    return {name: {**size, "lengths": lengths} if lengths and "lengths" in size else size
            for name, size in sizes.items()}


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0])
    p.add_argument("--suite", choices=[*SUITES, "all"], default="all")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--quick", action="store_true", help="small sizes, for smoke tests (< 60 s on a 2-core CPU)")
    p.add_argument("--out", type=Path, help="output folder (default benchmarks/results/<device>[-quick])")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds a single measurement may take; longer projected runs are skipped "
                        "(default 600, 30 with --quick)")
    p.add_argument("--lengths", type=lengths_arg, default=None,
                   help="the lengths the decode, hybrid and local suites generate to, comma-separated "
                        "(default: each suite's own, e.g. decode " + ",".join(map(str, FULL["decode"]["lengths"])) + ")")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed runs per measurement, budget allowing (default 3, 2 with --quick)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--freed-memory", choices=["default", "kept"], default="default",
                   help="while training steps are timed (train, local suites): default: the allocator as it "
                        "is; kept: glibc keeps freed memory for reuse, so the steps are not timed faulting "
                        "their temporaries in anew (docs/performance.md)")
    p.add_argument("--dtype", choices=list(DTYPES), default="float32",
                   help="weights and activations of the training suites (train, local): half precision as "
                        "fairseq's --bf16 / --fp16 run the model (default float32)")
    p.add_argument("--readme", type=Path, help="a file whose benchmark block is replaced by the tables")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--resume", action="store_true",
                   help="keep the suites OUT/results.json already holds from a run with the same options "
                        "on this machine; measure the others")
    p.add_argument("--replace", action="store_true",
                   help="measure anew where OUT/results.json holds an earlier run (it is rewritten)")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch sees no CUDA device")
    if args.budget is not None and args.budget <= 0:
        p.error(f"--budget {args.budget}: must be > 0")
    if args.repeats is None:
        args.repeats = default_repeats(args.quick)
    if args.repeats < 1:
        p.error(f"--repeats {args.repeats}: must be >= 1")
    if args.threads is not None and args.threads < 1:
        p.error(f"--threads {args.threads}: must be >= 1")
    if args.budget is None:
        args.budget = 30.0 if args.quick else 600.0
    if args.out is None:
        args.out = Path(__file__).parent / "results" / (args.device + ("-quick" if args.quick else ""))
    if args.resume and args.replace:
        p.error("--resume keeps an earlier run's suites, --replace measures them anew: choose one")
    earlier = args.out / "results.json"
    if earlier.exists() and not (args.resume or args.replace):
        sys.exit(f"benchmarks.run: {earlier} holds an earlier run; --resume to finish it, --replace to measure "
                 f"anew (rewriting it), or another --out")
    return args


def default_repeats(quick: bool) -> int:
    return 2 if quick else 3


def resumed(path: Path, fresh: dict) -> dict:
    """From an earlier run's JSON at `path`: the suites of `fresh["sizes"]` it
    measured at the same sizes, and "earlier" (when, with which command, which
    suites) for the header. Exits with one line if it was measured with other
    code or options or on another machine; {} if there is no such file."""
    if not path.exists():
        return {}
    try:
        old = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        sys.exit(f"--resume: {path} is not JSON ({e}); move it away or run without --resume")
    old.setdefault("repeats", default_repeats(old.get("quick")))  # files from before the key was recorded
    old.setdefault("freed_memory", "default")
    old.setdefault("dtype", "float32")
    if old.get("code") != fresh["code"]:
        sys.exit(f"--resume: {path} was measured with other code (digest {old.get('code')}, now {fresh['code']}: "
                 f"linear_fairseq, benchmarks or configs/mt/model changed); run without --resume")
    for key in ("schema", "quick", "budget_s", "repeats", "freed_memory", "dtype", "machine"):
        if old.get(key) != fresh[key]:
            sys.exit(f"--resume: {path} has {key} {old.get(key)!r}, this run {fresh[key]!r}; "
                     f"rerun with the options it was made with, or without --resume")
    kept = [n for n, size in fresh["sizes"].items() if n in old and old["sizes"].get(n) == size]
    own = [n for n in old.get("ran", SUITES) if n in kept]
    earlier = [{**e, "suites": [n for n in e["suites"] if n in kept]} for e in old.get("earlier", [])]
    earlier.append({"created": old["created"], "command": old["command"], "suites": own})
    return {"earlier": [e for e in earlier if e["suites"]], **{n: old[n] for n in kept}}


def main(argv=None):
    args = parse_args(argv)
    logging.disable(logging.WARNING)  # fairseq's per-model INFO lines
    warnings.filterwarnings("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)
    from . import report, suites
    from .measure import autotune_briefly, code_digest, machine

    autotune_briefly()

    sizes = with_lengths(QUICK if args.quick else FULL, args.lengths)
    chosen = SUITES if args.suite == "all" else (args.suite,)
    results = {
        "schema": SCHEMA,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python -m benchmarks.run", *(sys.argv[1:] if argv is None else argv)]),
        "quick": args.quick,
        "budget_s": args.budget,
        "repeats": args.repeats,
        "freed_memory": args.freed_memory,
        "dtype": args.dtype,
        "machine": machine(args.device),
        "code": code_digest(),
        "sizes": {name: sizes[name] for name in chosen},
    }
    todo = list(chosen)
    if args.resume:
        results.update(resumed(args.out / "results.json", results))
        todo = [name for name in chosen if name not in results]
        echo(f"--resume: kept {', '.join(n for n in chosen if n not in todo) or 'nothing'}; "
             f"measuring {', '.join(todo) or 'nothing'}")
    results["ran"] = todo
    progress = Progress(sum(suites.measurements(name, sizes[name]) for name in todo))
    count = iter(range(1, progress.total + 1))  # each suite logs one line a measurement (or skip)
    common = {"device": args.device, "budget": args.budget, "repeats": args.repeats,
              "log": lambda line: echo(f"{progress.after(next(count, progress.total))} {line}")}
    args.out.mkdir(parents=True, exist_ok=True)
    results["targets"] = report.targets(results)
    for name in todo:  # the JSON is rewritten after each suite: a long run interrupted keeps what it measured
        own = {"freed_memory_mode": args.freed_memory, "dtype": DTYPES[args.dtype]} if name in suites.TRAINING else {}
        results[name] = suites.RUN[name](**sizes[name], **common, **own)
        results["targets"] = report.targets(results)
        (args.out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    plots = [] if args.no_plots else report.plots(results, args.out)
    tables = report.markdown(results, [p.name for p in plots])
    (args.out / "results.md").write_text(tables)
    print(tables)
    if args.readme:
        report.update_readme(args.readme, tables, args.out)
    print(f"wrote {args.out / 'results.json'}" + "".join(f", {p}" for p in plots))
    return results


def echo(line):
    print(line, flush=True)


if __name__ == "__main__":
    main()
