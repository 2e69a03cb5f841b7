"""linear_fairseq: linear-time attention for fairseq sequence models.

Use as a fairseq plugin: ``fairseq-train --user-dir linear_fairseq ...``
(``python -m linear_fairseq`` prints the folder to pass from anywhere).
Importing the package registers every family in ``models/`` (each models file
registers its fairseq models and its ``families`` entry), lets fairseq
checkpoints load under torch >= 2.6, turns our errors (bad options,
checkpoints that do not fit) into one-line messages at the top of a fairseq
command, and leaves out the deprecation warnings fairseq's own use of hydra
and torch raises on every run and the configuration dump at its start
(``quiet.py``: those messages only; LINEAR_FAIRSEQ_VERBOSE=1 keeps them). The math in ``linear_fairseq.ops`` needs torch alone, so it imports
without fairseq.
"""
import importlib
import pkgutil

from .checkpoints import allow_fairseq_checkpoints
from .errors import install_excepthook
from .quiet import quiet_fairseq

allow_fairseq_checkpoints()
install_excepthook()
quiet_fairseq()

try:
    import fairseq  # noqa: F401
except ModuleNotFoundError as err:  # the ops still import; linear_fairseq.models says what to install
    if err.name != "fairseq":
        raise
else:
    from . import models

    for _module in sorted(m.name for m in pkgutil.iter_modules(models.__path__)):
        importlib.import_module(f"{models.__name__}.{_module}")  # each registers its family
