#!/usr/bin/env python
"""Multi30k task 1, German -> English (CPU-scale MT).

Source: Elliott et al. 2016, "Multi30K: Multilingual English-German Image
Descriptions"; files from github.com/multi30k/dataset (data/task1/raw). The
captions derive from Flickr30k; research use, see the dataset's README for terms.

Steps (each skipped when its output exists): raw files -> joint sentencepiece
(unigram) -> fairseq-preprocess with a joined dictionary.

  python data-prep/multi30k.py [--raw DIR] [--out data-bin/multi30k_de_en]

Output folder: raw/ (plain text), spm.model, spm/ (pieces), bin/ (fairseq data).
Test references for BLEU are raw/test.en.
"""
import argparse
import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    download, encode_sentencepiece, fairseq_preprocess, find_raw, log, read_lines,
    train_sentencepiece, write_lines,
)

# MULTI30K_URL overrides the source (a mirror; the tests use it to simulate being offline)
URL = os.environ.get("MULTI30K_URL", "https://github.com/multi30k/dataset/raw/master/data/task1/raw") + "/{name}.gz"
SPLITS = {"train": "train", "valid": "val", "test": "test_2016_flickr"}
LANGS = ("de", "en")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--raw", type=Path, help="folder with the raw files (train.de[.gz], val.*, test_2016_flickr.*); default: download")
    ap.add_argument("--out", type=Path, default=Path("data-bin/multi30k_de_en"))
    ap.add_argument("--vocab", type=int, default=4000, help="joint sentencepiece vocabulary (default 4000)")
    ap.add_argument("--limit", type=int, help="keep only the first N training pairs (smoke tests)")
    ap.add_argument("--eval-limit", type=int, help="keep only the first N valid/test pairs (smoke tests)")
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args(argv)
    out = args.out
    raw = out / "raw"
    for split, name in SPLITS.items():
        for lang in LANGS:
            dest = raw / f"{split}.{lang}"
            if dest.is_file():
                continue
            if args.raw is not None:
                src = find_raw(args.raw, f"{name}.{lang}")
            else:
                src = download(URL.format(name=f"{name}.{lang}"), out / "download" / f"{name}.{lang}.gz")
            write_lines(dest, read_lines(src, args.limit if split == "train" else args.eval_limit))
    n = {s: len(read_lines(raw / f"{s}.de")) for s in SPLITS}
    for s in SPLITS:
        if len(read_lines(raw / f"{s}.en")) != n[s]:
            log(f"error: {s}.de and {s}.en differ in length")
            sys.exit(1)
    model = train_sentencepiece([raw / "train.de", raw / "train.en"], out / "spm", args.vocab)
    for split in SPLITS:
        for lang in LANGS:
            encode_sentencepiece(model, raw / f"{split}.{lang}", out / "spm" / f"{split}.{lang}")
    fairseq_preprocess(
        ["--source-lang", "de", "--target-lang", "en", "--joined-dictionary",
         "--trainpref", str(out / "spm/train"), "--validpref", str(out / "spm/valid"),
         "--testpref", str(out / "spm/test"), "--workers", str(args.workers)],
        out / "bin",
    )
    shutil.rmtree(out / "download", ignore_errors=True)
    log(f"ready: {out / 'bin'} (train {n['train']}, valid {n['valid']}, test {n['test']} pairs)")


if __name__ == "__main__":
    main()
