"""linear_fairseq: linear-time attention for fairseq sequence models.

Use as a fairseq plugin: ``fairseq-train --user-dir linear_fairseq ...``.
Importing the package registers its models and lets fairseq checkpoints load
under torch >= 2.6.
"""
from .checkpoints import allow_fairseq_checkpoints

allow_fairseq_checkpoints()

from .models import flash, memsizer, performer  # noqa: E402,F401  register the models
