"""The data-prep scripts, run as a user runs them: on the real CPU-scale data
when it is present, and on small raw folders laid out like the official
archives for the paper-scale sets (which cannot be downloaded here)."""
import gzip
import hashlib
import json
import re
import sys

import pytest

import forked
from conftest import ROOT, require_data


def prep(script, *args, check=True):
    r = forked.run([sys.executable, str(ROOT / "data-prep" / script), *map(str, args)])
    if check:
        assert r.returncode == 0, r.stderr[-2000:]
    return r


def lines(path):
    return path.read_text().splitlines()


def sentences(n, seed):
    words = "the a house cat dog sees runs big small red green old new man woman child".split()
    return [" ".join(words[(i * 7 + j * seed) % len(words)] for j in range(3 + i % 9)) for i in range(n)]


def test_news_lead_pairs_and_headlines(tmp_path):
    raw = require_data("news")
    out = tmp_path / "news"
    prep("news.py", "--raw", raw, "--out", out, "--vocab", "800", "--max-source", "50", "--limit", "200")
    assert (out / "bin" / "dict.doc.txt").is_file() and (out / "bin" / "test.doc-sum.sum.bin").is_file()
    with gzip.open(raw / "test.jsonl.gz", "rt") as f:
        with_summary = sum(1 for row in map(json.loads, f) if row["summary"].strip())
    assert len(lines(out / "raw" / "test.sum")) == with_summary == len(lines(out / "raw" / "test.doc"))
    assert max(len(x.split()) for x in lines(out / "spm" / "train.doc")) <= 50  # --max-source
    assert len(lines(out / "raw" / "train.doc")) == 200
    again = prep("news.py", "--raw", raw, "--out", out, "--vocab", "900", "--max-source", "50", "--limit", "200",
                 check=False)  # the folder's pieces were trained for another vocabulary: not reused silently
    assert again.returncode != 0 and "was prepared with another sentencepiece model (unigram 800 pieces" in again.stderr


def test_austen_paragraphs_and_rerun_is_a_no_op(tmp_path):
    raw = require_data("austen")
    out = tmp_path / "austen"
    prep("austen.py", "--raw", raw, "--out", out, "--vocab", "800", "--limit", "300", "--eval-limit", "30")
    assert len(lines(out / "raw" / "train.txt")) == 300 and (out / "bin" / "train.bin").is_file()
    assert all(x.strip() for x in lines(out / "raw" / "train.txt"))  # paragraphs, no blank lines
    stamp = (out / "bin" / "train.bin").stat().st_mtime_ns
    again = prep("austen.py", "--raw", raw, "--out", out, "--vocab", "800")
    assert (out / "bin" / "train.bin").stat().st_mtime_ns == stamp and "ready" in again.stderr


@pytest.mark.parametrize("script", ["news.py", "austen.py"])
def test_sets_without_a_download_ask_for_raw(tmp_path, script):
    r = prep(script, "--out", tmp_path / "x", check=False)
    assert r.returncode == 1 and "--raw" in r.stderr and "Traceback" not in r.stderr


def fake_wikitext(folder):
    folder.mkdir()
    for split, n in (("train", 300), ("valid", 30), ("test", 30)):
        (folder / f"wiki.{split}.tokens").write_text("\n".join(sentences(n, 3)) + "\n")


def test_wikitext103_refuses_files_that_are_not_the_published_ones(tmp_path):
    fake_wikitext(tmp_path / "raw")
    r = prep("wikitext103.py", "--raw", tmp_path / "raw", "--out", tmp_path / "out", check=False)
    assert r.returncode == 1 and "b7497e2dfe77e72cfef5e3dbc61b7b53712ac211" in r.stderr  # the published sha1
    assert "wiki.train.tokens" in r.stderr and "Traceback" not in r.stderr
    ok = prep("wikitext103.py", "--raw", tmp_path / "raw", "--out", tmp_path / "out", "--no-verify")
    assert (tmp_path / "out" / "bin" / "dict.txt").is_file() and "ready" in ok.stderr
    recorded = dict(reversed(line.split("  ")) for line in lines(tmp_path / "out" / "CHECKSUMS"))
    expected = hashlib.sha256((tmp_path / "raw" / "wiki.valid.tokens").read_bytes()).hexdigest()
    assert recorded["wiki.valid.tokens"] == expected


def test_iwslt14_layout(tmp_path):
    raw = tmp_path / "de-en"
    raw.mkdir()
    de, en = sentences(92, 3), sentences(92, 5)
    for lang, text in (("de", de), ("en", en)):
        meta = ["<url>http://www.ted.com/talks/x</url>", "<talkid>1</talkid>", "<title>Ein Titel</title>"]
        (raw / f"train.tags.de-en.{lang}").write_text("\n".join(meta + [x.upper() for x in text]) + "\n")
        for name in ("IWSLT14.TED.dev2010", "IWSLT14.TEDX.dev2012", "IWSLT14.TED.tst2010",
                     "IWSLT14.TED.tst2011", "IWSLT14.TED.tst2012"):
            segs = "\n".join(f'<seg id="{i}"> {x} &amp; co </seg>' for i, x in enumerate(text[:4]))
            (raw / f"{name}.de-en.{lang}.xml").write_text(f"<mteval>\n<doc>\n{segs}\n</doc>\n</mteval>\n")
    out = tmp_path / "out"
    prep("iwslt14.py", "--raw", raw, "--out", out, "--vocab", "300")
    train, valid, test = (lines(out / "raw" / f"{s}.en") for s in ("train", "valid", "test"))
    assert len(train) + len(valid) == 93 and len(valid) == 5  # 92 pairs + the title; every 23rd held out
    assert "ein titel" in lines(out / "raw" / "train.de") + lines(out / "raw" / "valid.de")
    assert not any("<" in x for x in train) and all(x == x.lower() for x in train)
    assert len(test) == 20 and test[0].endswith("& co")
    assert (out / "bin" / "test.de-en.en.bin").is_file()


def test_wmt16_keeps_the_papers_bpe_and_writes_plain_references(tmp_path):
    raw = tmp_path / "wmt16"
    raw.mkdir()
    for name, n in (("train.tok.clean.bpe.32000", 200), ("newstest2013.tok.bpe.32000", 20), ("newstest2014.tok.bpe.32000", 20)):
        for lang, seed in (("en", 3), ("de", 5)):
            (raw / f"{name}.{lang}").write_text("\n".join(x.replace("house", "hou@@ se") for x in sentences(n, seed)) + "\n")
    out = tmp_path / "out"
    prep("wmt16_en_de.py", "--raw", raw, "--out", out)
    refs = lines(out / "raw" / "test.de")
    assert len(refs) == 20 and not any("@@" in x for x in refs)
    assert "hou@@" in (out / "bin" / "dict.de.txt").read_text()  # binarized with the BPE pieces


def test_cnn_dm_story_files(tmp_path):
    raw = tmp_path / "cnndm"
    urls = {}
    for split, n in (("train", 30), ("val", 4), ("test", 4)):
        urls[split] = [f"http://www.cnn.com/{split}/{i}.html" for i in range(n)]
        (raw / "url_lists").mkdir(parents=True, exist_ok=True)
        (raw / "url_lists" / f"all_{split}.txt").write_text("\n".join(urls[split]) + "\n")
    (raw / "cnn" / "stories").mkdir(parents=True)
    for split, us in urls.items():
        for i, u in enumerate(us):
            name = hashlib.sha1(u.encode()).hexdigest() + ".story"
            body = f"{sentences(5, i + 2)[4]} .\n\n{sentences(6, i + 1)[5]}\n\n@highlight\n\nfirst point\n\n@highlight\n\nsecond point\n"
            (raw / "cnn" / "stories" / name).write_text(body)
    out = tmp_path / "out"
    prep("cnn_dm.py", "--raw", raw, "--out", out, "--vocab", "200")
    assert lines(out / "raw" / "test.sum") == ["first point . second point ."] * 4
    assert len(lines(out / "raw" / "train.doc")) == 30 and "@highlight" not in (out / "raw" / "train.doc").read_text()
    (raw / "url_lists" / "all_test.txt").write_text("http://www.cnn.com/missing.html\n")
    r = prep("cnn_dm.py", "--raw", raw, "--out", tmp_path / "out2", "--vocab", "200", check=False)
    assert r.returncode == 1 and "missing.html" in r.stderr and "Traceback" not in r.stderr


def test_multi30k_records_checksums_of_its_sources(tmp_path):
    raw = require_data("multi30k")
    out = tmp_path / "m30k"
    prep("multi30k.py", "--raw", raw, "--out", out, "--limit", "500", "--eval-limit", "20", "--vocab", "500")
    recorded = dict(reversed(line.split("  ")) for line in lines(out / "CHECKSUMS"))
    with gzip.open(raw / "val.en.gz", "rb") as f:
        assert recorded["val.en.gz"] == hashlib.sha256(f.read()).hexdigest()
    assert len(recorded) == 6


@pytest.mark.parametrize("script,env", [("wikitext103.py", "WIKITEXT103_URL"), ("iwslt14.py", "IWSLT14_URL"),
                                        ("wmt16_en_de.py", "WMT16_URL")])
def test_offline_download_says_so(tmp_path, monkeypatch, script, env):
    monkeypatch.setenv(env, "http://127.0.0.1:9/unreachable.tgz")  # nothing listens on the discard port
    r = prep(script, "--out", tmp_path / "x", check=False)
    assert r.returncode == 1 and "Offline? Pass --raw DIR" in r.stderr and "Traceback" not in r.stderr


def test_download_progress_names_the_share_done_and_the_time_left(capsys):
    """copy_with_progress (the download loop) copies every byte and, with a known
    size, logs '[k%, M min, about N min left]' lines."""
    import importlib.util
    import io

    spec = importlib.util.spec_from_file_location("prep_common", ROOT / "data-prep" / "common.py")
    common = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(common)
    data = bytes(range(256)) * 16
    out = io.BytesIO()
    common.copy_with_progress(io.BytesIO(data), out, len(data), block=1024, every=0.0)
    assert out.getvalue() == data
    labels = re.findall(r"^\[data-prep\] \[(\d+)%, \d+ min, about \d+ min left\] 0 of 0 MiB$",
                        capsys.readouterr().err, re.M)
    assert labels == ["25", "50", "75", "100"]
