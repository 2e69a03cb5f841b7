#!/usr/bin/env python
"""Reproduce a results table: every family trained with the same task config,
decoded, scored and timed, one row per family.

  python scripts/reproduce.py {mt,sum,lm} --scale {cpu,paper,smoke} \
      [--families transformer,memsizer,performer,flash] [--raw DIR] [--dataset NAME]

Stages per family (a line each; fairseq's own log streams underneath):
  prepare data (data-prep/<dataset>.py, once) -> train (fairseq-hydra-train with
  configs/<task>/<dataset>.yaml and model=<dataset>_<family>) -> choose the
  checkpoint (best on valid; --average N averages the last N) -> generate
  (fairseq-generate, test set) or evaluate (fairseq-eval-lm) -> score (sacrebleu
  BLEU/chrF, rouge-score R1/R2/RL with stemming, perplexity) -> decoding speed
  and peak memory (resident set size of the decoding process).
Writes <results>/<task>-<scale>.md and .csv. Re-running reuses finished steps
(a trained model is not retrained; delete its folder under --work to redo it).

--scale smoke is the cpu setup on a slice of the data with a tiny model and a
few dozen updates: for tests, not for numbers.
"""
import argparse
import csv
import datetime
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from linear_fairseq import scoring  # noqa: E402

FAMILIES = ("transformer", "memsizer", "performer", "flash")
SP = ["--post-process", "sentencepiece"]

# Per dataset: its data-prep script, task, decoding flags, metric, and the
# config/model file names under configs/<task>/.
DATASETS = {
    "multi30k": dict(task="mt", prep="multi30k.py", refs="raw/test.en", metric="bleu",
                     decode=["--beam", "4", "--lenpen", "1.0", "--max-len-a", "1.2", "--max-len-b", "10", *SP],
                     smoke_prep=["--limit", "3000", "--eval-limit", "60", "--vocab", "1000"]),
    "iwslt14": dict(task="mt", prep="iwslt14.py", refs="raw/test.en", metric="bleu",
                    decode=["--beam", "5", "--lenpen", "1.0", "--max-len-a", "1.2", "--max-len-b", "10", *SP]),
    "wmt16": dict(task="mt", prep="wmt16_en_de.py", refs="raw/test.de", metric="bleu",
                  decode=["--beam", "4", "--lenpen", "0.6", "--max-len-a", "1.2", "--max-len-b", "10",
                          "--post-process", "subword_nmt"]),
    "news": dict(task="sum", prep="news.py", refs="raw/test.sum", metric="rouge",
                 decode=["--beam", "4", "--lenpen", "1.0", "--max-len-b", "80", "--no-repeat-ngram-size", "3", *SP],
                 smoke_prep=["--limit", "300", "--eval-limit", "20", "--vocab", "1000", "--max-source", "120"]),
    "cnn_dm": dict(task="sum", prep="cnn_dm.py", refs="raw/test.sum", metric="rouge",
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


def run(cmd, log: Path, stream: bool):
    """Run a command; its output goes to `log` (and the console when `stream`).
    Returns (output, peak resident memory of the process in MB)."""
    with open(log, "w") as f:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}  # fairseq's log line by line, not in blocks
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1, env=env)
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


def train(task: str, ds: str, family: str, data: Path, ckpt: Path, args) -> dict:
    done = ckpt / "train.done"
    log = ckpt / "train.log"
    if done.is_file():
        say(f"{family}: already trained ({ckpt}); reusing")
        return {**scoring.read_train_log(log.read_text()), "train_seconds": float(done.read_text())}
    ckpt.mkdir(parents=True, exist_ok=True)
    cmd = ["fairseq-hydra-train", "--config-dir", str(ROOT / "configs" / task), "--config-name", ds,
           f"model={ds}_{family}", f"task.data={data / 'bin'}", f"checkpoint.save_dir={ckpt}",
           f"common.user_dir={ROOT / 'linear_fairseq'}", f"hydra.run.dir={ckpt / 'hydra'}"]
    if args.scale == "smoke":
        cmd += SMOKE[task] + SMOKE_MODEL[task] + SMOKE_FAMILY.get(family, [])
    if args.average:
        cmd += [f"checkpoint.save_interval_updates={args.save_interval_updates}",
                f"checkpoint.keep_interval_updates={args.average}"]
    if args.max_update:
        cmd += ["optimization.max_epoch=0", f"optimization.max_update={args.max_update}"]
    cmd += args.override
    say(f"{family}: training (log: {log})")
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


def evaluate(task: str, ds: str, family: str, data: Path, path: Path, args) -> dict:
    spec = DATASETS[ds]
    common = [str(data / "bin"), "--path", str(path), "--user-dir", str(ROOT / "linear_fairseq"),
              "--gen-subset", "test", "--num-workers", "0"]
    folder = path.parent
    if task == "lm":
        say(f"{family}: fairseq-eval-lm on the test set")
        flags = SMOKE_DECODE["lm"] if args.scale == "smoke" else spec["decode"]
        out, rss = run(["fairseq-eval-lm", *common, "--max-tokens", "4096", *flags],
                       folder / "eval_lm.log", stream=False)
        speed = scoring.read_eval_lm_speed(out)
        expected = test_tokens(data / "bin")
        if speed["tokens"] < expected:  # eval-lm skips blocks longer than the model's positions
            sys.exit(f"[reproduce] fairseq-eval-lm scored {speed['tokens']} of the {expected} test tokens "
                     f"(log: {folder / 'eval_lm.log'}); are its --tokens-per-sample within the model's?")
        return {"ppl": scoring.read_perplexity(out), "tok/s": speed["tokens_per_s"], "peak MB": rss}
    say(f"{family}: fairseq-generate on the test set")
    out, rss = run(["fairseq-generate", *common, "--batch-size", str(args.batch_size),
                    # without this fairseq drops the last partial batch (fairseq #5036)
                    "--required-batch-size-multiple", "1", *spec["decode"]],
                   folder / "generate.log", stream=False)
    hyps, refs = scoring.read_hypotheses(out), scoring.read_references(data / spec["refs"])
    scores = scoring.bleu_chrf(hyps, refs) if spec["metric"] == "bleu" else scoring.rouge(hyps, refs)
    speed = scoring.read_generate_speed(out)
    return {**scores, "tok/s": speed["tokens_per_s"], "sent/s": speed["sentences_per_s"], "peak MB": rss}


def test_tokens(data_bin: Path) -> int:
    """Tokens (end-of-line symbols included) of the binarized test split, read
    from the header and size table of fairseq's mmap index (test.idx)."""
    import struct

    import numpy as np

    with open(data_bin / "test.idx", "rb") as f:
        if f.read(9) != b"MMIDIDX\x00\x00":
            sys.exit(f"[reproduce] {data_bin / 'test.idx'} is not a fairseq mmap index")
        f.read(8 + 1)  # version, dtype code
        (n,) = struct.unpack("<Q", f.read(8))
        f.read(8)  # document count
        return int(np.frombuffer(f.read(4 * n), dtype=np.int32).sum())


METRICS = {"bleu": ["bleu", "chrf"], "rouge": ["r1", "r2", "rl"], "ppl": ["ppl"]}


def write_tables(rows, task, ds, args, results: Path) -> Path:
    metrics = METRICS[DATASETS[ds]["metric"]]
    speed = ["tok/s"] if task == "lm" else ["tok/s", "sent/s"]
    columns = ["family", "model", "params", "train min", *metrics, *speed, "peak MB", "paper"]
    results.mkdir(parents=True, exist_ok=True)
    stem = results / f"{task}-{args.scale}"
    with open(stem.with_suffix(".csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(columns)
        for r in rows:
            w.writerow([r.get(c, "") for c in columns])

    def cell(r, c):
        v = r.get(c, "")
        if isinstance(v, float):
            return "–" if v != v else (f"{v:,.0f}" if c in ("tok/s", "peak MB") else f"{v:.2f}")
        return f"{v:,}" if isinstance(v, int) else str(v)

    import torch

    header = [
        f"# {task} at {args.scale} scale: {ds}",
        "",
        f"Command: `{' '.join(['bash scripts/reproduce_' + task + '.sh', *sys.argv[2:]])}`  ",
        f"Run {datetime.date.today()} on {platform.machine()} with {os.cpu_count()} CPUs, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads. Decoding: "
        f"`{' '.join(DATASETS[ds]['decode'])}`" + ("" if task == "lm" else f", batch {args.batch_size}")
        + "; tok/s (" + ("fairseq-eval-lm scoring" if task == "lm" else "fairseq-generate decoding")
        + ") and peak MB (resident memory of that whole process) come from that run.",
        "",
        "| " + " | ".join(columns) + " |",
        "| " + " | ".join("---" for _ in columns) + " |",
    ]
    lines = header + ["| " + " | ".join(cell(r, c) for c in columns) + " |" for r in rows]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    return stem.with_suffix(".md")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("task", choices=("mt", "sum", "lm"))
    ap.add_argument("--scale", choices=("cpu", "paper", "smoke"), default="cpu")
    ap.add_argument("--families", default=",".join(FAMILIES), help=f"comma-separated, from {', '.join(FAMILIES)}")
    ap.add_argument("--dataset", help="default: multi30k/wmt16 (mt), news/cnn_dm (sum), austen/wikitext103 (lm); "
                                      "iwslt14 is the other paper-scale MT set")
    ap.add_argument("--raw", type=Path, help="raw data folder, passed to the data-prep script (offline use)")
    ap.add_argument("--work", type=Path, help="data, checkpoints, logs (default work/reproduce/<task>-<scale>)")
    ap.add_argument("--results", type=Path, default=ROOT / "results", help="where the tables go (default results/)")
    ap.add_argument("--average", type=int, help="average the last N interval checkpoints "
                                               "(default 5 at paper scale; otherwise the best checkpoint)")
    ap.add_argument("--save-interval-updates", type=int, default=1000, help="with --average (default 1000)")
    ap.add_argument("--max-update", type=int, help="train for N updates instead of the config's budget")
    ap.add_argument("--batch-size", type=int, default=64, help="decoding batch size (default 64)")
    ap.add_argument("--quiet", action="store_true", help="do not stream fairseq's training log")
    ap.add_argument("--set", dest="override", action="append", default=[], metavar="KEY=VALUE",
                    help="a hydra override for training, repeatable: --set optimization.lr=[0.001] "
                         "(+model.KEY=VALUE for a model option its config file does not list)")
    args = ap.parse_args(argv)
    families = args.families.split(",")
    for family in families:
        if family not in FAMILIES:
            ap.error(f"--families: unknown family {family!r} (choose from {', '.join(FAMILIES)})")
    ds = args.dataset or DEFAULT_DATASET[(args.task, "cpu" if args.scale == "smoke" else args.scale)]
    if ds not in DATASETS or DATASETS[ds]["task"] != args.task:
        ap.error(f"--dataset {ds!r} is not a {args.task} dataset")
    if args.average is None:
        args.average = 5 if args.scale == "paper" else 0
    work = (args.work or ROOT / "work" / "reproduce" / f"{args.task}-{args.scale}").resolve()

    data = prepare(ds, args, work)
    rows = []
    for family in families:
        ckpt = work / "checkpoints" / family
        trained = train(args.task, ds, family, data, ckpt, args)
        scores = evaluate(args.task, ds, family, data, choose_checkpoint(ckpt, args.average), args)
        row = {"family": family, "model": _model_name(args.task, ds, family), "params": trained["params"],
               "train min": trained["train_seconds"] / 60, **scores, "paper": PAPER.get((ds, family), "n/a")}
        say(f"{family}: " + ", ".join(f"{k} {v:.2f}" for k, v in scores.items()))
        rows.append(row)
    table = write_tables(rows, args.task, ds, args, args.results.resolve())
    say(f"table: {table}")
    print(table.read_text())


def _model_name(task: str, ds: str, family: str) -> str:
    """The `_name` line of the family's model config."""
    for line in (ROOT / "configs" / task / "model" / f"{ds}_{family}.yaml").read_text().splitlines():
        if line.startswith("_name:"):
            return line.split(":", 1)[1].strip()
    return family


if __name__ == "__main__":
    main()
