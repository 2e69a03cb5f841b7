#!/usr/bin/env python
"""Jane Austen's novels (CPU-scale language modeling, long-form prose).

Source: the janeaustenr R package (public domain text), as shipped in Debian's
r-cran-janeaustenr: train = Emma, Mansfield Park, Pride and Prejudice, Sense
and Sensibility; valid = Northanger Abbey; test = first half of Persuasion.
There is no download step: the splits are files you already have.

  python data-prep/austen.py --raw ../shared/data/austen [--out data-bin/austen]

--raw DIR holds {train,valid,test}.txt.gz, one source line a line. Lines are
joined into paragraphs (blank lines separate them), tokenized with a
sentencepiece model trained on train, and binarized for fairseq's
language_modeling task. Perplexities are per sentencepiece token.
Output: raw/{split}.txt, spm/, bin/, CHECKSUMS.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    arg_parser, binarize_mono, die, find_raw, log, read_lines, record_checksums,
    sentencepiece_all, write_splits,
)

SPLITS = ("train", "valid", "test")


def paragraphs(lines):
    """Source lines -> one paragraph a line."""
    out, cur = [], []
    for line in lines + [""]:
        if line.strip():
            cur.append(line.strip())
        elif cur:
            out.append(" ".join(cur))
            cur = []
    return out


def main(argv=None):
    args = arg_parser(__doc__, "data-bin/austen", 4000).parse_args(argv)
    if args.raw is None:
        die("austen has no download step: pass --raw DIR with {train,valid,test}.txt.gz "
            "(e.g. --raw ../shared/data/austen)")
    out = args.out
    files = [find_raw(args.raw, f"{split}.txt") for split in SPLITS]
    write_splits(out / "raw", {(s, "txt"): paragraphs(read_lines(f)) for s, f in zip(SPLITS, files)}, args)
    record_checksums(out, files)
    sentencepiece_all(out, SPLITS, ("txt",), args.vocab)
    binarize_mono({s: out / "spm" / f"{s}.txt" for s in SPLITS}, out / "bin", args.workers)
    n = {s: len(read_lines(out / "spm" / f"{s}.txt")) for s in SPLITS}
    log(f"ready: {out / 'bin'} (paragraphs: train {n['train']}, valid {n['valid']}, test {n['test']})")


if __name__ == "__main__":
    main()
