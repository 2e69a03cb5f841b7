"""docs/development.md's recipe for a new family, done as a contributor would:
a copy of the project gets the toy family's three files (tests/toy_family:
ops, module, models; a decayed running mean of values) and nothing else is
edited. The family then trains and decodes with beam search through the stock
fairseq CLIs in both model kinds, passes the decoding contract tests (which
take their cases from the family records), and appears in every list the
tools read."""
import random
import re
import shutil
import subprocess
import sys

import pytest

import forked
from conftest import ROOT

pytestmark = pytest.mark.slow

TOY = ROOT / "tests" / "toy_family"
COPIED = ("linear_fairseq", "scripts", "benchmarks", "configs", "tests/conftest.py",
          "tests/test_decoding_contract.py")
TRAIN = ("--decoder-layers 1 --decoder-embed-dim 32 --decoder-ffn-embed-dim 64 --decoder-attention-heads 2 "
         "--optimizer adam --lr 1e-3 --max-tokens 512 --max-update 4 --no-epoch-checkpoints --no-progress-bar "
         "--num-workers 0 --seed 1").split()
SMALL = {"translation": TRAIN + "--encoder-layers 1 --encoder-embed-dim 32 --encoder-ffn-embed-dim 64 "
                                "--encoder-attention-heads 2".split(),
         "language_modeling": TRAIN + ["--tokens-per-sample", "16"]}


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """The project with the toy family's files added, and a tiny binarized corpus."""
    root = tmp_path_factory.mktemp("project")
    for path in COPIED:
        source, target = ROOT / path, root / path
        if source.is_dir():
            shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__", "results"))
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(source, target)
    for file in TOY.rglob("*.py"):
        assert not (root / "linear_fairseq" / file.relative_to(TOY)).exists(), "the toy family only adds files"
        shutil.copy(file, root / "linear_fairseq" / file.relative_to(TOY))
    return root, corpus(root / "data")


def corpus(folder):
    """Random 'sentences' over 20 words, the target a copy of the source, binarized."""
    rng = random.Random(0)
    folder.mkdir()
    for split, n in (("train", 200), ("valid", 20)):
        lines = [" ".join(f"w{rng.randrange(20)}" for _ in range(rng.randrange(3, 9))) for _ in range(n)]
        for lang in ("src", "tgt"):
            (folder / f"{split}.{lang}").write_text("\n".join(lines) + "\n")
    subprocess.run(["fairseq-preprocess", "--source-lang", "src", "--target-lang", "tgt",
                    "--trainpref", folder / "train", "--validpref", folder / "valid", "--joined-dictionary",
                    "--destdir", folder / "bin", "--workers", "1"], check=True, capture_output=True)
    return folder / "bin"


def fairseq(project, cli, *args):
    root, _ = project
    result = forked.run([f"fairseq-{cli}", *map(str, args), "--user-dir", str(root / "linear_fairseq")])
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.mark.parametrize("arch,task", [("runmean_transformer", "translation"), ("runmean_lm", "language_modeling")])
def test_the_toy_family_trains_and_decodes_with_beam_search(project, tmp_path, arch, task):
    _, data = project
    if task == "language_modeling":  # the LM reads the source side as its text
        (data / "dict.txt").write_text((data / "dict.src.txt").read_text())
        for split in ("train", "valid"):
            for ext in ("bin", "idx"):
                shutil.copy(data / f"{split}.src-tgt.src.{ext}", data / f"{split}.{ext}")
    fairseq(project, "train", data, "--arch", arch, "--task", task, *SMALL[task], "--save-dir", tmp_path)
    checkpoint = tmp_path / "checkpoint_last.pt"
    if task == "translation":
        out = fairseq(project, "generate", data, "--path", checkpoint, "--beam", 3, "--batch-size", 8,
                      "--gen-subset", "valid", "--max-len-b", 10).stdout
        hyps = re.findall(r"^H-\d+\t(-?[\d.]+)\t", out, flags=re.M)
    else:
        prompts = "w1 w2\nw3\n"
        result = forked.run(["fairseq-interactive", str(data), "--task", task, "--path", str(checkpoint),
                             "--beam", "3", "--max-len-b", "6", "--user-dir",
                             str(project[0] / "linear_fairseq")], input=prompts)
        assert result.returncode == 0, result.stderr[-3000:]
        hyps = re.findall(r"^H-\d+\t(-?[\d.]+)\t", result.stdout, flags=re.M)
    assert hyps and all(float(score) <= 0 for score in hyps), "beam search gave no scored hypotheses"


def test_the_toy_family_passes_the_decoding_contract_tests(project):
    root, _ = project
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "0", "-k", "runmean",
                             "tests/test_decoding_contract.py"], cwd=root, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:]
    passed = int(re.search(r"(\d+) passed", result.stdout)[1])
    assert passed >= 30 and "failed" not in result.stdout, result.stdout[-500:]


def test_the_toy_family_is_in_every_list_the_tools_read(project):
    root, _ = project
    check = (
        "import sys; sys.path.insert(0, '.')\n"
        "import scripts.reproduce as r, benchmarks.models as b\n"
        "from scripts import options_doc\n"
        "from linear_fairseq import families\n"
        "assert families.names()[-1] == 'runmean', families.names()\n"
        "assert 'runmean' in r.FAMILIES and 'runmean' in b.FAMILIES\n"
        "print(options_doc.render())\n"
    )
    result = subprocess.run([sys.executable, "-c", check], cwd=root, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "## runmean: a toy family" in result.stdout and "runmean-decay" in result.stdout


def test_a_bad_toy_option_is_one_line(project, tmp_path):
    root, data = project
    result = forked.run(["fairseq-train", str(data), "--arch", "runmean_transformer", "--runmean-decay", "2",
                         *SMALL["translation"], "--save-dir", str(tmp_path), "--user-dir", str(root / "linear_fairseq")])
    assert result.returncode != 0
    assert "--runmean-decay=2.0: must be in (0, 1]" in result.stderr and "Traceback" not in result.stderr
