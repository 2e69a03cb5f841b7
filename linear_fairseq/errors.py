"""One-line errors for bad options, checkpoints and inputs.

``ConfigError`` (a ValueError) carries a message that names the bad value.
When one reaches the top of a fairseq command (fairseq-train, -generate, ...)
the plugin prints ``error: <message>`` and exits with status 1 instead of a
traceback; fairseq re-raising it as another exception ("Cannot load model
parameters ...") prints both messages. Set LINEAR_FAIRSEQ_TRACEBACK=1 to get
the full traceback. A few failures inside fairseq that a flag explains
(``KNOWN_FAILURES``) get a one-line fix the same way. Other exceptions are
untouched.
"""
import os
import re
import sys
from pathlib import Path

from hydra.errors import CompactHydraException


class ConfigError(ValueError, CompactHydraException):
    """A bad option, checkpoint or input, explained in one message. As a
    CompactHydraException, fairseq-hydra-train prints the message alone too."""


def _cause(exc):
    """The ConfigError that `exc` is or was raised while handling, if any."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, ConfigError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def _flag(*names) -> bool:
    return any(arg in names for arg in sys.argv[1:])


def _option(name: str):
    """The value the command line gives option `name` (--name V or --name=V), or None."""
    args = sys.argv[1:]
    values = [v for flag, v in zip(args, args[1:]) if flag == name]
    values += [a.split("=", 1)[1] for a in args if a.startswith(name + "=")]
    return values[-1] if values else None


def _checkpoint_args() -> str:
    """The checkpoint files the command line names (--path a.pt:b.pt, --restore-file,
    ...); for fairseq-train without them, the checkpoint it resumes from."""
    files = [v for v in map(_option, ("--path", "--restore-file", "--finetune-from-model")) if v is not None]
    if files:
        return ", ".join(files)
    if sys.argv[0].endswith("fairseq-train"):
        return str(Path(_option("--save-dir") or "checkpoints") / "checkpoint_last.pt")
    return "the checkpoint"


def _unreadable_checkpoint(exc) -> str:
    fix = ("move it away to start afresh, or resume from a numbered checkpoint_E_U.pt of the same run with "
           "--restore-file" if sys.argv[0].endswith("fairseq-train") and not _flag("--finetune-from-model")
           else "use another checkpoint, e.g. a numbered checkpoint_E_U.pt from the same run")
    return f"cannot read {_checkpoint_args()}: the file is empty or truncated (a copy or save that was cut short); {fix}"


def _loading_checkpoint(exc) -> bool:
    """Whether `exc` was raised by torch.load (torch/serialization.py at the bottom of its traceback)."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and tb.tb_frame.f_code.co_filename.endswith(os.path.join("torch", "serialization.py"))


def _missing_checkpoint(exc) -> str:
    path = str(exc).split("Model file not found:", 1)[1].strip()
    return f"{path}: no such checkpoint file; check --path (a relative path is taken from where the command runs)"


def _max_positions(exc) -> str:
    """'max_positions=64' or 'max_positions=(1024, 1024)' from fairseq's message."""
    found = re.search(r"since (max_positions=(\([^)]*\)|[^,\s]+))", str(exc))
    return found[1] if found else "max_positions"


# (exception type, words in its message, when it applies, the one-line fix)
KNOWN_FAILURES = [
    (AssertionError, "Torch not compiled with CUDA enabled", lambda e: _flag("--fp16", "--memory-efficient-fp16"),
     lambda e: "--fp16 without a GPU: fairseq flattens the fp32 master gradients on CUDA; add --fp16-no-flatten-grads"),
    (AttributeError, "'xla_device'", lambda e: _flag("--bf16"),
     lambda e: "fairseq-train --bf16 turns on fairseq's TPU path (--tpu); without a TPU use fairseq-hydra-train with "
     "common.bf16=true common.fp16_no_flatten_grads=true (docs/running-at-scale.md)"),
    (RuntimeError, "PytorchStreamReader failed", lambda e: True, _unreadable_checkpoint),
    (EOFError, "", lambda e: _flag("--path", "--restore-file", "--finetune-from-model"), _unreadable_checkpoint),
    (OSError, "Invalid argument", _loading_checkpoint, _unreadable_checkpoint),  # torch's zip reader, cut early
    (OSError, "Model file not found:", lambda e: True, _missing_checkpoint),  # fairseq's load_model_ensemble
    (Exception, "since max_positions=", lambda e: True,  # fairseq's batching of a too-long input
     lambda e: f"an input is longer than the model's positions ({_max_positions(e)}): pass "
     "--skip-invalid-size-inputs-valid-test to skip such inputs, or shorten them"),
    (ValueError, "loaded state dict contains a parameter group that doesn't match the size of optimizer's group",
     lambda e: True,  # torch's Optimizer.load_state_dict, resuming a run whose parameters were laid out otherwise
     lambda e: f"the optimizer state in {_checkpoint_args()} holds other parameters than this model (a run saved "
     "before a self-attention's q/k/v (MemSizer's Phi/W_l/W_r) or a GAU's U/V/Z became one matrix, or with other "
     "model options); add "
     "--reset-optimizer to resume from its weights with the optimizer started anew, or move it away to start afresh"),
    (AttributeError, "supported_targets", lambda e: sys.argv[0].endswith("fairseq-eval-lm"),
     lambda e: f"{_checkpoint_args()} is a translation (encoder-decoder) model, and fairseq-eval-lm scores language "
     "models: decode it with fairseq-generate"),  # fairseq's own transformer, as our models say themselves
]


def known_failure(exc):
    """The one-line fix for a fairseq failure in KNOWN_FAILURES, or None."""
    for kind, words, applies, fix in KNOWN_FAILURES:
        if isinstance(exc, kind) and words in str(exc) and applies(exc):
            return fix(exc)
    return None


def install_excepthook() -> None:
    previous = sys.excepthook
    if getattr(previous, "linear_fairseq", False):
        return

    def hook(kind, exc, tb):
        cause = _cause(exc)
        if os.environ.get("LINEAR_FAIRSEQ_TRACEBACK"):
            return previous(kind, exc, tb)
        if cause is None:
            fix = known_failure(exc)
            if fix is None:
                return previous(kind, exc, tb)
            print(f"error: {fix}", file=sys.stderr)
            sys.stderr.flush()
            return
        if exc is not cause:
            print(f"error: {exc}", file=sys.stderr)
        print(f"error: {cause}", file=sys.stderr)
        sys.stderr.flush()

    hook.linear_fairseq = True
    sys.excepthook = hook
