#!/usr/bin/env python
"""Multi30k task 1, German -> English (CPU-scale MT).

Source: Elliott et al. 2016, "Multi30K: Multilingual English-German Image
Descriptions"; files from github.com/multi30k/dataset (data/task1/raw). The
captions derive from Flickr30k: research use, see the dataset's README.

  python data-prep/multi30k.py [--raw DIR] [--out data-bin/multi30k_de_en]

--raw DIR holds train.{de,en}[.gz], val.*, test_2016_flickr.* (as in the
official repository). Steps, each skipped when its output exists: raw text ->
joint sentencepiece (unigram) -> fairseq-preprocess with a joined dictionary.
Output: raw/ (plain text; raw/test.en are the BLEU references), spm.model,
spm/ (pieces), bin/ (fairseq data), CHECKSUMS (sha256 of the text used).
"""
import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    arg_parser, binarize_pairs, check_aligned, download, find_raw, log, read_lines,
    record_checksums, sentencepiece_all, write_splits,
)

# MULTI30K_URL overrides the source (a mirror; the tests use it to simulate being offline)
URL = os.environ.get("MULTI30K_URL", "https://github.com/multi30k/dataset/raw/master/data/task1/raw") + "/{name}.gz"
SPLITS = {"train": "train", "valid": "val", "test": "test_2016_flickr"}
LANGS = ("de", "en")


def main(argv=None):
    args = arg_parser(__doc__, "data-bin/multi30k_de_en", 4000).parse_args(argv)
    out = args.out
    sources = {}
    for split, name in SPLITS.items():
        for lang in LANGS:
            if (out / "raw" / f"{split}.{lang}").is_file():
                continue
            if args.raw is not None:
                src = find_raw(args.raw, f"{name}.{lang}")
            else:
                src = download(URL.format(name=f"{name}.{lang}"), out / "download" / f"{name}.{lang}.gz",
                               " (e.g. --raw ../shared/data/multi30k)")
            sources[(split, lang)] = src
    write_splits(out / "raw", {key: read_lines(src) for key, src in sources.items()}, args)
    if sources:
        record_checksums(out, sorted(set(sources.values())))
    n = check_aligned(out / "raw", SPLITS, LANGS)
    sentencepiece_all(out, SPLITS, LANGS, args.vocab)
    binarize_pairs(out / "spm", "de", "en", out / "bin", args.workers)
    shutil.rmtree(out / "download", ignore_errors=True)
    log(f"ready: {out / 'bin'} (train {n['train']}, valid {n['valid']}, test {n['test']} pairs)")


if __name__ == "__main__":
    main()
