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


def average_checkpoints(paths, out):
    """Write a checkpoint whose model weights are the mean of those in `paths`
    (the last one's config and everything else are kept). Returns `out`."""
    allow_fairseq_checkpoints()
    states = [torch.load(p, map_location="cpu") for p in paths]
    merged = states[-1]
    for name, tensor in merged["model"].items():
        if tensor.is_floating_point():
            merged["model"][name] = sum(s["model"][name].double() for s in states).div(len(states)).to(tensor.dtype)
    merged.pop("last_optimizer_state", None)
    torch.save(merged, out)
    return out
