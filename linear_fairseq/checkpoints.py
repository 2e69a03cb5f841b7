"""Let fairseq checkpoints load under torch >= 2.6 (``torch.load(weights_only=True)``).

Checkpoints of dataclass-configured models (every linear_fairseq model) hold
only tensors and plain containers and load as they are. Checkpoints of
fairseq's argparse-configured models, such as the softmax ``transformer``
baselines this project compares against, also pickle an ``argparse.Namespace``.
A Namespace is a plain attribute bag that runs no code when unpickled, so it is
added to torch's allow-list; nothing else is, and nothing in fairseq is patched.
"""
import argparse

import torch

SAFE_GLOBALS = [argparse.Namespace]


def allow_fairseq_checkpoints() -> None:
    add = getattr(torch.serialization, "add_safe_globals", None)
    if add is not None:  # torch < 2.4 has no allow-list and loads everything
        add(SAFE_GLOBALS)
