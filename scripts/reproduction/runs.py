"""Running the pipeline's commands: data-prep, fairseq-hydra-train,
fairseq-generate / -eval-lm / -validate and linearize, each logged; the
decoding and scoring commands timed under stated conditions."""
import os
import subprocess
import sys
import time
from pathlib import Path

import averaging
import scoring
from .datasets import DATASETS, ROOT, SMOKE, SMOKE_DECODE, SMOKE_MODEL, model_values, settings_digest, smoke_family


def say(msg: str) -> None:
    print(f"[reproduce] {msg}", flush=True)


def one_cpu():
    """Pin the calling (child) process to one CPU: the one it runs on (where the
    OS says, and it may use it), else the last it may use. Two pipelines running
    side by side so tend to time their commands on different CPUs."""
    allowed = os.sched_getaffinity(0)
    here = current_cpu()
    os.sched_setaffinity(0, {here if here in allowed else max(allowed)})


def current_cpu() -> int:
    """The CPU this process last ran on (Linux /proc/self/stat, field 39); -1 elsewhere."""
    try:
        return int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[36])
    except (OSError, IndexError, ValueError):
        return -1


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


def command_name(cmd) -> str:
    return "fairseq-hydra-train" if cmd[:len(HYDRA_TRAIN)] == HYDRA_TRAIN else Path(cmd[0]).name


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
        sys.exit(f"[reproduce] {command_name(cmd)} failed (exit {proc.returncode}; log: {log}):\n{out[-3000:]}")
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


# fairseq-hydra-train, quiet from its start: hydra composes the configuration (and warns) before
# fairseq imports the plugin, so the known warnings are filtered first (linear_fairseq/quiet.py)
HYDRA_TRAIN = [sys.executable, "-c", "import sys; sys.argv[0] = 'fairseq-hydra-train'; "
               f"sys.path.insert(0, {str(ROOT)!r}); from linear_fairseq.quiet import quiet_fairseq; quiet_fairseq(); "
               "from fairseq_cli.hydra_train import cli_main; cli_main()"]


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
        tail += SMOKE[task] + SMOKE_MODEL[task] + smoke_family(family)
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
    cmd = [*HYDRA_TRAIN, "--config-dir", str(ROOT / "configs" / task), "--config-name", args.config or ds,
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
    paths = sorted(ckpt.glob("checkpoint_*_*.pt"), key=lambda p: int(p.stem.split("_")[-1]))[-n:]
    if not paths:
        sys.exit(f"[reproduce] --average {n}: no interval checkpoints in {ckpt}")
    say(f"averaging {', '.join(p.name for p in paths)}")
    return averaging.average_checkpoints(paths, ckpt / f"checkpoint_avg{len(paths)}.pt")


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
