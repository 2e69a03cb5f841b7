"""Loss by position: where a perplexity gap comes from (--by-position)."""
import json
import math
import sys
from pathlib import Path

from omegaconf import OmegaConf

import publishing
from linear_fairseq import families
from .datasets import ROOT, SMOKE
from .runs import run, say
from .tables import command_line, machine, pyplot, save_plot, write_table


# -- loss by position: where a perplexity gap comes from -----------------------------------
# table columns, positions 1-based and inclusive (None: to the last); a language model's are
# positions in its training block, a translation model's are target positions
SPANS = {"lm": ((1, 1), (2, 8), (9, 32), (33, 128), (129, 256)),
         "translation": ((1, 1), (2, 2), (3, 4), (5, 8), (9, 16), (17, None))}
HOW_SCORED = {
    "lm": "The valid set cut into consecutive {block}-token blocks, each scored from its first token "
          "(scripts/positions.py; the same blocks as `fairseq-eval-lm --tokens-per-sample {block} --context-window 0`); "
          "ppl a-b: the perplexity of the tokens at positions a to b of a block, predicted from the tokens before "
          "them in the block",
    "translation": "Every valid target scored teacher-forced, as fairseq-validate scores it (scripts/positions.py); "
                   "ppl a-b: the perplexity of the target tokens at positions a to b (the last of each target is "
                   "end-of-sentence), predicted from the source and the target tokens before them",
}


def block_tokens(args, ds: str):
    """The tokens per block an LM trains on (task.tokens_per_sample, as --set or smoke
    scale may change it); None for translation models, scored by target position."""

    if args.task != "lm":
        return None
    value = OmegaConf.load(ROOT / "configs" / "lm" / f"{args.config or ds}.yaml").task.tokens_per_sample
    for item in (SMOKE["lm"] if args.scale == "smoke" else []) + args.override:
        if item.startswith("task.tokens_per_sample="):
            value = item.split("=", 1)[1]
    return int(value)


def position_losses(model: str, data: Path, ckpt: Path, block) -> dict:
    """Mean validation NLL at each position (scripts/positions.py): of a block for an
    LM (`block` tokens), of the target for a translation model (block None)."""
    out = ckpt / "positions-valid.json"
    say(f"{model}: loss by position on the valid set" + (f" ({block}-token blocks)" if block else " (target positions)"))
    run([sys.executable, str(ROOT / "scripts" / "positions.py"), str(ckpt / "checkpoint_best.pt"),
         str(data / "bin"), "--subset", "valid", "--out", str(out)] + (["--block", str(block)] if block else []),
        ckpt / "positions-valid.log", stream=False)
    return json.loads(out.read_text())


def span_ppl(losses: dict, first: int, last: int) -> float:
    """Perplexity over the tokens at positions first..last (1-based)."""

    nll, count = losses["nll"][first - 1 : last], losses["count"][first - 1 : last]
    return math.exp(sum(n * c for n, c in zip(nll, count)) / sum(count))


def positions_stem(args) -> Path:
    return args.results / f"positions-{args.task}-{args.scale}"


def write_positions(results: dict, args, ds: str, block, stem: Path) -> Path:
    """results: config -> (family, losses). A table of perplexity per span of
    positions (against the softmax row where there is one) and a plot."""
    kind = "lm" if args.task == "lm" else "translation"
    length = max(len(losses["nll"]) for _, losses in results.values())
    spans = [(a, min(b or length, length)) for a, b in SPANS[kind] if a <= length]
    labels = [f"{a}" if a == b else f"{a}-{b}" for a, b in spans]
    names = [f"ppl {label}" for label in labels]
    base = next((losses for family, losses in results.values() if family == families.BASELINE.name), None)
    rows = []
    for config, (family, losses) in results.items():
        row = {"family": family, "config": config, f"ppl 1-{length}": span_ppl(losses, 1, length),
               "recipe": publishing.recipe_cell(args.departures)}
        for name, (a, b) in zip(names, spans):
            row[name] = span_ppl(losses, a, b)
            if base is not None and base is not losses:
                row[f"{name} vs softmax"] = f"{100 * (row[name] / span_ppl(base, a, b) - 1):+.1f}%"
        rows.append(row)
    count = next(iter(results.values()))[1]["count"]
    counts = ", ".join(f"{label}: {sum(count[a - 1 : b])}" for label, (a, b) in zip(labels, spans))
    columns = ["family", "config", f"ppl 1-{length}"] + [c for n in names for c in (n, f"{n} vs softmax")] + ["recipe"]
    header = [f"# Loss by position, {args.task} ({ds}, {args.scale} scale, valid set)", "",
              f"Command: `{command_line(args.task)}`  ",
              f"Run {machine()}. {HOW_SCORED[kind].format(block=block)}; the models of the results table "
              f"(checkpoint_best.pt of each config). Tokens per span: {counts}.  ",
              publishing.header_line(args.departures), ""]
    table = write_table(stem, columns, rows, header)
    plot_positions(results, base, length, kind, publishing.plot_path(args, stem))
    return table


def plot_positions(results: dict, base, length: int, kind: str, path: Path) -> None:
    """Perplexity against position, over windows that double (1, 2, 3-4, 5-8, ...), relative
    to softmax where it ran."""
    plt = pyplot()

    windows = [(1, 1)] + [(2**i + 1, min(2 ** (i + 1), length)) for i in range(length.bit_length()) if 2**i < length]
    fig, ax = plt.subplots(figsize=(6, 4))
    for config, (family, losses) in results.items():
        ys = [span_ppl(losses, a, b) / (span_ppl(base, a, b) if base is not None else 1.0) for a, b in windows]
        ax.plot([(a * b) ** 0.5 for a, b in windows], ys, marker="o", label=config)
    ax.set_xscale("log", base=2)
    where = "in the block" if kind == "lm" else "in the target"
    ax.set_xlabel(f"position {where} (windows 1, 2, 3-4, 5-8, ...)")
    ax.set_ylabel("valid ppl / softmax's" if base is not None else "valid ppl")
    save_plot(plt, fig, ax, path)
