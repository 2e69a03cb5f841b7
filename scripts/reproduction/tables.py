"""Writing tables (markdown and CSV) and plots."""
import csv
import datetime
import os
import platform
import sys
from pathlib import Path

import publishing
import scoring
from .datasets import DATASETS, DEFAULT_DATASET, FAMILIES, model_configs
from .runs import SPEED_CONDITIONS, say


METRICS = {"bleu": ["bleu", "chrf"], "rouge": ["r1", "r2", "rl"], "ppl": ["ppl"]}


def cell(value, column: str) -> str:
    if isinstance(value, float):
        return "–" if value != value else (f"{value:,.0f}" if column in ("tok/s", "peak MB") else f"{value:.2f}")
    return f"{value:,}" if isinstance(value, int) else str(value)


def write_table(stem: Path, columns, rows, header) -> Path:
    """rows (dicts) as <stem>.csv (raw values) and, with a header, <stem>.md (`header` lines, then the table)."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{stem}.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(columns)
        for r in rows:
            w.writerow([r.get(c, "") for c in columns])
    if header is None:
        return Path(f"{stem}.csv")
    lines = [*header, "| " + " | ".join(columns) + " |", "| " + " | ".join("---" for _ in columns) + " |"]
    lines += ["| " + " | ".join(cell(r.get(c, ""), c) for c in columns) + " |" for r in rows]
    Path(f"{stem}.md").write_text("\n".join(lines) + "\n")
    return Path(f"{stem}.md")


def command_line(task: str) -> str:
    return " ".join(["bash scripts/reproduce_" + task + ".sh", *sys.argv[2:]])


def machine() -> str:
    import torch

    return (f"{datetime.date.today()} on {platform.machine()} with {os.cpu_count()} CPUs, "
            f"torch {torch.__version__}, {torch.get_num_threads()} threads")


def number(text: str):
    """A CSV cell back as the int or float it was written from (else the text)."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def read_csv(path: Path) -> list:
    """The rows of a table's CSV (none if it does not exist yet)."""
    if not path.is_file():
        return []
    with open(path) as f:
        return list(csv.DictReader(f))


def with_earlier_rows(rows, stem: Path, task: str, ds: str) -> list:
    """This run's rows and, from the table already at <stem>.csv, the rows of model
    configs this run did not train (so a table can be filled over several calls:
    --configs recommended, then --configs paper), in family order, each family's
    recommended config first. Rows of configs that no longer exist are dropped."""
    order = [model for family in FAMILIES for _, model in model_configs(task, ds, family)]
    done = {r["config"] for r in rows}
    kept = [{k: number(v) for k, v in r.items()} | {"recipe": r.get("recipe") or publishing.RECIPE}
            for r in read_csv(Path(f"{stem}.csv")) if r.get("config") in set(order) - done]
    return sorted(rows + kept, key=lambda r: order.index(r["config"]))


def extractive_note(ds: str, data: Path) -> list:
    """A summarization table's header line: what extracting the article's opening
    scores on the same test set (scoring.lead_baselines)."""
    refs = data / DATASETS[ds]["refs"].format(subset="test")
    docs = refs.with_suffix(".doc").read_text().splitlines()
    scores = scoring.lead_baselines(docs, scoring.read_references(refs))
    return ["Without training, on the same test set: " + "; ".join(
        f"{name} ROUGE-1/2/L {s['r1']:.2f} / {s['r2']:.2f} / {s['rl']:.2f}" for name, s in scores.items()) + ".", ""]


def table_stem(args, ds: str) -> Path:
    """<results>/<task>-<scale>, with the dataset's name where it is not the scale's default."""
    default = DEFAULT_DATASET[(args.task, "cpu" if args.scale == "smoke" else args.scale)]
    return args.results / (f"{args.task}-{args.scale}" + ("" if ds == default else f"-{ds}"))


def write_tables(rows, task, ds, args, notes=()) -> Path:
    metrics = METRICS[DATASETS[ds]["metric"]]
    speed = ["tok/s", "others"] if task == "lm" else ["tok/s", "sent/s", "others"]
    columns = ["family", "config", "model", "params", "train min", *metrics, *speed, "peak MB", "paper", "run", "recipe"]
    stem = table_stem(args, ds)
    header = [
        f"# {task} at {args.scale} scale: {ds}" + (f" (configs/{task}/{args.config}.yaml)" if args.config else ""),
        "",
        f"Command: `{command_line(task)}`  ",
        f"Last run {machine()}; the run column dates each row (rows of configs a later call did not "
        "train are kept). Decoding: "
        f"`{' '.join(DATASETS[ds]['decode'])}`" + ("" if task == "lm" else f", batch {args.batch_size}")
        + "; tok/s (" + ("fairseq-eval-lm scoring" if task == "lm" else "fairseq-generate decoding")
        + f", {SPEED_CONDITIONS}) and peak MB (resident memory of that whole process) come from that run. "
        f"config: the model config under configs/{task}/model/ (<dataset>_<family>: the recommended "
        "settings; _paper: the family as its paper sets it up, where that differs; _nolocal: the recommended "
        "settings without local precision, where they have it).  ",
        publishing.header_line(args.departures),
        "",
        *notes,
    ]
    return write_table(stem, columns, with_earlier_rows(rows, stem, task, ds), header)


def pyplot():
    """matplotlib's pyplot, drawing to files, without its font-search debug log."""
    import logging

    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_plot(plt, fig, ax, path: Path) -> None:
    """Grid, legend (beside the axes, off the lines), then the figure written to
    `path` (its folder made) and closed."""
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize="small")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")  # the saved image grows to hold the legend
    plt.close(fig)
    say(f"plot: {path}")
