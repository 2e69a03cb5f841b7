"""Checkpoint averaging for the reproduce scripts (--average N)."""
import torch

from linear_fairseq.checkpoints import allow_fairseq_checkpoints


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
