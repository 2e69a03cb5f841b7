"""Shared test helpers: tiny fairseq models built through fairseq's own option
parsing, and the location of the real data beside the project."""
import copy
import functools
import os
import sys
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

# One thread a test process (and for the fairseq CLIs the tests start): the
# suite runs one process per core (scripts/test.sh: pytest -n auto), and tiny
# tensors run slower, not faster, when threads compete for the cores.
for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[var] = "1"
torch.set_num_threads(1)

# Triton kernels (fla-core's and ours) run on CPU tensors through Triton's
# interpreter where there is no CUDA device; the switch is read when a kernel
# is defined, so it is set before anything imports one.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import linear_fairseq  # noqa: E402,F401  registers the models
from fairseq import options  # noqa: E402
from fairseq.data import Dictionary  # noqa: E402
from fairseq.dataclass.utils import convert_namespace_to_omegaconf  # noqa: E402
from fairseq.models import build_model  # noqa: E402

DATA = Path(os.environ.get("LINEAR_FAIRSEQ_DATA", ROOT.parent / "shared" / "data"))

TINY_MT = (
    "--encoder-layers 2 --decoder-layers 2 --encoder-embed-dim 32 --decoder-embed-dim 32 "
    "--encoder-ffn-embed-dim 64 --decoder-ffn-embed-dim 64 "
    "--encoder-attention-heads 4 --decoder-attention-heads 4 --dropout 0"
).split()
TINY_LM = (
    "--decoder-layers 2 --decoder-embed-dim 32 --decoder-ffn-embed-dim 64 "
    "--decoder-attention-heads 4 --dropout 0 --tokens-per-sample 512"
).split()


def parse_model_args(arch, args=(), task="translation"):
    """The model config exactly as `fairseq-train --arch ARCH ARGS` would build it:
    parsed once a test process for each (arch, args, task), since fairseq's parse
    composes a hydra config (most of a tiny model's build time); every call gets
    a copy of its own."""
    return copy.deepcopy(parsed_model_args(arch, tuple(args), task))


@functools.lru_cache(maxsize=None)
def parsed_model_args(arch, args, task):
    parser = options.get_training_parser()
    ns = options.parse_args_and_arch(parser, ["/unused-data", "--task", task, "--arch", arch, *args])
    return convert_namespace_to_omegaconf(ns).model


def make_dictionary(size=40):
    d = Dictionary()
    for i in range(size):
        d.add_symbol(f"w{i}")
    return d


def make_model(arch, args=(), task="translation", vocab=40, seed=0):
    torch.manual_seed(seed)
    d = make_dictionary(vocab)
    stub_task = SimpleNamespace(source_dictionary=d, target_dictionary=d)
    model = build_model(parse_model_args(arch, args, task), stub_task)
    return model.eval(), d


def random_tokens(d, B, T, seed=0):
    """Tokens drawn from the real symbols (no specials)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(d.nspecial, len(d), (B, T), generator=g)


def require_data(name):
    path = DATA / name
    if not path.is_dir():
        pytest.skip(f"real data not found at {path} (set LINEAR_FAIRSEQ_DATA to the folder holding {name}/)")
    return path


@pytest.fixture
def triton_device(monkeypatch):
    """Where Triton kernels run: "cuda", or "cpu" through Triton's interpreter
    (skips where Triton does not import). The interpreter cannot time an
    autotuner's configurations, so there each autotuned kernel takes its first."""
    try:
        import triton.runtime.autotuner as autotuner
    except Exception as error:
        pytest.skip(f"Triton does not import ({type(error).__name__}); `pip install triton` runs its kernels "
                    f"on CPU through its interpreter")
    if torch.cuda.is_available():
        return "cuda"
    monkeypatch.setattr(autotuner.Autotuner, "_bench", lambda self, *args, config, **kwargs: [0.0, 0.0, 0.0])
    return "cpu"


def pytest_collection_modifyitems(config, items):
    """Files with end-to-end (slow) tests run first, the file with the most such
    tests first; a file's tests keep their order. scripts/test.sh hands whole
    files to its workers in this order (pytest-xdist --dist loadfile
    --no-loadscope-reorder), so the long files start early and the many short
    ones even out the workers at the end."""
    slow = Counter(item.path for item in items if item.get_closest_marker("slow"))
    items.sort(key=lambda item: -slow[item.path])
