"""How the package is found and imported: the --user-dir value from any
folder, the ops without fairseq, and a one-line hint when fairseq is missing."""
import os
import subprocess
import sys
from pathlib import Path

from conftest import ROOT

NO_FAIRSEQ = "import sys; sys.modules['fairseq'] = None  # as if fairseq were not installed\n"


def python(code, cwd):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd)


def test_ops_import_without_fairseq(tmp_path):
    r = python(NO_FAIRSEQ + "import linear_fairseq.ops.flash, linear_fairseq.ops.performer, linear_fairseq.ops.memsizer", ROOT)
    assert r.returncode == 0, r.stderr[-2000:]


def test_models_without_fairseq_say_what_to_install(tmp_path):
    r = python(NO_FAIRSEQ + "import linear_fairseq.models.memsizer", ROOT)
    assert r.returncode == 1
    assert "pip install --no-deps ve-fairseq==0.12.3" in r.stderr.splitlines()[-1]


def test_user_dir_from_any_folder(tmp_path):
    """`python -m linear_fairseq` prints the folder that --user-dir takes; fairseq
    then finds the architectures from another working directory."""
    r = subprocess.run([sys.executable, "-m", "linear_fairseq"], capture_output=True, text=True,
                       cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr[-2000:]
    user_dir = Path(r.stdout.strip())
    assert user_dir == ROOT / "linear_fairseq"
    train = Path(sys.executable).with_name("fairseq-train")
    cmd = [str(train), str(tmp_path), "--task", "language_modeling", "--arch", "memsizer_lm", "--cpu", "--max-tokens", "64"]
    without = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)
    assert "invalid choice: 'memsizer_lm'" in without.stderr
    with_dir = subprocess.run(cmd + ["--user-dir", str(user_dir)], capture_output=True, text=True, cwd=tmp_path)
    # the architecture is known; it stops at the empty data folder instead
    assert "invalid choice" not in with_dir.stderr and "dict.txt" in with_dir.stderr, with_dir.stderr[-2000:]
