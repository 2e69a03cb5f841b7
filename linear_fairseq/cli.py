"""What a fairseq command line (fairseq-train, -generate, -eval-lm,
-interactive, -hydra-train, ``python -m fairseq_cli.<cli>``) gets from the
plugin besides its models, set up when the package is imported by one:

* checkpoints of fairseq's argparse-configured models (the softmax baselines)
  load under torch >= 2.6 (``checkpoints.allow_fairseq_checkpoints``);
* our errors (bad options, checkpoints that do not fit) and a few fairseq
  failures a flag explains end the command with one line, not a traceback
  (``errors.install_excepthook``; LINEAR_FAIRSEQ_TRACEBACK=1 keeps it);
* the warnings fairseq's own use of hydra and torch raises on every run, and
  the configuration dump at its start, are left out (``quiet.quiet_fairseq``;
  LINEAR_FAIRSEQ_VERBOSE=1 keeps them).

Importing the package elsewhere (a Python session, a test, a script) changes
none of this; call ``prepare_command()`` to get the same.
"""
import os
import sys

from .checkpoints import allow_fairseq_checkpoints
from .errors import install_excepthook
from .quiet import quiet_fairseq


def is_fairseq_command(argv0: str = None) -> bool:
    """Whether this process is one of fairseq's command lines."""
    path = sys.argv[0] if argv0 is None else argv0
    return os.path.basename(path).startswith("fairseq-") or os.path.basename(os.path.dirname(path)) == "fairseq_cli"


def prepare_command() -> None:
    allow_fairseq_checkpoints()
    install_excepthook()
    quiet_fairseq()
