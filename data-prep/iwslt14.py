#!/usr/bin/env python
"""IWSLT'14 German -> English (paper-scale MT, the standard small benchmark).

Source: the IWSLT 2014 evaluation campaign (Cettolo et al. 2014), TED talk
transcripts from WIT3 (de-en.tgz); CC BY-NC-ND (TED). Splits follow fairseq's
examples/translation/prepare-iwslt14.sh: train = train.tags.de-en without
XML lines and every 23rd pair held out as valid; test = IWSLT14.TED.dev2010 +
IWSLT14.TEDX.dev2012 + IWSLT14.TED.tst2010..2012. Text is lower-cased as there.
We use a joint sentencepiece model (10k unigram) instead of Moses + subword-nmt
BPE; BLEU is sacrebleu on detokenized lower-cased text, so it runs ~1 BLEU
below the tokenized BLEU usually published for this set.

  python data-prep/iwslt14.py [--raw DIR] [--out data-bin/iwslt14_de_en]

--raw DIR is the unpacked de-en/ folder (train.tags.de-en.de, ...xml).
Output: raw/, spm/, bin/, CHECKSUMS.
"""
import html
import os
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    arg_parser, binarize_pairs, check_aligned, download, extract, find_raw, log, read_lines,
    raw_or_fetch, record_checksums, sentencepiece_all, write_splits,
)

URL = os.environ.get("IWSLT14_URL", "https://wit3.fbk.eu/archive/2014-01/texts/de/en/de-en.tgz")
TEST_SETS = ["IWSLT14.TED.dev2010", "IWSLT14.TEDX.dev2012", "IWSLT14.TED.tst2010",
             "IWSLT14.TED.tst2011", "IWSLT14.TED.tst2012"]
SEG = re.compile(r"<seg[^>]*>(.*)</seg>")


KEPT_TAGS = re.compile(r"</?(title|description)>")


def train_lines(path: Path):
    """The text of train.tags: metadata lines (<url>, <talkid>, ...) dropped,
    <title> and <description> kept without their tags (as prepare-iwslt14.sh)."""
    lines = []
    for line in read_lines(path):
        if line.lstrip().startswith("<") and not KEPT_TAGS.search(line):
            continue
        lines.append(" ".join(KEPT_TAGS.sub("", line).split()).lower())
    return lines


def clean(de, en, max_len=175, ratio=1.5):
    """Moses clean-corpus-n: drop empty, over-long and length-mismatched pairs."""
    pairs = [(a, b) for a, b in zip(de, en)
             if 0 < len(a.split()) <= max_len and 0 < len(b.split()) <= max_len
             and max(len(a.split()), len(b.split())) <= ratio * min(len(a.split()), len(b.split()))]
    return [a for a, _ in pairs], [b for _, b in pairs]


def xml_lines(path: Path):
    return [" ".join(html.unescape(m.group(1)).split()).lower()
            for m in map(SEG.search, read_lines(path)) if m]


def main(argv=None):
    args = arg_parser(__doc__, "data-bin/iwslt14_de_en", 10000).parse_args(argv)
    out = args.out
    folder = raw_or_fetch(args, lambda: extract(download(URL, out / "download" / "de-en.tgz"), out / "download") / "de-en")
    splits, used = {}, []
    train = {lang: find_raw(folder, f"train.tags.de-en.{lang}") for lang in ("de", "en")}
    for lang, lines in zip(("de", "en"), clean(train_lines(train["de"]), train_lines(train["en"]))):
        splits[("train", lang)] = [x for i, x in enumerate(lines) if i % 23 != 0]
        splits[("valid", lang)] = lines[::23]
        tests = [find_raw(folder, f"{name}.de-en.{lang}.xml") for name in TEST_SETS]
        splits[("test", lang)] = [x for t in tests for x in xml_lines(t)]
        used += [train[lang], *tests]
    write_splits(out / "raw", splits, args)
    record_checksums(out, used)
    n = check_aligned(out / "raw", ("train", "valid", "test"), ("de", "en"))
    sentencepiece_all(out, ("train", "valid", "test"), ("de", "en"), args.vocab)
    binarize_pairs(out / "spm", "de", "en", out / "bin", args.workers)
    log(f"ready: {out / 'bin'} (train {n['train']}, valid {n['valid']}, test {n['test']} pairs)")


if __name__ == "__main__":
    main()
