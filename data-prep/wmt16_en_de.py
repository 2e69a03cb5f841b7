#!/usr/bin/env python
"""WMT'16 English -> German, the "Scaling Neural Machine Translation" set
(Ott et al. 2018, arXiv 1806.00187), used by the MemSizer paper.

Source: Google's preprocessed wmt16_en_de.tar.gz (4.5M sentence pairs,
Moses-tokenized, 32k joint BPE; newstest2013 = valid, newstest2014 = test),
the archive linked from fairseq's examples/scaling_nmt. WMT data terms apply.
The paper's BPE is kept (not sentencepiece) so the setup matches theirs; BLEU
is sacrebleu on the tokenized, BPE-removed text (no compound splitting), so
it is close to, not equal to, the papers' tokenized BLEU.

  python data-prep/wmt16_en_de.py [--raw DIR] [--out data-bin/wmt16_en_de_bpe32k]

Google Drive may answer a script with a confirmation page instead of the file
(about 480 MB); then download it in a browser, unpack it and pass --raw DIR
(the folder with train.tok.clean.bpe.32000.en, newstest2014.tok.bpe.32000.de, ...).
Output: raw/test.de (references), bin/, CHECKSUMS.
"""
import os
import sys
import tarfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    arg_parser, binarize_pairs, check_aligned, die, download, extract, find_raw, log, raw_or_fetch,
    read_lines, record_checksums, write_lines, write_splits,
)

URL = os.environ.get("WMT16_URL", "https://drive.google.com/uc?export=download&id=0B_bZck-ksdkpM25jRUN2X2UxMm8")
NAMES = {"train": "train.tok.clean.bpe.32000", "valid": "newstest2013.tok.bpe.32000",
         "test": "newstest2014.tok.bpe.32000"}


def fetch(out):
    archive = download(URL, out / "download" / "wmt16_en_de.tar.gz", " (see --help: Google Drive)")
    if not tarfile.is_tarfile(archive):
        archive.unlink()
        die(f"{URL} did not return the archive (Google Drive asks for a confirmation); "
            "download it in a browser and pass --raw DIR")
    return extract(archive, out / "download")


def main(argv=None):
    args = arg_parser(__doc__, "data-bin/wmt16_en_de_bpe32k", 0).parse_args(argv)
    out = args.out
    folder = raw_or_fetch(args, lambda: fetch(out))
    files = {(split, lang): find_raw(folder, f"{name}.{lang}") for split, name in NAMES.items() for lang in ("en", "de")}
    write_splits(out / "bpe", {key: read_lines(path) for key, path in files.items()}, args)
    record_checksums(out, files.values())
    n = check_aligned(out / "bpe", NAMES, ("en", "de"))
    if not (out / "raw" / "test.de").is_file():  # references: the tokenized text without BPE
        write_lines(out / "raw" / "test.de", (x.replace("@@ ", "") for x in read_lines(out / "bpe" / "test.de")))
    binarize_pairs(out / "bpe", "en", "de", out / "bin", args.workers, ["--nwordssrc", "32768", "--nwordstgt", "32768"])
    log(f"ready: {out / 'bin'} (train {n['train']}, valid {n['valid']}, test {n['test']} pairs)")


if __name__ == "__main__":
    main()
