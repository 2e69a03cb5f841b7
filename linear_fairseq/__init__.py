"""linear_fairseq: linear-time attention for fairseq sequence models.

Use as a fairseq plugin: ``fairseq-train --user-dir linear_fairseq ...``.
Importing the package registers its models, lets fairseq checkpoints load
under torch >= 2.6, and turns our errors (bad options, checkpoints that do not
fit) into one-line messages at the top of a fairseq command.
"""
from .checkpoints import allow_fairseq_checkpoints
from .errors import install_excepthook

allow_fairseq_checkpoints()
install_excepthook()

from .models import flash, memsizer, performer  # noqa: E402,F401  register the models
