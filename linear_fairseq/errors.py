"""One-line errors for bad options, checkpoints and inputs.

``ConfigError`` (a ValueError) carries a message that names the bad value.
When one reaches the top of a fairseq command (fairseq-train, -generate, ...)
the plugin prints ``error: <message>`` and exits with status 1 instead of a
traceback; fairseq re-raising it as another exception ("Cannot load model
parameters ...") prints both messages. Set LINEAR_FAIRSEQ_TRACEBACK=1 to get
the full traceback. Other exceptions are untouched.
"""
import os
import sys


class ConfigError(ValueError):
    """A bad option, checkpoint or input, explained in one message."""


def _cause(exc):
    """The ConfigError that `exc` is or was raised while handling, if any."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, ConfigError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def install_excepthook() -> None:
    previous = sys.excepthook
    if getattr(previous, "linear_fairseq", False):
        return

    def hook(kind, exc, tb):
        cause = _cause(exc)
        if cause is None or os.environ.get("LINEAR_FAIRSEQ_TRACEBACK"):
            return previous(kind, exc, tb)
        if exc is not cause:
            print(f"error: {exc}", file=sys.stderr)
        print(f"error: {cause}", file=sys.stderr)
        sys.stderr.flush()

    hook.linear_fairseq = True
    sys.excepthook = hook
