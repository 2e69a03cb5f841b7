"""linear_fairseq: linear-time attention for fairseq sequence models.

Use as a fairseq plugin: ``fairseq-train --user-dir linear_fairseq ...``
(``python -m linear_fairseq`` prints the folder to pass from anywhere).
Importing the package registers every family's models (each file in
``models/`` registers one family); nothing else, except in a fairseq command
line, which also gets one-line errors, quiet output and loadable softmax
checkpoints (``cli.py`` says what and how to turn each off). The math in
``linear_fairseq.ops`` needs torch alone, so it imports without fairseq.
"""
import importlib
import pkgutil

try:
    import fairseq  # noqa: F401
except ModuleNotFoundError as err:  # the ops still import; linear_fairseq.models says what to install
    if err.name != "fairseq":
        raise
else:
    from . import cli, models

    for _module in sorted(m.name for m in pkgutil.iter_modules(models.__path__)):
        importlib.import_module(f"{models.__name__}.{_module}")  # each family's file registers it
    if cli.is_fairseq_command():
        cli.prepare_command()
