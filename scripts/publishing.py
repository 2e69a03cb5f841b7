"""Where a reproduce run writes its tables, and how a run that is not the
recipe is marked.

A run writes its tables under its work folder (<work>/results) unless it is
given --publish, which updates the committed tables in results/ (plots in
docs/). A run whose settings differ from its recipe (smoke scale, the demo
config, --max-update, --set, --average, --batch-size, ...) is *custom*: its
rows say so in the `recipe` column, its table header says how it departs, its
default work folder is <task>-<scale>-custom (so it never retrains the
recipe's checkpoints), and it cannot replace a row the recipe wrote.
"""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMMITTED = ROOT / "results"
RECIPE = "yes"  # the `recipe` cell of a row trained exactly as the recipe says

# the options whose non-default values change what a run measures
MEASURED = {"max_update": "--max-update", "average": "--average", "save_interval_updates": "--save-interval-updates",
            "batch_size": "--batch-size", "override": "--set"}


def deviations(args, parser) -> list:
    """How this call departs from its recipe, one item per option (empty: the recipe)."""
    out = ["smoke scale"] if args.scale == "smoke" else []
    if args.config:
        out.append(f"configs/{args.task}/{args.config}.yaml")
    for dest, flag in MEASURED.items():
        value = getattr(args, dest)
        if value != parser.get_default(dest):
            out += [f"{flag} {v}" for v in (value if isinstance(value, list) else [value])]
    return out


def recipe_cell(departures) -> str:
    return "; ".join(departures) if departures else RECIPE


def header_line(departures) -> str:
    """The table header's line on how its rows were trained."""
    if not departures:
        return "Settings: the recipe (column `recipe`: yes for each row trained as the recipe says)."
    return (f"Settings: NOT the recipe ({recipe_cell(departures)}); the `recipe` column marks each row. "
            "Do not compare these rows with the recipe's.")


def results_folder(args) -> Path:
    """The folder this call's tables go to, checked: the committed results/
    only with --publish, and --publish only for a scale that makes numbers."""
    if args.publish and (args.scale == "smoke" or args.config):
        what = "smoke scale" if args.scale == "smoke" else f"configs/{args.task}/{args.config}.yaml"
        sys.exit(f"[reproduce] --publish: a {what} run is not a result; leave out --publish")
    if args.results is not None:
        folder = args.results.resolve()
        if not args.publish and folder.is_relative_to(COMMITTED):
            sys.exit(f"[reproduce] --results {args.results}: the committed tables change only with --publish")
        return folder
    return COMMITTED if args.publish else None  # None: under the work folder


def work_name(task: str, scale: str, departures) -> str:
    """The default work folder's name: a custom run gets its own, so it never
    retrains the models of the recipe's run."""
    return f"{task}-{scale}" + ("-custom" if departures and scale != "smoke" else "")


def plot_path(args, stem: Path) -> Path:
    """A table's figure: docs/<name>.png for a published table, else beside the table."""
    return ROOT / "docs" / f"{stem.name}.png" if args.publish else Path(f"{stem}.png")


def guard_recipe_rows(rows, keys, departures, table: Path, what: str, key=lambda r: r["config"]) -> None:
    """Stop before anything runs when a custom call would replace a recipe row of
    `table`: rows (the table's CSV records) whose key (a function of a record)
    is among `keys` and whose `recipe` cell is yes (or empty: rows written before
    the column existed were all recipe runs)."""
    if not departures:
        return
    taken = sorted({key(r) for r in rows if key(r) in keys and r.get("recipe", "") in ("", RECIPE)})
    if taken:
        sys.exit(f"[reproduce] {table} holds the recipe's {what} {', '.join(map(str, taken))}; a run with "
                 f"{recipe_cell(departures)} cannot replace it: give it another --results folder")
