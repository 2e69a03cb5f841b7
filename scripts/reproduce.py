#!/usr/bin/env python
"""Reproduce a results table: every family trained with the same task config,
decoded, scored and timed, one row per family and model config: the
recommended one (configs/<task>/model/<dataset>_<family>.yaml) and, where the
family's paper sets it up otherwise, the paper's (<dataset>_<family>_paper.yaml).

  python scripts/reproduce.py {mt,sum,lm} --scale {cpu,paper,smoke} \\
      [--families transformer,memsizer,performer,flash] [--raw DIR] [--dataset NAME]

Stages per family (a line each; fairseq's own log streams underneath):
  prepare data (data-prep/<dataset>.py, once) -> train (fairseq-hydra-train with
  configs/<task>/<dataset>.yaml and model=<dataset>_<family>[_paper]) -> choose the
  checkpoint (best on valid; --average N averages the last N) -> generate
  (fairseq-generate, test set) or evaluate (fairseq-eval-lm) -> score (sacrebleu
  BLEU/chrF, rouge-score R1/R2/RL with stemming, perplexity) -> decoding speed
  and peak memory (resident set size of the decoding process).
Writes <work>/results/<task>-<scale>.md and .csv; --publish writes the
committed results/ instead (scripts/publishing.py: a run that departs from the
recipe is marked, and never replaces a recipe row). Re-running reuses finished
steps (a trained model is not retrained; delete its folder under --work to redo it).

--scale smoke is the cpu setup on a slice of the data with a tiny model and a
few dozen updates: for tests, not for numbers.

The pipeline's parts live in scripts/reproduction/: datasets.py (datasets,
smoke settings, model configs), runs.py (the commands), tables.py (tables and
plots), ablations.py (--ablations) and by_position.py (--by-position).
"""
import argparse
import datetime
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]
import publishing  # noqa: E402
from progress import Progress  # noqa: E402
from reproduction import by_position  # noqa: E402
from reproduction.ablations import ablations, load_ablations  # noqa: E402
from reproduction.datasets import CONFIG_KINDS, DATASETS, DEFAULT_DATASET, FAMILIES, PAPER  # noqa: E402
from reproduction.datasets import model_configs, model_name  # noqa: E402
from reproduction.runs import choose_checkpoint, evaluate, prepare, say, train  # noqa: E402
from reproduction.tables import extractive_note, read_csv, table_stem, write_tables  # noqa: E402


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("task", choices=("mt", "sum", "lm"))
    ap.add_argument("--scale", choices=("cpu", "paper", "smoke"), default="cpu")
    ap.add_argument("--families", default=",".join(FAMILIES), help=f"comma-separated, from {', '.join(FAMILIES)}")
    ap.add_argument("--dataset", help="default: multi30k/wmt16 (mt), news/cnn_dm (sum), austen/wikitext103 (lm); "
                                      "iwslt14 is the other paper-scale MT set")
    ap.add_argument("--raw", "--data", type=Path, help="raw data folder, passed to the data-prep script (offline use)")
    ap.add_argument("--demo", action="store_true",
                    help="the quick start (mt): transformer and memsizer with configs/mt/multi30k_demo.yaml "
                         "(400 updates), table and logs in work/demo_mt/")
    ap.add_argument("--configs", default=",".join(CONFIG_KINDS),
                    help="which of each family's model configs to run, comma-separated: recommended, paper "
                         "(where the family's paper sets it up otherwise), nolocal (the recommended config without "
                         "local precision, where it has it); default: all")
    ap.add_argument("--work", type=Path, help="data, checkpoints, logs (default work/reproduce/<task>-<scale>)")
    ap.add_argument("--results", type=Path, help="where the tables go (default <work>/results; results/ with --publish)")
    ap.add_argument("--publish", action="store_true",
                    help="update the committed tables in results/ (and plots in docs/); refused for a run that "
                         "would replace a recipe row with other settings")
    add_run_options(ap)
    return ap


def add_run_options(ap: argparse.ArgumentParser) -> None:
    """How models train and decode, and the other kinds of table (ablations, by position)."""
    ap.add_argument("--average", type=int, help="average the last N interval checkpoints "
                                               "(default 5 at paper scale; otherwise the best checkpoint)")
    ap.add_argument("--save-interval-updates", type=int, default=1000, help="with --average (default 1000)")
    ap.add_argument("--max-update", "--updates", type=int, help="train for N updates instead of the config's budget")
    ap.add_argument("--batch-size", type=int, default=64, help="decoding batch size (default 64)")
    ap.add_argument("--quiet", action="store_true", help="do not stream fairseq's training log")
    ap.add_argument("--ablations", nargs="?", const="", metavar="GRID",
                    help="train the rows of configs/<task>/ablations/<GRID>.yaml (default: the dataset's grid) "
                         "and score them on the validation set, instead of the families' test table")
    ap.add_argument("--by-position", action="store_true",
                    help="instead of the test table, the validation perplexity by position (LM: in the block; "
                         "MT, summarization: in the target) of each model (trained if needed): "
                         "results/positions-<task>-<scale>.md, docs/positions-<task>-<scale>.png")
    ap.add_argument("--rows", help="with --ablations: only these rows (comma-separated ids)")
    ap.add_argument("--fresh", action="store_true", help="with --ablations: retrain runs already recorded")
    ap.add_argument("--seeds", help="with --ablations: only these of the grid's seeds (comma-separated)")
    ap.add_argument("--set", dest="override", action="append", default=[], metavar="KEY=VALUE",
                    help="a hydra override for training, repeatable: --set optimization.lr=[0.001] "
                         "(+model.KEY=VALUE for a model option its config file does not list)")


def check_args(args, ap) -> str:
    """Every option checked (one line from argparse for a bad one), the demo's
    settings filled in; returns the dataset."""
    args.config = None
    if args.demo:
        if args.task != "mt":
            ap.error("--demo is the translation quick start: bash scripts/demo_mt.sh")
        args.config = "multi30k_demo"
        args.families = "transformer,memsizer" if args.families == ",".join(FAMILIES) else args.families
        args.configs = "recommended"
        args.work = args.work or ROOT / "work" / "demo_mt"
    for family in args.families.split(","):
        if family not in FAMILIES:
            ap.error(f"--families: unknown family {family!r} (choose from {', '.join(FAMILIES)})")
    for kind in args.configs.split(","):
        if kind not in CONFIG_KINDS:
            ap.error(f"--configs: unknown kind {kind!r} (choose from {', '.join(CONFIG_KINDS)})")
    if args.by_position and args.ablations is not None:
        ap.error("--by-position scores the results table's models: leave out --ablations")
    ds = args.dataset or DEFAULT_DATASET[(args.task, "cpu" if args.scale == "smoke" else args.scale)]
    if ds not in DATASETS or DATASETS[ds]["task"] != args.task:
        ap.error(f"--dataset {ds!r} is not a {args.task} dataset")
    args.departures = publishing.deviations(args, ap)
    if args.average is None:
        args.average = 5 if args.scale == "paper" else 0
    return ds


def main(argv=None):
    ap = parser()
    args = ap.parse_args(argv)
    ds = check_args(args, ap)
    kind = "ablations" if args.ablations is not None else "reproduce"
    work = (args.work or ROOT / "work" / kind / publishing.work_name(args.task, args.scale, args.departures)).resolve()
    args.results = publishing.results_folder(args) or work / "results"
    if args.ablations is not None:
        spec = load_ablations(args.task, args.ablations or ds, args.rows)  # bad grid or rows stop here, before data-prep
        table = ablations(args, spec, ds, prepare(ds, args, work), work)
    else:
        todo = [(family, kind, model) for family in args.families.split(",")
                for kind, model in model_configs(args.task, ds, family, args.configs.split(","))]
        guard_table(args, ds, {model for _, _, model in todo})
        table = families_table(args, ds, prepare(ds, args, work), work, todo)
    say(f"table: {table}")
    print(table.read_text())


def families_table(args, ds: str, data: Path, work: Path, todo) -> Path:
    """Train each (family, config kind, model config) of `todo`; score it on the
    test set (the results table) or by position on the validation set."""
    rows, losses = [], {}
    block = by_position.block_tokens(args, ds) if args.by_position else None
    progress = Progress(len(todo))
    for n, (family, kind, model) in enumerate(todo, 1):
        say(f"{progress.step(n)} {model}")
        ckpt = work / "checkpoints" / (family + CONFIG_KINDS[kind].replace("_", "-"))
        trained = train(args.task, ds, family, model, data, ckpt, args)
        if args.by_position:
            losses[model] = (family, by_position.position_losses(model, data, ckpt, block))
            continue
        scores = evaluate(args.task, ds, model, data, choose_checkpoint(ckpt, args.average), args)
        say(f"{model}: " + ", ".join(f"{k} {v:.2f}" for k, v in scores.items()))
        rows.append({"family": family, "config": model, "model": model_name(args.task, ds, family),
                     "params": trained["params"], "train min": trained["train_seconds"] / 60, **scores,
                     "paper": PAPER.get((ds, family), "n/a"), "run": str(datetime.date.today()),
                     "recipe": publishing.recipe_cell(args.departures)})
    if args.by_position:
        return by_position.write_positions(losses, args, ds, block, by_position.positions_stem(args))
    return write_tables(rows, args.task, ds, args, extractive_note(ds, data) if args.task == "sum" else ())


def guard_table(args, ds: str, configs) -> None:
    """Before anything runs: a custom call may not replace the recipe rows of the
    table it writes (the results table's rows of `configs`; every row of the
    loss-by-position table, which a call writes whole)."""
    stem = by_position.positions_stem(args) if args.by_position else table_stem(args, ds)
    rows = read_csv(Path(f"{stem}.csv"))
    keys = {r["config"] for r in rows} if args.by_position else configs
    publishing.guard_recipe_rows(rows, keys, args.departures, Path(f"{stem}.csv"), "rows for")


if __name__ == "__main__":
    main()
