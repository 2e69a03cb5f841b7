#!/usr/bin/env python
"""CNN/DailyMail summarization (paper scale), non-anonymized version
(See et al. 2017, "Get To The Point", arXiv 1704.04368).

Source: the CNN and DailyMail story files of Hermann et al. 2015 ("Teaching
Machines to Read and Comprehend"; cnn_stories.tgz, dailymail_stories.tgz)
and the official split lists url_lists/all_{train,val,test}.txt of
github.com/abisee/cnn-dailymail. News text: research use only.
A story's article is its text before the first @highlight; its summary is
the highlights, each ended with a period. Joint sentencepiece (32k unigram),
articles cut to their first --max-source pieces (default 1024).

  python data-prep/cnn_dm.py [--raw DIR] [--out data-bin/cnn_dm]

--raw DIR holds cnn/stories/*.story, dailymail/stories/*.story and
url_lists/all_{train,val,test}.txt. The story archives live on Google Drive
(links at cs.nyu.edu/~kcho/DMQA) and may need a browser: without --raw the
script fetches what it can and says what is missing.
Output: raw/{split}.{doc,sum}, spm/, bin/ (doc -> sum), CHECKSUMS.
"""
import hashlib
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    arg_parser, binarize_pairs, check_aligned, die, download, extract, log, read_lines,
    record_checksums, sentencepiece_all, write_splits,
)

LISTS = os.environ.get("CNNDM_LISTS_URL", "https://raw.githubusercontent.com/abisee/cnn-dailymail/master/url_lists")
STORIES = {"cnn": os.environ.get("CNN_STORIES_URL", "https://drive.google.com/uc?export=download&id=0BwmD_VLjROrfTHk4NFg2SndKcjQ"),
           "dailymail": os.environ.get("DM_STORIES_URL", "https://drive.google.com/uc?export=download&id=0BwmD_VLjROrfM1BxdkxVaTY2bWs")}
SPLITS = {"train": "all_train", "valid": "all_val", "test": "all_test"}


def story(path: Path):
    """(article, summary) of one .story file."""
    article, highlights, in_highlight = [], [], False
    for line in read_lines(path):
        line = line.strip()
        if line == "@highlight":
            in_highlight = True
        elif line:
            line = line if line[-1] in ".!?'\"" else line + " ."
            (highlights if in_highlight else article).append(line)
    return " ".join(article), " ".join(highlights)


def story_path(folder: Path, url: str) -> Path:
    name = hashlib.sha1(url.strip().encode()).hexdigest() + ".story"
    for source in STORIES:
        path = folder / source / "stories" / name
        if path.is_file():
            return path
    die(f"no story file for {url.strip()} ({name}) under {folder}/{{cnn,dailymail}}/stories")


def main(argv=None):
    ap = arg_parser(__doc__, "data-bin/cnn_dm", 32000)
    ap.add_argument("--max-source", type=int, default=1024, help="article pieces kept (default 1024)")
    args = ap.parse_args(argv)
    out = args.out
    folder = args.raw
    if folder is None:
        folder = out / "download"
        for split, name in SPLITS.items():
            download(f"{LISTS}/{name}.txt", folder / "url_lists" / f"{name}.txt")
        for source, url in STORIES.items():
            extract(download(url, folder / f"{source}_stories.tgz", " (see --help)"), folder)
    splits, lists = {}, []
    for split, name in SPLITS.items():
        lists.append(folder / "url_lists" / f"{name}.txt")
        urls = read_lines(lists[-1], args.limit if split == "train" else args.eval_limit)
        pairs = [story(story_path(folder, u)) for u in urls]
        pairs = [(a, s) for a, s in pairs if a and s]  # a few stories have no text
        splits[(split, "doc")], splits[(split, "sum")] = [a for a, _ in pairs], [s for _, s in pairs]
    write_splits(out / "raw", splits, args)
    record_checksums(out, lists)
    n = check_aligned(out / "raw", SPLITS, ("doc", "sum"))
    sentencepiece_all(out, SPLITS, ("doc", "sum"), args.vocab, max_pieces={"doc": args.max_source})
    binarize_pairs(out / "spm", "doc", "sum", out / "bin", args.workers)
    log(f"ready: {out / 'bin'} (train {n['train']}, valid {n['valid']}, test {n['test']} pairs)")


if __name__ == "__main__":
    main()
