"""A short fairseq-train per family through the stock CLI, on generated data:
does every family train (finite, falling loss) at the given precision, and
at how many words per second (fairseq's own `wps`)?

    python -m benchmarks.train_check [--precision fp16,amp] [--updates 60] [--families ...] [--out FILE.json]
                                     [--replace]

--precision: a comma-separated list; every family trains once in each, in
the order given. fp32; fp16 (fairseq's --fp16: weights and activations in
float16, a loss scaler); amp (fairseq's --amp: float32 weights under CUDA's
autocast, a loss scaler). fp16 and amp need CUDA.

The data is made here (a vocabulary of 1000 words, text with a repeating
pattern a model can learn) and binarized with fairseq-preprocess, so the check
needs no download and no data folder. Each family trains the benchmark LM
sizes (benchmarks/models.py) with its own recommended settings of the Austen
recipe's optimizer. Loss and speed are read from fairseq's log. The JSON is
written after each run, so a check stopped midway keeps the runs it finished.
"""
import argparse
import json
import random
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from linear_fairseq import families

from . import models

ROOT = Path(__file__).resolve().parents[1]
PRECISIONS = {"fp32": [], "fp16": ["--fp16"], "amp": ["--amp"]}  # fairseq-train's flags for each
LOSS = re.compile(r"\bloss=([\d.]+).*?\bwps=([\d.]+)")  # fairseq's progress lines (simple format)


def make_data(folder: Path, lines: int = 4000, seed: int = 0) -> Path:
    """Generated text: each line counts up from a random word in a 1000-word vocabulary."""
    rng = random.Random(seed)
    raw = folder / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", lines), ("valid", lines // 20)):
        text = []
        for _ in range(n):
            start = rng.randrange(1000)
            text.append(" ".join(f"w{(start + i) % 1000}" for i in range(rng.randrange(20, 60))))
        (raw / f"{split}.txt").write_text("\n".join(text) + "\n")
    bin_dir = folder / "bin"
    subprocess.run(["fairseq-preprocess", "--only-source", "--trainpref", str(raw / "train.txt"),
                    "--validpref", str(raw / "valid.txt"), "--destdir", str(bin_dir), "--workers", "1"],
                   check=True, capture_output=True)
    return bin_dir


def train(family: str, data: Path, save: Path, updates: int, precision: str) -> dict:
    arch, args = models.LM[family]
    cmd = ["fairseq-train", str(data), "--user-dir", str(ROOT / "linear_fairseq"), "--task", "language_modeling",
           "--arch", arch, *models.LM_BASE, *args, "--tokens-per-sample", "512", "--max-tokens", "8192",
           "--optimizer", "adam", "--lr", "2e-3", "--lr-scheduler", "inverse_sqrt", "--warmup-updates",
           str(max(1, updates // 4)), "--max-update", str(updates), "--log-format", "simple", "--log-interval",
           str(max(1, updates // 4)), "--save-dir", str(save), "--no-save", "--disable-validation",
           "--num-workers", "0", "--seed", "1", *PRECISIONS[precision]]
    r = subprocess.run(cmd, capture_output=True, text=True)
    found = LOSS.findall(r.stdout + r.stderr)
    if r.returncode != 0 or not found:
        return {"family": family, "arch": arch, "precision": precision, "ok": False,
                "error": (r.stdout + r.stderr)[-1500:]}
    losses = [float(loss) for loss, _ in found]
    return {"family": family, "arch": arch, "precision": precision, "ok": all(x == x and x < 1e4 for x in losses) and losses[-1] < losses[0],
            "losses": losses, "wps": [float(w) for _, w in found]}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--families", default=",".join(families.names()))
    ap.add_argument("--updates", type=int, default=60)
    ap.add_argument("--precision", default="fp32",
                    help=f"comma-separated, each of {', '.join(PRECISIONS)} (fp16 and amp need CUDA)")
    ap.add_argument("--out", type=Path, default=Path("train_check.json"),
                    help="the JSON, written after each run (an existing one only with --replace)")
    ap.add_argument("--replace", action="store_true", help="write over an existing --out")
    args = ap.parse_args(argv)
    if args.out.exists() and not args.replace:
        ap.error(f"--out {args.out} exists; give another file, or --replace to write over it")
    names = models.family_list(ap, args.families)
    precisions = args.precision.split(",")
    for name in precisions:
        if name not in PRECISIONS:
            ap.error(f"--precision {name}: choose from {', '.join(PRECISIONS)}")
    if args.updates < 2:
        ap.error(f"--updates {args.updates}: must be at least 2 (a first and a last loss)")
    with tempfile.TemporaryDirectory() as tmp:
        data = make_data(Path(tmp))
        rows = []
        for precision in precisions:
            for family in names:
                rows.append(train(family, data, Path(tmp) / f"{family}-{precision}", args.updates, precision))
                print(json.dumps({k: v for k, v in rows[-1].items() if k != "error"}), flush=True)
                args.out.write_text(json.dumps({"updates": args.updates, "runs": rows}, indent=1))
    failed = [f"{r['family']} ({r['precision']})" for r in rows if not r["ok"]]
    if failed:
        sys.exit(f"train_check: {', '.join(failed)} did not train (finite, falling loss); see {args.out}")


if __name__ == "__main__":
    main()
