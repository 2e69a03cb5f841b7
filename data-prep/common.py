"""Helpers shared by the data-prep scripts: fetch (with checksums) or copy raw
files, train and apply sentencepiece, binarize with fairseq-preprocess.

Every step writes its outputs under the output folder and is skipped when they
already exist, so a script can be re-run after an interruption: a download
resumes from its partial file, and finished steps are not redone.
"""
import argparse
import gzip
import hashlib
import subprocess
import sys
import tarfile
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))


def log(msg: str) -> None:
    print(f"[data-prep] {msg}", file=sys.stderr, flush=True)


def die(msg: str) -> None:
    print(f"[data-prep] error: {msg}", file=sys.stderr, flush=True)
    sys.exit(1)


def arg_parser(doc: str, out: str, vocab: int) -> argparse.ArgumentParser:
    """The options every script shares."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--raw", type=Path, help="folder with the raw files (see above); default: download")
    ap.add_argument("--out", type=Path, default=Path(out), help=f"output folder (default {out})")
    ap.add_argument("--vocab", type=int, default=vocab, help=f"sentencepiece vocabulary (default {vocab})")
    ap.add_argument("--limit", type=int, help="keep only the first N training examples (smoke tests)")
    ap.add_argument("--eval-limit", type=int, help="keep only the first N valid/test examples (smoke tests)")
    ap.add_argument("--workers", type=int, default=2, help="fairseq-preprocess workers")
    ap.add_argument("--no-verify", action="store_true", help="do not check the raw files against the known checksums")
    return ap


def open_text(path: Path):
    return gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else open(path, encoding="utf-8")


def find_raw(raw_dir: Path, name: str) -> Path:
    """`name` or `name.gz` inside a user-given folder."""
    for candidate in (raw_dir / name, raw_dir / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    die(f"--raw {raw_dir}: neither {name} nor {name}.gz is there")


def digest(path: Path, algo: str = "sha256", text: bool = False) -> str:
    """Hash of a file; with text=True of its decompressed content, so that a
    re-compressed copy of the same text has the same checksum."""
    h = hashlib.new(algo)
    with (gzip.open(path, "rb") if text and path.suffix == ".gz" else open(path, "rb")) as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def verify(path: Path, expected: str, algo: str = "sha1", text: bool = False) -> None:
    """Stop when `path` does not have the published checksum."""
    actual = digest(path, algo, text)
    if actual != expected:
        die(f"{path}: {algo} {actual} is not the published {expected} "
            "(a corrupt or different file; --no-verify skips this check)")


def download(url: str, dest: Path, hint: str = "") -> Path:
    """Fetch `url` to `dest`, resuming a partial `.part` file when the server allows."""
    if dest.is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_suffix(dest.suffix + ".part")
    have = tmp.stat().st_size if tmp.is_file() else 0
    log(f"downloading {url}" + (f" (resuming at {have} bytes)" if have else ""))
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            resumed = have and response.status == 206
            size = int(response.headers.get("Content-Length") or 0)
            with open(tmp, "ab" if resumed else "wb") as out:
                copy_with_progress(response, out, size)
    except (urllib.error.URLError, OSError) as e:
        die(f"cannot download {url} ({e}). Offline? Pass --raw DIR with the raw files{hint}.")
    tmp.rename(dest)
    return dest


def copy_with_progress(src, dest, size: int, block: int = 1 << 20, every: float = 30.0) -> None:
    """Copy a stream; with a known size, log the share done and the time left
    about every `every` seconds."""
    from progress import Progress  # scripts/progress.py

    progress, done, shown = Progress(size or 1), 0, time.time()
    while chunk := src.read(block):
        dest.write(chunk)
        done += len(chunk)
        if size and time.time() - shown >= every:
            log(f"{progress.share(done)} {done >> 20} of {size >> 20} MiB")
            shown = time.time()


def raw_or_fetch(args, fetch):
    """The folder of raw files: --raw DIR when given, else what `fetch()` downloads."""
    return args.raw if args.raw is not None else fetch()


def extract(archive: Path, into: Path) -> Path:
    """Unpack a .tgz/.tar.gz/.zip once (a marker file records completion)."""
    done = into / f".{archive.name}.extracted"
    if done.is_file():
        return into
    log(f"extracting {archive.name}")
    into.mkdir(parents=True, exist_ok=True)
    if archive.suffix == ".zip":
        with zipfile.ZipFile(archive) as z:
            z.extractall(into)
    else:
        with tarfile.open(archive) as t:
            t.extractall(into, filter="data")
    done.touch()
    return into


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


def keep(split: str, lines, args):
    """The --limit / --eval-limit slice of a split."""
    n = args.limit if split == "train" else args.eval_limit
    return lines[:n] if n else lines


def write_splits(raw: Path, splits: dict, args) -> None:
    """splits: {(split, suffix): lines}; writes raw/{split}.{suffix} once, checking alignment."""
    for (split, suffix), lines in splits.items():
        if not (raw / f"{split}.{suffix}").is_file():
            write_lines(raw / f"{split}.{suffix}", keep(split, lines, args))


def check_aligned(raw: Path, splits, suffixes) -> dict:
    """Number of lines per split; stops when the sides of a pair differ."""
    counts = {}
    for split in splits:
        n = {s: len(read_lines(raw / f"{split}.{s}")) for s in suffixes}
        if len(set(n.values())) != 1:
            die(f"{split}: the sides differ in length {n}")
        counts[split] = next(iter(n.values()))
    return counts


def train_sentencepiece(inputs, prefix: Path, vocab_size: int, model_type: str = "unigram") -> Path:
    """The sentencepiece model under `prefix`, trained once; a folder prepared
    with another --vocab stops the script rather than being reused."""
    model, asked = prefix.with_suffix(".model"), prefix.with_suffix(".settings")
    settings = f"{model_type} {vocab_size}"
    if model.is_file():
        if asked.is_file() and asked.read_text() != settings:
            die(f"{prefix.parent} was prepared with another sentencepiece model ({asked.read_text()} pieces, "
                f"asked: {settings}): remove it or pass another --out")
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
        max_sentence_length=1 << 16,  # whole articles and paragraphs are one line
        minloglevel=2,
    )
    asked.write_text(settings)
    return model


def encode_sentencepiece(model: Path, src: Path, dest: Path, max_pieces: int = 0) -> None:
    """Pieces of every line of `src`; with max_pieces, each line keeps its first pieces."""
    if dest.is_file():
        return
    import sentencepiece as spm

    from progress import Progress  # scripts/progress.py

    sp = spm.SentencePieceProcessor(model_file=str(model))
    lines = read_lines(src)
    progress, pieces, block = Progress(len(lines)), [], 200_000
    for i in range(0, len(lines), block):
        if i:
            log(f"{progress.share(i)} encoding {src.name}")
        pieces += sp.encode(lines[i:i + block], out_type=str)
    write_lines(dest, (" ".join(p[:max_pieces] if max_pieces else p) for p in pieces))


def sentencepiece_all(out: Path, splits, suffixes, vocab: int, max_pieces: dict = None) -> Path:
    """One joint sentencepiece model over the training files, applied to every split."""
    raw = out / "raw"
    model = train_sentencepiece([raw / f"train.{s}" for s in suffixes], out / "spm", vocab)
    for split in splits:
        for s in suffixes:
            encode_sentencepiece(model, raw / f"{split}.{s}", out / "spm" / f"{split}.{s}",
                                 (max_pieces or {}).get(s, 0))
    return model


def fairseq_preprocess(args, destdir: Path) -> None:
    if (destdir / "preprocess.done").is_file():
        return
    log(f"binarizing into {destdir}")
    cmd = [sys.executable, "-m", "fairseq_cli.preprocess", *args, "--destdir", str(destdir)]
    result = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if result.returncode != 0:
        die(f"fairseq-preprocess failed:\n{result.stdout[-3000:]}")
    (destdir / "preprocess.done").touch()


def binarize_pairs(prefix: Path, src: str, tgt: str, destdir: Path, workers: int, extra=()) -> None:
    """fairseq-preprocess for a translation-style pair with one joined dictionary."""
    fairseq_preprocess(
        ["--source-lang", src, "--target-lang", tgt, "--joined-dictionary",
         "--trainpref", f"{prefix}/train", "--validpref", f"{prefix}/valid", "--testpref", f"{prefix}/test",
         "--workers", str(workers), *extra],
        destdir,
    )


def binarize_mono(files: dict, destdir: Path, workers: int, extra=()) -> None:
    """fairseq-preprocess for language modeling (--only-source); files: {split: path}."""
    fairseq_preprocess(
        ["--only-source", "--trainpref", str(files["train"]), "--validpref", str(files["valid"]),
         "--testpref", str(files["test"]), "--workers", str(workers), *extra],
        destdir,
    )


def record_checksums(out: Path, files) -> None:
    """sha256 of the text each split came from, for provenance (out/CHECKSUMS)."""
    lines = [f"{digest(p, 'sha256', text=True)}  {p.name}" for p in files]
    write_lines(out / "CHECKSUMS", lines)
