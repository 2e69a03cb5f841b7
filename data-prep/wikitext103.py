#!/usr/bin/env python
"""WikiText-103 (paper-scale language modeling).

Source: Merity et al. 2016, "Pointer Sentinel Mixture Models" (arXiv 1609.07843),
wikitext-103-v1.zip from the authors' release; text from Wikipedia, CC BY-SA 3.0.
Word-level, as in the MemSizer paper and fairseq's adaptive-input recipe (no
sentencepiece: perplexities are per word and comparable with published ones).

  python data-prep/wikitext103.py [--raw DIR] [--out data-bin/wikitext-103]

--raw DIR holds wiki.{train,valid,test}.tokens (the unzipped archive). The
archive and the three files are checked against their published SHA-1
checksums (as listed by GluonNLP's dataset registry). Output: bin/ (fairseq
language_modeling data), CHECKSUMS.
"""
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    arg_parser, binarize_mono, download, extract, find_raw, log, raw_or_fetch, read_lines,
    record_checksums, verify, write_lines,
)

URL = os.environ.get("WIKITEXT103_URL", "https://s3.amazonaws.com/research.metamind.io/wikitext/wikitext-103-v1.zip")
ARCHIVE_SHA1 = "0aec09a7537b58d4bb65362fee27650eeaba625a"
FILES = {  # split: (file, published sha1)
    "train": ("wiki.train.tokens", "b7497e2dfe77e72cfef5e3dbc61b7b53712ac211"),
    "valid": ("wiki.valid.tokens", "c326ac59dc587676d58c422eb8a03e119582f92b"),
    "test": ("wiki.test.tokens", "8a5befc548865cec54ed4273cf87dbbad60d1e47"),
}


def fetch(out, no_verify: bool):
    archive = download(URL, out / "download" / "wikitext-103-v1.zip")
    if not no_verify:
        verify(archive, ARCHIVE_SHA1)
    return extract(archive, out / "download") / "wikitext-103"


def main(argv=None):
    args = arg_parser(__doc__, "data-bin/wikitext-103", 0).parse_args(argv)
    out = args.out
    folder = raw_or_fetch(args, lambda: fetch(out, args.no_verify))
    files = {}
    for split, (name, sha1) in FILES.items():
        path = find_raw(folder, name)
        if not args.no_verify:
            verify(path, sha1, text=True)
        files[split] = path
    if args.limit or args.eval_limit:  # smoke tests: a slice of each split
        for split, path in files.items():
            n = args.limit if split == "train" else args.eval_limit
            dest = out / "raw" / f"{split}.tokens"
            if not dest.is_file():
                write_lines(dest, read_lines(path, n))
            files[split] = dest
    record_checksums(out, files.values())
    binarize_mono(files, out / "bin", args.workers, ["--thresholdsrc", "0"])
    log(f"ready: {out / 'bin'}")


if __name__ == "__main__":
    main()
