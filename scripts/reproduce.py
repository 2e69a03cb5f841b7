#!/usr/bin/env python
"""Reproduce a results table: every family trained with the same task config,
decoded, scored and timed, one row per family and model config: the
recommended one (configs/<task>/model/<dataset>_<family>.yaml) and, where the
family's paper sets it up otherwise, the paper's (<dataset>_<family>_paper.yaml).

  python scripts/reproduce.py {mt,sum,lm} --scale {cpu,paper,smoke} \
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
"""
import argparse
import csv
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]
from linear_fairseq import families, scoring  # noqa: E402
from linear_fairseq.progress import Progress  # noqa: E402
import publishing  # noqa: E402

FAMILIES = families.names()  # the softmax baseline, then every registered family
SP = ["--post-process", "sentencepiece"]

# Per dataset: its data-prep script, task, decoding flags, metric, and the
# config/model file names under configs/<task>/.
DATASETS = {
    "multi30k": dict(task="mt", prep="multi30k.py", refs="raw/{subset}.en", metric="bleu",
                     decode=["--beam", "4", "--lenpen", "1.0", "--max-len-a", "1.2", "--max-len-b", "10", *SP],
                     smoke_prep=["--limit", "3000", "--eval-limit", "60", "--vocab", "1000"]),
    "iwslt14": dict(task="mt", prep="iwslt14.py", refs="raw/{subset}.en", metric="bleu",
                    decode=["--beam", "5", "--lenpen", "1.0", "--max-len-a", "1.2", "--max-len-b", "10", *SP]),
    "wmt16": dict(task="mt", prep="wmt16_en_de.py", refs="raw/{subset}.de", metric="bleu",
                  decode=["--beam", "4", "--lenpen", "0.6", "--max-len-a", "1.2", "--max-len-b", "10",
                          "--post-process", "subword_nmt"]),
    "news": dict(task="sum", prep="news.py", refs="raw/{subset}.sum", metric="rouge",
                 decode=["--beam", "4", "--lenpen", "1.0", "--max-len-b", "80", "--no-repeat-ngram-size", "3", *SP],
                 smoke_prep=["--limit", "300", "--eval-limit", "20", "--vocab", "1000", "--max-source", "120"]),
    "cnn_dm": dict(task="sum", prep="cnn_dm.py", refs="raw/{subset}.sum", metric="rouge",
                   decode=["--beam", "4", "--lenpen", "2.0", "--min-len", "55", "--max-len-b", "140",
                           "--no-repeat-ngram-size", "3", *SP]),
    "austen": dict(task="lm", prep="austen.py", metric="ppl",
                   decode=["--tokens-per-sample", "256", "--context-window", "128"],
                   smoke_prep=["--limit", "400", "--eval-limit", "40", "--vocab", "1000"]),
    "wikitext103": dict(task="lm", prep="wikitext103.py", metric="ppl",
                        decode=["--tokens-per-sample", "512", "--context-window", "400", "--softmax-batch", "1024"]),
}
DEFAULT_DATASET = {("mt", "cpu"): "multi30k", ("mt", "paper"): "wmt16", ("sum", "cpu"): "news",
                   ("sum", "paper"): "cnn_dm", ("lm", "cpu"): "austen", ("lm", "paper"): "wikitext103"}

# Smoke scale: the cpu config with a tiny model and a few dozen updates.
SMOKE = {
    "mt": ["optimization.max_epoch=0", "optimization.max_update=16", "lr_scheduler.warmup_updates=8",
           "dataset.max_tokens=2048"],
    "lm": ["optimization.max_epoch=0", "optimization.max_update=30", "lr_scheduler.warmup_updates=10",
           "task.tokens_per_sample=128", "dataset.max_tokens=2048"],
}
SMOKE["sum"] = SMOKE["mt"]
SMOKE_MODEL = {
    "mt": ["model.encoder_layers=1", "model.decoder_layers=1", "model.encoder_embed_dim=32", "model.decoder_embed_dim=32"],
    "lm": ["model.decoder_layers=1", "model.decoder_embed_dim=32", "model.decoder_input_dim=32", "model.decoder_output_dim=32"],
}
SMOKE_MODEL["sum"] = SMOKE_MODEL["mt"]
SMOKE_FAMILY = {"flash": ["model.gau_s=16"]}
SMOKE_DECODE = {"lm": ["--tokens-per-sample", "128", "--context-window", "64"]}

# Published numbers for exactly these setups, with their source; n/a elsewhere.
PAPER = {
    ("wmt16", "transformer"): "28.4 (Vaswani et al. 2017, big, newstest2014, tokenized BLEU)",
}


def say(msg: str) -> None:
    print(f"[reproduce] {msg}", flush=True)


def one_cpu():
    """Pin the calling (child) process to one CPU, the last this process may use."""
    os.sched_setaffinity(0, {max(os.sched_getaffinity(0))})


# how a timed command (decoding, scoring) runs: one thread, pinned where the OS allows it
PINNED = hasattr(os, "sched_setaffinity")
TIMED_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
SPEED_CONDITIONS = ("one thread" + (" pinned to one CPU" if PINNED else " (this OS cannot pin it to a CPU)")
                    + ", no warm-up (the first batch counts); others: the CPUs that other processes kept busy "
                    "meanwhile, on average (near 0 on an idle machine; where it is not, the speeds are not comparable)")


def busy_cpu_seconds() -> float:
    """CPU time the whole machine has spent busy (Linux /proc/stat), NaN elsewhere."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return float("nan")
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle, iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def others_busy(fn):
    """fn()'s result and the CPUs other processes kept busy while it ran (its own
    and its children's CPU time taken out of the machine's)."""
    t0, busy0, own0 = time.time(), busy_cpu_seconds(), sum(os.times()[:4])
    result = fn()
    wall, own = time.time() - t0, sum(os.times()[:4]) - own0
    return result, max(0.0, (busy_cpu_seconds() - busy0 - own) / max(wall, 1e-9))


def run(cmd, log: Path, stream: bool, timed: bool = False):
    """Run a command; its output goes to `log` (and the console when `stream`);
    `timed`: as SPEED_CONDITIONS says. Returns (output, peak resident memory of
    the process in MB)."""
    with open(log, "w") as f:
        # fairseq's log line by line, not in blocks, with the whole configuration at its start
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "LINEAR_FAIRSEQ_LOG_CONFIG": "1", **(TIMED_ENV if timed else {})}
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1, env=env,
                                preexec_fn=one_cpu if timed and PINNED else None)
        for line in proc.stdout:
            f.write(line)
            f.flush()
            if stream:
                print(f"    {line}", end="", flush=True)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    out = log.read_text()
    if proc.returncode != 0:
        sys.exit(f"[reproduce] {Path(cmd[0]).name} failed (exit {proc.returncode}; log: {log}):\n{out[-3000:]}")
    return out, usage.ru_maxrss / 1024


def prepare(ds: str, args, work: Path) -> Path:
    spec = DATASETS[ds]
    data = work / "data"
    cmd = [sys.executable, str(ROOT / "data-prep" / spec["prep"]), "--out", str(data)]
    if args.raw is not None:
        cmd += ["--raw", str(args.raw)]
    if args.scale == "smoke":
        cmd += spec.get("smoke_prep", [])
    say(f"preparing {ds} -> {data}")
    if subprocess.run(cmd).returncode != 0:
        sys.exit(1)
    return data


CONFIG_KINDS = {"recommended": "", "paper": "_paper"}  # --configs: the model config file's suffix


def model_configs(task: str, ds: str, family: str, kinds=tuple(CONFIG_KINDS)) -> list:
    """(kind, model config name) for each of `kinds` the family has under
    configs/<task>/model/: every family has its recommended config; a paper
    config exists where the paper sets the family up otherwise."""
    names = [(kind, f"{ds}_{family}{CONFIG_KINDS[kind]}") for kind in kinds]
    return [(kind, name) for kind, name in names if (ROOT / "configs" / task / "model" / f"{name}.yaml").is_file()]


def model_files(task: str, model: str) -> list:
    """A model config's YAML file after the files it extends (`defaults`)."""
    from omegaconf import OmegaConf

    folder = ROOT / "configs" / task / "model"
    bases = OmegaConf.load(folder / f"{model}.yaml").get("defaults", [])
    return [*(folder / f"{base}.yaml" for base in bases), folder / f"{model}.yaml"]


def config_files(task: str, config: str, model: str) -> list:
    """The YAML files a run is composed from: the task config, then the model's."""
    return [ROOT / "configs" / task / f"{config}.yaml", *model_files(task, model)]


def settings_digest(task: str, config: str, model: str, overrides) -> str:
    """A digest of what a run trains with: its config files' contents (comments
    aside) and its overrides."""
    import hashlib

    from omegaconf import OmegaConf

    contents = [OmegaConf.to_container(OmegaConf.load(f)) for f in config_files(task, config, model)]
    return hashlib.sha256(json.dumps([contents, list(overrides)], sort_keys=True).encode()).hexdigest()[:12]


def train(task: str, ds: str, family: str, model: str, data: Path, ckpt: Path, args, extra=()) -> dict:
    """Train one model: the task config's recipe with model=`model` (one of the
    family's configs), then `extra` hydra overrides, then --set. A model already
    trained in `ckpt` is reused only if its config files and overrides are the
    same (settings.txt); otherwise it is trained again."""
    done = ckpt / "train.done"
    log = ckpt / "train.log"
    record = ckpt / "settings.txt"
    tail = []
    if args.scale == "smoke":
        tail += SMOKE[task] + SMOKE_MODEL[task] + SMOKE_FAMILY.get(family, [])
    if args.average:
        tail += [f"checkpoint.save_interval_updates={args.save_interval_updates}",
                 f"checkpoint.keep_interval_updates={args.average}"]
    if args.max_update:
        tail += ["optimization.max_epoch=0", f"optimization.max_update={args.max_update}"]
    tail += [*extra, *args.override]
    settings = settings_digest(task, args.config or ds, model, tail)
    if (record.read_text() != settings) if record.is_file() else done.is_file():
        say(f"{model}: {ckpt} holds a run with other settings (config files or overrides); starting again")
        for old in [done, *ckpt.glob("checkpoint*.pt")]:
            old.unlink(missing_ok=True)
    if done.is_file():
        say(f"{model}: already trained ({ckpt}); reusing")
        return {**scoring.read_train_log(log.read_text()), "train_seconds": float(done.read_text())}
    ckpt.mkdir(parents=True, exist_ok=True)
    cmd = ["fairseq-hydra-train", "--config-dir", str(ROOT / "configs" / task), "--config-name", args.config or ds,
           f"model={model}", f"task.data={data / 'bin'}", f"checkpoint.save_dir={ckpt}",
           f"common.user_dir={ROOT / 'linear_fairseq'}", f"hydra.run.dir={ckpt / 'hydra'}", *tail]
    record.write_text(settings)
    say(f"{model}: training (log: {log})")
    start = time.time()
    out, _ = run(cmd, log, stream=not args.quiet)
    seconds = time.time() - start
    done.write_text(f"{seconds:.1f}")
    return {**scoring.read_train_log(out), "train_seconds": seconds}


def choose_checkpoint(ckpt: Path, n: int) -> Path:
    if not n:
        return ckpt / "checkpoint_best.pt"
    from linear_fairseq.checkpoints import average_checkpoints

    paths = sorted(ckpt.glob("checkpoint_*_*.pt"), key=lambda p: int(p.stem.split("_")[-1]))[-n:]
    if not paths:
        sys.exit(f"[reproduce] --average {n}: no interval checkpoints in {ckpt}")
    say(f"averaging {', '.join(p.name for p in paths)}")
    return average_checkpoints(paths, ckpt / f"checkpoint_avg{len(paths)}.pt")


# every sentence of a split: fairseq otherwise drops a last batch smaller than 8 (fairseq #5036)
WHOLE_SET = ["--required-batch-size-multiple", "1"]


def evaluate(task: str, ds: str, name: str, data: Path, path: Path, args, subset: str = "test") -> dict:
    spec = DATASETS[ds]
    common = [str(data / "bin"), "--path", str(path), "--user-dir", str(ROOT / "linear_fairseq"),
              "--gen-subset", subset, "--num-workers", "0"]
    folder = path.parent
    suffix = "" if subset == "test" else f"-{subset}"
    if task == "lm":
        say(f"{name}: fairseq-eval-lm on the {subset} set")
        flags = SMOKE_DECODE["lm"] if args.scale == "smoke" else spec["decode"]
        log = folder / f"eval_lm{suffix}.log"
        (out, rss), others = others_busy(lambda: run(["fairseq-eval-lm", *common, "--max-tokens", "4096", *flags],
                                                     log, stream=False, timed=True))
        speed = scoring.read_eval_lm_speed(out)
        expected = split_tokens(data / "bin", subset)
        if speed["tokens"] < expected:  # eval-lm skips blocks longer than the model's positions
            sys.exit(f"[reproduce] fairseq-eval-lm scored {speed['tokens']} of the {expected} {subset} tokens "
                     f"(log: {log}); are its --tokens-per-sample within the model's?")
        return {"ppl": scoring.read_perplexity(out), "tok/s": speed["tokens_per_s"], "others": others, "peak MB": rss}
    say(f"{name}: fairseq-generate on the {subset} set")
    (out, rss), others = others_busy(lambda: run(
        ["fairseq-generate", *common, "--batch-size", str(args.batch_size), *WHOLE_SET, *spec["decode"]],
        folder / f"generate{suffix}.log", stream=False, timed=True))
    hyps = scoring.read_hypotheses(out)
    refs = scoring.read_references(data / spec["refs"].format(subset=subset))
    scores = scoring.bleu_chrf(hyps, refs) if spec["metric"] == "bleu" else scoring.rouge(hyps, refs)
    speed = scoring.read_generate_speed(out)
    return {**scores, "tok/s": speed["tokens_per_s"], "sent/s": speed["sentences_per_s"], "others": others,
            "peak MB": rss}


def split_tokens(data_bin: Path, subset: str) -> int:
    """Tokens (end-of-line symbols included) of a binarized split, read from the
    header and size table of fairseq's mmap index (<subset>.idx)."""
    import struct

    import numpy as np

    with open(data_bin / f"{subset}.idx", "rb") as f:
        if f.read(9) != b"MMIDIDX\x00\x00":
            sys.exit(f"[reproduce] {data_bin / f'{subset}.idx'} is not a fairseq mmap index")
        f.read(8 + 1)  # version, dtype code
        (n,) = struct.unpack("<Q", f.read(8))
        f.read(8)  # document count
        return int(np.frombuffer(f.read(4 * n), dtype=np.int32).sum())


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
        "settings; _paper: the family as its paper sets it up, where that differs).  ",
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
    from omegaconf import OmegaConf

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
    import math

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


# -- ablations: rows of settings, scored on the validation set ------------------------------
VALID_METRIC = {"mt": ("bleu", "valid BLEU"), "sum": ("rl", "valid ROUGE-L"), "lm": ("ppl", "valid ppl")}

# grid row keys naming the row whose model a row starts from: (that row's family, None: this row's; in words)
STARTS = {"linearize_from": ("transformer", "softmax (transformer) row"),
          "finetune_from": (None, "row of the same family"),
          "resume_from": (None, "row of the same family")}


def load_ablations(task: str, grid: str, rows=None) -> dict:
    """The grid configs/<task>/ablations/<grid>.yaml, checked (families, and the
    --rows asked for) before anything runs."""
    from omegaconf import OmegaConf

    path = ROOT / "configs" / task / "ablations" / f"{grid}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in path.parent.glob("*.yaml"))) or "none"
        sys.exit(f"[reproduce] --ablations {grid}: no such grid ({path} does not exist; {task} grids: {known})")
    spec = OmegaConf.to_container(OmegaConf.load(path))
    if spec.get("config", "paper") not in ("paper", "recommended"):
        sys.exit(f"[reproduce] {path}: config: {spec['config']!r} (choose paper or recommended)")
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


def ablation_runs(spec: dict, only):
    """(row id, row, seed): every row with the first seed, then the headline rows with the others."""
    seeds = spec["seeds"]
    rows = {rid: row for rid, row in spec["rows"].items() if not only or rid in only}
    for i, seed in enumerate(seeds):
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


def read_csv(path: Path) -> list:
    """The rows of a table's CSV (none if it does not exist yet)."""
    if not path.is_file():
        return []
    with open(path) as f:
        return list(csv.DictReader(f))


def ablations(args, spec: dict, ds: str, data: Path, work: Path) -> Path:
    """Train and score every (row, seed) of configs/<task>/ablations/<grid>.yaml on
    the validation set; results/<table>.md (one row per setting; <table> is
    named in the grid) and <table>.runs.csv (one line per run). A run already
    in .runs.csv with the same overrides is kept, not retrained (--fresh
    retrains the rows asked for; the others stay as recorded). A grid with `plot: true` also draws the metric against updates,
    one line per `curve`, as docs/<table>.png."""
    if args.seeds:
        spec["seeds"] = [seed for seed in spec["seeds"] if str(seed) in args.seeds.split(",")]
    metric = VALID_METRIC[args.task][0]
    table = spec.get("table", f"ablations-{args.task}")
    stem = args.results / (table + ("-smoke" if args.scale == "smoke" else ""))
    runs = read_csv(Path(f"{stem}.runs.csv"))  # rows not retrained now stay in the table
    only = set(args.rows.split(",")) if args.rows else None
    todo = []
    for rid, row, seed in ablation_runs(spec, only):
        budget = smoke_budget(args.task, row) if args.scale == "smoke" else list(row.get("budget", spec["budget"]))
        overrides = [*budget, f"common.seed={seed}", *row.get("set", [])]
        if args.scale == "smoke":
            overrides += SMOKE_MODEL[args.task] + SMOKE_FAMILY.get(row["family"], [])
        key = " ".join(overrides + [f"{k}={row[k]}" for k in (*STARTS, "calibrate", "train") if k in row])
        model = row_config(args.task, ds, row["family"], spec)
        settings = settings_digest(args.task, ds, model, overrides)
        if not args.fresh and any(r["row"] == rid and r["seed"] == str(seed) and r["overrides"] == key
                                  and r.get("settings") in (None, "", settings) for r in runs):
            say(f"{rid}, seed {seed}: in {stem.name}.runs.csv; kept")
        else:
            todo.append((rid, row, seed, model, overrides, key, settings))
    publishing.guard_recipe_rows(runs, {(rid, str(seed)) for rid, _, seed, *_ in todo}, args.departures,
                                 Path(f"{stem}.runs.csv"), "runs (row, seed)", key=lambda r: (r["row"], r["seed"]))
    grid_runs = work / "runs" / spec["grid"]  # one folder per grid: rows of different grids may share ids
    say(f"{len(todo)} runs to train; logs under {grid_runs}")
    progress = Progress(len(todo))
    for n, (rid, row, seed, model, overrides, key, settings) in enumerate(todo, 1):
        runs = [r for r in runs if not (r["row"] == rid and r["seed"] == str(seed))]
        say(f"{progress.step(n)} {rid}, seed {seed}")
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
        runs.append({"row": rid, "seed": str(seed), "family": row["family"], "overrides": key, "settings": settings,
                     "updates": trained["updates"], "train min": earlier + trained["train_seconds"] / 60,
                     "valid loss": trained["valid_loss"], "params": trained["params"], **scores,
                     "recipe": publishing.recipe_cell(args.departures)})
        say(f"{rid}, seed {seed}: {metric} {scores[metric]:.2f}")
        write_ablations(runs, spec, metric, stem, args, ds)
    if spec.get("plot"):
        plot_curves(runs, spec, args.task, publishing.plot_path(args, stem))
    return write_ablations(runs, spec, metric, stem, args, ds)


def untrained(task: str, path: Path, data: Path, ckpt: Path) -> dict:
    """What train() reports, for a checkpoint scored as it is: no updates, its
    validation loss (fairseq-validate) and parameter count (its weights, tied
    ones once, less fairseq's version counters)."""
    import torch

    fairseq_task = "language_modeling" if task == "lm" else "translation"
    out, _ = run(["fairseq-validate", str(data / "bin"), "--task", fairseq_task, "--path", str(path),
                  "--user-dir", str(ROOT / "linear_fairseq"),
                  "--valid-subset", "valid", "--max-tokens", "4096", "--num-workers", "0", *WHOLE_SET],
                 ckpt / "validate.log", stream=False)
    weights = torch.load(path, map_location="cpu", weights_only=False)["model"]
    tensors = {t.data_ptr(): t for name, t in weights.items() if not name.endswith(".version")}  # tied once
    params = sum(t.numel() for t in tensors.values())
    return {"updates": 0, "train_seconds": 0.0, "valid_loss": scoring.read_validate_loss(out), "params": params}


def model_values(task: str, model: str, overrides) -> list:
    """KEY=VALUE for every option of a model config (a file it extends through
    `defaults` first), then the model.* hydra overrides."""
    from omegaconf import OmegaConf

    merged = OmegaConf.merge(*(OmegaConf.load(f) for f in model_files(task, model)))
    values = {k: json.dumps(v) for k, v in OmegaConf.to_container(merged).items() if k not in ("_name", "defaults")}
    for override in overrides:
        key, _, value = override.lstrip("+").partition("=")
        if key.startswith("model."):
            values[key[len("model."):]] = value
    return [merged["_name"], [f"{k}={v}" for k, v in values.items()]]




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


def linearized(task: str, model: str, source: Path, ckpt: Path, overrides, calibrate: int) -> Path:
    """The best checkpoint of an earlier (softmax) row, converted by
    python -m linear_fairseq.linearize into this row's model (calibrated on
    `calibrate` training batches where > 0)."""
    if not (source / "checkpoint_best.pt").is_file():
        sys.exit(f"[reproduce] {source.name} is not trained yet: run its row first (--rows)")
    ckpt.mkdir(parents=True, exist_ok=True)
    out = ckpt / "linearized.pt"
    arch, values = model_values(task, model, overrides)
    run([sys.executable, "-m", "linear_fairseq.linearize", str(source / "checkpoint_best.pt"), str(out),
         "--arch", arch, *values, "--calibrate", str(calibrate)], ckpt / "linearize.log", stream=False)
    return out


def row_config(task: str, ds: str, family: str, spec: dict) -> str:
    """The model config a grid's rows start from: the family's paper config
    where it has one, else its recommended config (`config: paper`, the
    default), or the recommended config (`config: recommended`)."""
    kinds = ("recommended", "paper") if spec.get("config", "paper") == "paper" else ("recommended",)
    return model_configs(task, ds, family, kinds)[-1][1]


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


def write_ablations(runs, spec, metric: str, stem: Path, args, ds: str) -> Path:
    run_columns = ["row", "seed", "family", "updates", "train min", "valid loss", metric, "params", "overrides",
                   "settings", "recipe"]
    write_table(Path(f"{stem}.runs"), run_columns, runs, header=None)
    label = VALID_METRIC[args.task][1]
    columns = ["row", "family", "setting", metric, "seeds", "spread", "valid loss", "updates", "train min", "params"]
    header = [
        f"# {spec.get('title', 'Ablations')}, {args.task} ({ds}, {args.scale} scale)",
        "",
        f"Command: `{command_line(args.task)}`  ",
        f"Run {machine()}. Every row trains with configs/{args.task}/{ds}.yaml and the family's "
        + ("recommended model config" if spec.get("config") == "recommended" else "paper model config "
           f"(configs/{args.task}/model/{ds}_<family>_paper.yaml where it exists, else {ds}_<family>.yaml)")
        + f", cut to the budget `{' '.join(spec['budget']) or 'none: the full recipe'}` unless the row "
        f"sets its own, plus the row's overrides "
        f"(configs/{args.task}/ablations/{spec['grid']}.yaml); {metric} is the {label} of the best checkpoint "
        f"(mean over the seeds listed; spread = max - min). Per-run values, overrides included: "
        f"{stem.name}.runs.csv.  ",
        publishing.header_line(args.departures),
        "",
    ]
    return write_table(stem, columns, ablation_summary(runs, spec, metric), header)


def main(argv=None):
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
                    help="which of each family's model configs to run: recommended, paper (where the family "
                         "has one), or both (default)")
    ap.add_argument("--work", type=Path, help="data, checkpoints, logs (default work/reproduce/<task>-<scale>)")
    ap.add_argument("--results", type=Path, help="where the tables go (default <work>/results; results/ with --publish)")
    ap.add_argument("--publish", action="store_true",
                    help="update the committed tables in results/ (and plots in docs/); refused for a run that "
                         "would replace a recipe row with other settings")
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
    args = ap.parse_args(argv)
    args.config = None
    if args.demo:
        if args.task != "mt":
            ap.error("--demo is the translation quick start: bash scripts/demo_mt.sh")
        args.config = "multi30k_demo"
        args.families = "transformer,memsizer" if args.families == ",".join(FAMILIES) else args.families
        args.configs = "recommended"
        args.work = args.work or ROOT / "work" / "demo_mt"
    families = args.families.split(",")
    for family in families:
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
    kind = "ablations" if args.ablations is not None else "reproduce"
    work = (args.work or ROOT / "work" / kind / publishing.work_name(args.task, args.scale, args.departures)).resolve()
    args.results = publishing.results_folder(args) or work / "results"

    if args.ablations is not None:
        spec = load_ablations(args.task, args.ablations or ds, args.rows)  # bad grid or rows stop here, before data-prep
    todo = [(family, kind, model) for family in families
            for kind, model in model_configs(args.task, ds, family, args.configs.split(","))]
    if args.ablations is None:
        guard_table(args, ds, {model for _, _, model in todo})
    data = prepare(ds, args, work)
    if args.ablations is not None:
        table = ablations(args, spec, ds, data, work)
        say(f"table: {table}")
        print(table.read_text())
        return
    rows, by_position = [], {}
    block = block_tokens(args, ds) if args.by_position else None
    progress = Progress(len(todo))
    for n, (family, kind, model) in enumerate(todo, 1):
        say(f"{progress.step(n)} {model}")
        ckpt = work / "checkpoints" / (family + CONFIG_KINDS[kind].replace("_", "-"))
        trained = train(args.task, ds, family, model, data, ckpt, args)
        if args.by_position:
            by_position[model] = (family, position_losses(model, data, ckpt, block))
            continue
        scores = evaluate(args.task, ds, model, data, choose_checkpoint(ckpt, args.average), args)
        row = {"family": family, "config": model, "model": _model_name(args.task, ds, family),
               "params": trained["params"], "train min": trained["train_seconds"] / 60, **scores,
               "paper": PAPER.get((ds, family), "n/a"), "run": str(datetime.date.today()),
               "recipe": publishing.recipe_cell(args.departures)}
        say(f"{model}: " + ", ".join(f"{k} {v:.2f}" for k, v in scores.items()))
        rows.append(row)
    if args.by_position:
        table = write_positions(by_position, args, ds, block, positions_stem(args))
        say(f"table: {table}")
        print(table.read_text())
        return
    notes = extractive_note(ds, data) if args.task == "sum" else ()
    table = write_tables(rows, args.task, ds, args, notes)
    say(f"table: {table}")
    print(table.read_text())


def guard_table(args, ds: str, configs) -> None:
    """Before anything runs: a custom call may not replace the recipe rows of the
    table it writes (the results table's rows of `configs`; every row of the
    loss-by-position table, which a call writes whole)."""
    stem = positions_stem(args) if args.by_position else table_stem(args, ds)
    rows = read_csv(Path(f"{stem}.csv"))
    keys = {r["config"] for r in rows} if args.by_position else configs
    publishing.guard_recipe_rows(rows, keys, args.departures, Path(f"{stem}.csv"), "rows for")


def _model_name(task: str, ds: str, family: str) -> str:
    """The `_name` line of the family's model config."""
    for line in (ROOT / "configs" / task / "model" / f"{ds}_{family}.yaml").read_text().splitlines():
        if line.startswith("_name:"):
            return line.split(":", 1)[1].strip()
    return family


if __name__ == "__main__":
    main()
