"""Helpers shared by the data-prep scripts: fetch or copy raw files, train and
apply sentencepiece, binarize with fairseq-preprocess. Every step writes its
outputs under the output folder and is skipped when they already exist, so a
script can be re-run after an interruption."""
import gzip
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path


def log(msg: str) -> None:
    print(f"[data-prep] {msg}", file=sys.stderr, flush=True)


def die(msg: str) -> None:
    print(f"[data-prep] error: {msg}", file=sys.stderr, flush=True)
    sys.exit(1)


def open_text(path: Path):
    return gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else open(path, encoding="utf-8")


def find_raw(raw_dir: Path, name: str) -> Path:
    """`name` or `name.gz` inside a user-given folder."""
    for candidate in (raw_dir / name, raw_dir / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    die(f"--raw {raw_dir}: neither {name} nor {name}.gz is there")


def download(url: str, dest: Path) -> Path:
    if dest.is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    log(f"downloading {url}")
    tmp = dest.with_suffix(dest.suffix + ".part")
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(tmp, "wb") as out:
            shutil.copyfileobj(response, out)
    except (urllib.error.URLError, OSError) as e:
        tmp.unlink(missing_ok=True)
        die(
            f"cannot download {url} ({e}). Offline? Pass --raw DIR with the raw files "
            f"(e.g. --raw ../shared/data/multi30k)."
        )
    tmp.rename(dest)
    return dest


def write_lines(path: Path, lines) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".part")
    with open(tmp, "w", encoding="utf-8") as f:
        for line in lines:
            f.write(line.rstrip("\n") + "\n")
    tmp.rename(path)


def read_lines(path: Path, limit=None):
    with open_text(path) as f:
        lines = [line.rstrip("\n") for line in f]
    return lines[:limit] if limit else lines


def train_sentencepiece(inputs, prefix: Path, vocab_size: int, model_type: str = "unigram") -> Path:
    model = prefix.with_suffix(".model")
    if model.is_file():
        return model
    import sentencepiece as spm

    log(f"training sentencepiece ({model_type}, {vocab_size} pieces) on {', '.join(p.name for p in inputs)}")
    spm.SentencePieceTrainer.train(
        input=",".join(str(p) for p in inputs),
        model_prefix=str(prefix),
        vocab_size=vocab_size,
        model_type=model_type,
        character_coverage=1.0,
        hard_vocab_limit=False,  # small corpora may support fewer pieces than asked
        input_sentence_size=2_000_000,
        shuffle_input_sentence=True,
        minloglevel=2,
    )
    return model


def encode_sentencepiece(model: Path, src: Path, dest: Path) -> None:
    if dest.is_file():
        return
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(model))
    lines = read_lines(src)
    write_lines(dest, (" ".join(pieces) for pieces in sp.encode(lines, out_type=str)))


def fairseq_preprocess(args, destdir: Path) -> None:
    if (destdir / "preprocess.done").is_file():
        return
    log(f"binarizing into {destdir}")
    cmd = [sys.executable, "-m", "fairseq_cli.preprocess", *args, "--destdir", str(destdir)]
    result = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if result.returncode != 0:
        die(f"fairseq-preprocess failed:\n{result.stdout[-3000:]}")
    (destdir / "preprocess.done").touch()
