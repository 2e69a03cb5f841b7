"""Ablation grids (--ablations): rows of settings from configs/<task>/ablations/,
trained and scored on the validation set."""
import re
import sys
from pathlib import Path

from omegaconf import OmegaConf

import publishing
from progress import Progress
from .datasets import (CONFIG_KINDS, FAMILIES, GRID_FALLBACK, ROOT, SMOKE, SMOKE_MODEL, row_config, settings_digest,
                       smoke_family)
from .runs import evaluate, linearized, say, train, untrained
from .tables import command_line, machine, pyplot, read_csv, save_plot, write_table


# -- ablations: rows of settings, scored on the validation set ------------------------------
VALID_METRIC = {"mt": ("bleu", "valid BLEU"), "sum": ("rl", "valid ROUGE-L"), "lm": ("ppl", "valid ppl")}

# grid row keys naming the row whose model a row starts from: (that row's family, None: this row's; in words)
STARTS = {"linearize_from": ("transformer", "softmax (transformer) row"),
          "finetune_from": (None, "row of the same family"),
          "resume_from": (None, "row of the same family")}


def load_ablations(task: str, grid: str, rows=None) -> dict:
    """The grid configs/<task>/ablations/<grid>.yaml, checked (families, and the
    --rows asked for) before anything runs."""

    path = ROOT / "configs" / task / "ablations" / f"{grid}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in path.parent.glob("*.yaml"))) or "none"
        sys.exit(f"[reproduce] --ablations {grid}: no such grid ({path} does not exist; {task} grids: {known})")
    spec = OmegaConf.to_container(OmegaConf.load(path))
    if spec.get("config", "paper") not in CONFIG_KINDS:
        sys.exit(f"[reproduce] {path}: config: {spec['config']!r} (choose from {', '.join(CONFIG_KINDS)})")
    for i, (rid, row) in enumerate(spec["rows"].items()):
        if row.get("family") not in FAMILIES:
            sys.exit(f"[reproduce] {path}: row {rid!r} has family {row.get('family')!r} (choose from {', '.join(FAMILIES)})")
        for key, (family, what) in STARTS.items():
            source = spec["rows"].get(row.get(key), {})
            if key in row and (row[key] not in list(spec["rows"])[:i]
                               or source.get("family") != (family or row["family"])
                               or (row.get("headline") and not source.get("headline"))):
                sys.exit(f"[reproduce] {path}: row {rid!r}: {key} {row[key]!r} must name an earlier {what}, "
                         "a headline row if this one is")
        for key in ("calibrate", "train"):
            if key in row and "linearize_from" not in row:
                sys.exit(f"[reproduce] {path}: row {rid!r}: {key} needs linearize_from (it concerns a linearized model)")
    unknown = set(rows.split(",")) - set(spec["rows"]) if rows else set()
    if unknown:
        sys.exit(f"[reproduce] --rows: unknown row(s) {', '.join(sorted(unknown))} "
                 f"(the {grid} grid has {', '.join(spec['rows'])})")
    spec["grid"] = grid
    return spec


def ablation_runs(spec: dict, only, seeds=None):
    """(row id, row, seed): every row with the grid's first seed, then the headline
    rows with its others; `only` rows and `seeds` (None: all) of those."""
    rows = {rid: row for rid, row in spec["rows"].items() if not only or rid in only}
    for i, seed in enumerate(spec["seeds"]):
        if seeds and str(seed) not in seeds:
            continue
        for rid, row in rows.items():
            if i == 0 or row.get("headline"):
                yield rid, row, seed


def ablation_summary(runs, spec: dict, metric: str) -> list:
    """One row per ablation row: the metric's mean over seeds, each seed's value, and the spread."""
    out = []
    for rid, row in spec["rows"].items():
        mine = [r for r in runs if r["row"] == rid]
        if not mine:
            continue
        values = [float(r[metric]) for r in mine]
        mean = sum(values) / len(values)
        out.append({
            "row": rid, "family": row["family"], "setting": row.get("what", ""),
            metric: mean, "seeds": " / ".join(f"{v:.2f}" for v in values),
            "spread": max(values) - min(values) if len(values) > 1 else float("nan"),
            "valid loss": sum(float(r["valid loss"]) for r in mine) / len(mine),
            "updates": int(float(mine[0]["updates"])),
            "train min": sum(float(r["train min"]) for r in mine) / len(mine),
            "params": int(float(mine[0]["params"])),
        })
    return out


def ablations(args, spec: dict, ds: str, data: Path, work: Path) -> Path:
    """Train and score every (row, seed) of configs/<task>/ablations/<grid>.yaml on
    the validation set; results/<table>.md (one row per setting; <table> is
    named in the grid) and <table>.runs.csv (one line per run). A run already
    in .runs.csv with the same overrides is kept, not retrained (--fresh
    retrains the rows asked for; the others stay as recorded). A grid with
    `plot: true` also draws the metric against updates, one line per `curve`,
    as docs/<table>.png."""
    metric = VALID_METRIC[args.task][0]
    stem = args.results / (spec.get("table", f"ablations-{args.task}") + ("-smoke" if args.scale == "smoke" else ""))
    runs = read_csv(Path(f"{stem}.runs.csv"))  # rows not retrained now stay in the table
    todo = plan_runs(args, spec, ds, runs, stem)
    grid_runs = work / "runs" / spec["grid"]  # one folder per grid: rows of different grids may share ids
    say(f"{len(todo)} runs to train; logs under {grid_runs}")
    progress = Progress(len(todo))
    for n, (rid, row, seed, model, overrides, key, settings) in enumerate(todo, 1):
        say(f"{progress.step(n)} {rid}, seed {seed}")
        runs = [r for r in runs if not (r["row"] == rid and r["seed"] == str(seed))]
        scores, record = train_and_score(args, ds, data, grid_runs, rid, row, seed, model, overrides, runs)
        runs.append({"row": rid, "seed": str(seed), "family": row["family"], "overrides": key, "settings": settings,
                     **record, **scores, "recipe": publishing.recipe_cell(args.departures)})
        say(f"{rid}, seed {seed}: {metric} {scores[metric]:.2f}")
        write_ablations(runs, spec, metric, stem, args, ds, trained=True)
    if spec.get("plot"):
        plot_curves(runs, spec, args.task, publishing.plot_path(args, stem))
    return write_ablations(runs, spec, metric, stem, args, ds, trained=bool(todo))


def plan_runs(args, spec: dict, ds: str, runs: list, stem: Path) -> list:
    """(row id, row, seed, model config, overrides, key, settings digest) of each run
    to train: those asked for and not recorded in `runs` with the same settings
    (all of them with --fresh). Stops before anything runs if one would replace
    a recipe run with other settings."""
    only = set(args.rows.split(",")) if args.rows else None
    todo = []
    for rid, row, seed in ablation_runs(spec, only, args.seeds.split(",") if args.seeds else None):
        model, overrides, key, settings = run_settings(args.task, args.scale, ds, spec, row, seed)
        if not args.fresh and any(r["row"] == rid and r["seed"] == str(seed) and r["overrides"] == key
                                  and r.get("settings") in (None, "", settings) for r in runs):
            say(f"{rid}, seed {seed}: in {stem.name}.runs.csv; kept")
        else:
            todo.append((rid, row, seed, model, overrides, key, settings))
    publishing.guard_recipe_rows(runs, {(rid, str(seed)) for rid, _, seed, *_ in todo}, args.departures,
                                 Path(f"{stem}.runs.csv"), "runs (row, seed)", key=lambda r: (r["row"], r["seed"]))
    return todo


def run_settings(task: str, scale: str, ds: str, spec: dict, row: dict, seed: int):
    """(model config, overrides, key, settings digest) of one run of a grid row:
    the key (overrides and starting point) and digest (config values and
    overrides) that its record in <table>.runs.csv carries."""
    budget = smoke_budget(task, row) if scale == "smoke" else list(row.get("budget", spec["budget"]))
    overrides = [*budget, f"common.seed={seed}", *row.get("set", [])]
    if scale == "smoke":
        overrides += SMOKE_MODEL[task] + smoke_family(row["family"])
    key = " ".join(overrides + [f"{k}={row[k]}" for k in (*STARTS, "calibrate", "train") if k in row])
    model = row_config(task, ds, row["family"], spec)
    return model, overrides, key, settings_digest(task, ds, model, overrides)


def train_and_score(args, ds: str, data: Path, grid_runs: Path, rid: str, row: dict, seed: int, model: str,
                    overrides: list, runs: list):
    """One run of a grid row: trained from its starting point (or scored as it is,
    `train: false`), then scored on the validation set. Returns (scores, what
    the runs table records of the training)."""
    ckpt = grid_runs / f"{rid}-s{seed}"  # train() retrains it if its settings changed
    start = starting_point(args.task, model, row, grid_runs, seed, ckpt, overrides)
    if row.get("train", True):
        trained = train(args.task, ds, row["family"], model, data, ckpt, args, extra=[*overrides, *start])
        best = best_checkpoint(row, grid_runs, seed, ckpt)
    else:  # the starting point as it is: a linearized model before fine-tuning
        best = Path(start[0].split("=", 1)[1])
        trained = untrained(args.task, best, data, ckpt)
    scores = evaluate(args.task, ds, rid, data, best, args, subset="valid")
    earlier = sum(float(r["train min"]) for r in runs if r["row"] == row.get("resume_from") and r["seed"] == str(seed))
    return scores, {"updates": trained["updates"], "train min": earlier + trained["train_seconds"] / 60,
                    "valid loss": trained["valid_loss"], "params": trained["params"]}

def starting_point(task: str, model: str, row: dict, runs: Path, seed: int, ckpt: Path, overrides) -> list:
    """The hydra overrides that start a grid row from another row's model (none:
    from scratch). `linearize_from: <row>` converts that (softmax) row's best
    checkpoint into this row's model and fine-tunes it (`calibrate: N`: after
    fitting the new attention parameters on N training batches, linearize
    --calibrate; `train: false`: scored as converted, without fine-tuning);
    `finetune_from: <row>`
    fine-tunes that row's last checkpoint as it is (a second stage, e.g. after
    attention-only training: fresh optimizer and schedule); `resume_from: <row>`
    continues that row's run where it stopped (optimizer, schedule, data order
    and update count restored), so a longer budget costs only the extra updates."""
    if "linearize_from" in row:
        source = runs / f"{row['linearize_from']}-s{seed}"
        out = linearized(task, model, source, ckpt, overrides, row.get("calibrate", 0))
        return [f"checkpoint.finetune_from_model={out}"]
    for key, option in (("finetune_from", "finetune_from_model"), ("resume_from", "continue_once")):
        if key in row:
            last = runs / f"{row[key]}-s{seed}" / "checkpoint_last.pt"
            if not last.is_file():
                sys.exit(f"[reproduce] {last.parent.name} is not trained yet: run its row first (--rows)")
            return [f"checkpoint.{option}={last}"]
    return []


def best_checkpoint(row: dict, runs: Path, seed: int, ckpt: Path) -> Path:
    """The run's best checkpoint by validation loss. A resumed run writes one only
    when it beats the best of the run it continues, which is then the best."""
    best = ckpt / "checkpoint_best.pt"
    if "resume_from" in row and not best.is_file():
        return runs / f"{row['resume_from']}-s{seed}" / "checkpoint_best.pt"
    return best


def smoke_budget(task: str, row: dict) -> list:
    """The smoke-scale budget of a grid row: SMOKE's, twice its updates for a row
    that resumes another (so it trains past its source)."""
    if "resume_from" not in row:
        return SMOKE[task]
    updates = next(int(o.split("=")[1]) for o in SMOKE[task] if o.startswith("optimization.max_update="))
    return [*SMOKE[task], f"optimization.max_update={2 * updates}"]


def plot_curves(runs, spec: dict, task: str, path: Path) -> None:
    """The metric against training updates, one line per row `curve` (mean over seeds)."""
    plt = pyplot()

    metric, label = VALID_METRIC[task]
    summaries = {summary["row"]: summary for summary in ablation_summary(runs, spec, metric)}
    curves = {}
    for rid, summary in summaries.items():
        row = spec["rows"][rid]
        first = summaries.get(row.get("finetune_from"), {"updates": 0})  # a second stage counts the first's updates
        curves.setdefault(row.get("curve", rid), []).append((summary["updates"] + first["updates"], summary[metric]))
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, points in curves.items():
        xs, ys = zip(*sorted(points))
        ax.plot(xs, ys, marker="o", label=name)
    ax.set_xlabel("training updates")
    ax.set_ylabel(label)
    save_plot(plt, fig, ax, path)


def grid_command(task: str) -> str:
    """The command that reproduces the whole table (runs already recorded are kept,
    so after partial runs the table is the whole grid's), and this run's where it
    ran part of the grid (--rows, --seeds, --fresh)."""
    args, whole = iter(sys.argv[2:]), ["bash scripts/reproduce_" + task + ".sh"]
    for arg in args:
        name = arg.split("=")[0]
        if name in ("--rows", "--seeds") and "=" not in arg:
            next(args, None)  # its value
        elif name not in ("--rows", "--seeds", "--fresh"):
            whole.append(arg)
    this = command_line(task)
    return f"`{' '.join(whole)}`" + ("" if this == " ".join(whole) else f" (this run: `{this}`)")


def config_words(task: str, ds: str, kind: str) -> str:
    """How a grid's header names the model config its rows start from."""
    what = {"recommended": "recommended model config", "paper": "paper model config",
            "nolocal": "recommended model config without local precision"}[kind]
    files = [f"{ds}_<family>{CONFIG_KINDS[k]}.yaml" for k in reversed(GRID_FALLBACK[kind])]
    if len(files) == 1:
        return what
    return f"{what} (configs/{task}/model/{files[0]} where it exists, else " + ", else ".join(files[1:]) + ")"


def run_line(stem: Path, trained: bool) -> str:
    """The header's "Run <date, machine>": this call's where it trained runs; a
    call that trained none (all recorded) keeps the line of the table it
    rewrites, the machine its runs were trained on."""
    table = Path(f"{stem}.md")
    if not trained and table.is_file():
        kept = re.search(r"^(Run .*?)\. Every row", table.read_text(), re.M)
        if kept:
            return kept.group(1)
    return f"Run {machine()}"


def write_ablations(runs, spec, metric: str, stem: Path, args, ds: str, trained: bool) -> Path:
    run_columns = ["row", "seed", "family", "updates", "train min", "valid loss", metric, "params", "overrides",
                   "settings", "recipe"]
    write_table(Path(f"{stem}.runs"), run_columns, runs, header=None)
    label = VALID_METRIC[args.task][1]
    columns = ["row", "family", "setting", metric, "seeds", "spread", "valid loss", "updates", "train min", "params"]
    header = [
        f"# {spec.get('title', 'Ablations')}, {args.task} ({ds}, {args.scale} scale)",
        "",
        f"Command: {grid_command(args.task)}  ",
        f"{run_line(stem, trained)}. Every row trains with configs/{args.task}/{ds}.yaml and the family's "
        + config_words(args.task, ds, spec.get("config", "paper"))
        + f", cut to the budget `{' '.join(spec['budget']) or 'none: the full recipe'}` unless the row "
        f"sets its own, plus the row's overrides "
        f"(configs/{args.task}/ablations/{spec['grid']}.yaml); {metric} is the {label} of the best checkpoint "
        f"(mean over the seeds listed; spread = max - min). Per-run values, overrides included: "
        f"{stem.name}.runs.csv.  ",
        publishing.header_line(args.departures),
        "",
    ]
    return write_table(stem, columns, ablation_summary(runs, spec, metric), header)
