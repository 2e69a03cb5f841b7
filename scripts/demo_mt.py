#!/usr/bin/env python
"""CPU demo: MemSizer vs the softmax transformer on Multi30k De->En.

Prepares the data (data-prep/multi30k.py), trains `transformer` and
`memsizer_transformer` with identical settings and the same number of updates,
decodes the test set (test_2016_flickr) with stock fairseq-generate (beam 4),
scores with sacrebleu, and prints BLEU, chrF and decoding speed.
Everything runs through the fairseq CLIs with `--user-dir linear_fairseq`;
logs and checkpoints go to --work. Re-running resumes or reuses finished steps.
"""
import argparse
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from linear_fairseq.scoring import (  # noqa: E402
    bleu_chrf, read_generate_speed, read_hypotheses, read_references, read_train_log,
)

# The CPU recipe of ../shared/data/README.md: 2+2 layers, d=128, 4 heads.
MODEL = (
    "--encoder-layers 2 --decoder-layers 2 --encoder-embed-dim 128 --decoder-embed-dim 128 "
    "--encoder-ffn-embed-dim 512 --decoder-ffn-embed-dim 512 "
    "--encoder-attention-heads 4 --decoder-attention-heads 4 --share-all-embeddings"
)
TRAIN = (
    "--optimizer adam --adam-betas (0.9,0.98) --lr 2e-3 --lr-scheduler inverse_sqrt "
    "--warmup-updates 300 --criterion label_smoothed_cross_entropy --label-smoothing 0.1 "
    "--dropout 0.1 --max-tokens 4096 --seed 1 --no-epoch-checkpoints "
    "--log-format simple --log-interval 50 --num-workers 0"
)


def say(msg):
    print(f"[demo] {msg}", flush=True)


def fairseq(cli, args, log: Path) -> str:
    """Run a stock fairseq CLI with the plugin; its output is kept in `log`."""
    cmd = [f"fairseq-{cli}", *args, "--user-dir", str(ROOT / "linear_fairseq")]
    with open(log, "w") as f:
        result = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, text=True)
    out = log.read_text()
    if result.returncode != 0:
        sys.exit(f"[demo] fairseq-{cli} failed (log: {log}):\n{out[-3000:]}")
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, help="raw Multi30k files (train.de.gz ...); default: download")
    ap.add_argument("--work", type=Path, default=ROOT / "work" / "demo_mt")
    ap.add_argument("--updates", type=int, default=400, help="training updates per model (default 400)")
    ap.add_argument("--batch-size", type=int, default=64, help="decoding batch size (default 64)")
    ap.add_argument("--archs", default="transformer,memsizer_transformer",
                    help="comma-separated --arch values, trained with the same settings "
                         "(default: transformer,memsizer_transformer; e.g. add performer_transformer)")
    args = ap.parse_args()
    work = args.work
    work.mkdir(parents=True, exist_ok=True)

    say("preparing Multi30k De-En")
    prep = [sys.executable, str(ROOT / "data-prep" / "multi30k.py"), "--out", str(work / "data")]
    if args.data is not None:
        prep += ["--raw", str(args.data)]
    if subprocess.run(prep).returncode != 0:
        sys.exit(1)
    data_bin = str(work / "data" / "bin")
    refs = read_references(work / "data" / "raw" / "test.en")

    rows = []
    for arch in args.archs.split(","):
        ckpt = work / "checkpoints" / arch
        ckpt.mkdir(parents=True, exist_ok=True)
        say(f"training {arch} for {args.updates} updates (log: {ckpt / 'train.log'})")
        start = time.time()
        train_out = fairseq(
            "train",
            [data_bin, "--arch", arch, *MODEL.split(), *TRAIN.split(),
             "--max-update", str(args.updates), "--save-dir", str(ckpt)],
            ckpt / "train.log",
        )
        train = read_train_log(train_out)
        say(f"  trained in {time.time() - start:.0f}s; decoding the test set (beam 4)")
        gen_out = fairseq(
            "generate",
            [data_bin, "--path", str(ckpt / "checkpoint_best.pt"), "--gen-subset", "test",
             "--beam", "4", "--batch-size", str(args.batch_size), "--post-process", "sentencepiece",
             # without this, fairseq drops the last partial batch (fairseq #5036)
             "--required-batch-size-multiple", "1"],
            ckpt / "generate.log",
        )
        scores = bleu_chrf(read_hypotheses(gen_out), refs)
        speed = read_generate_speed(gen_out)
        rows.append((arch, train, scores, speed))

    print()
    print(f"Multi30k De->En test_2016_flickr, {args.updates} updates each, beam 4, batch {args.batch_size}")
    print(f"{'model':<22} {'params':>9} {'train s':>8} {'BLEU':>6} {'chrF':>6} {'decode tok/s':>13} {'sent/s':>7}")
    for arch, train, scores, speed in rows:
        print(
            f"{arch:<22} {train['params']:>9,} {train['train_seconds']:>8.0f} {scores['bleu']:>6.2f} "
            f"{scores['chrf']:>6.2f} {speed['tokens_per_s']:>13.1f} {speed['sentences_per_s']:>7.1f}"
        )


if __name__ == "__main__":
    main()
