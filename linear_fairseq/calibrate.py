"""Fit a linearized model's new attention parameters to the softmax attention
they replace, before any fine-tuning ("attention transfer": Hedgehog, arXiv
2402.04347; LoLCATs, arXiv 2410.10254).

The softmax model runs on a few training batches; at every attention it
replaces, the softmax weights A = softmax(q k^T / sqrt(d)) (masked as the
model masks them) are the target, and the linear module's own weights Â
(its ``attention_weights``: T2R's relu features, RFA's gate) are fitted by
Adam on KL(A_i || Â_i), averaged over the queries that are not padding. Each module is fitted alone, on the softmax
model's inputs to that layer; only the tensors the conversion initialized
fresh are trained, so everything copied from the softmax model stays exact.
"""
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
from torch import Tensor, nn

TINY = 1e-12


@dataclass
class Capture:
    """One batch at one attention: batch-first inputs and masks."""

    x: Tensor  # (B, T, C) queries' input
    source: Tensor  # (B, n, C) keys' input
    key_padding: Optional[Tensor]  # (B, n), True at padding
    query_padding: Optional[Tensor]  # (B, T)
    target: Tensor  # (B, H, T, n) the softmax weights


def softmax_weights(mha: nn.Module, x: Tensor, source: Tensor, key_padding: Optional[Tensor], causal: bool) -> Tensor:
    """fairseq MultiheadAttention's weights per head, (B, H, T, n), from batch-first inputs."""
    heads = lambda t: t.unflatten(-1, (mha.num_heads, mha.head_dim)).transpose(1, 2)  # noqa: E731
    logits = heads(mha.q_proj(x)) @ heads(mha.k_proj(source)).transpose(-1, -2) * mha.head_dim**-0.5
    if causal:
        T, n = logits.shape[-2:]
        logits = logits.masked_fill(torch.ones(T, n, dtype=torch.bool).triu(1), float("-inf"))
    if key_padding is not None:
        logits = logits.masked_fill(key_padding[:, None, None, :], float("-inf"))
    return torch.softmax(logits.float(), dim=-1).nan_to_num(0.0)  # a row with no visible key: all 0


def transfer_loss(target: Tensor, approx: Tensor, query_padding: Optional[Tensor]) -> Tensor:
    """Mean over non-padded queries of KL(target_i || approx_i) = sum_j target_ij
    (log target_ij - log approx_ij): the soft cross-entropy less the target's
    entropy, so 0 means equal weights."""
    ce = (target * (target.clamp_min(TINY).log() - approx.clamp_min(TINY).log())).sum(-1)  # (B, H, T)
    if query_padding is None:
        return ce.mean()
    keep = (~query_padding)[:, None, :].expand_as(ce)
    return ce[keep].mean()


def capture(softmax_model: nn.Module, names: List[str], batches) -> Dict[str, List[Capture]]:
    """Run the softmax model over `batches` (fairseq samples), recording each named
    attention's inputs, masks and weights. A name's role comes from its place:
    encoder self-attention, decoder self-attention (causal), or cross (encoder_attn)."""
    modules = dict(softmax_model.named_modules())
    records: Dict[str, List[Capture]] = {name: [] for name in names}
    pad, pad_index = {}, softmax_model.decoder.dictionary.pad()

    def hook(name):
        def record(mha, args, kwargs):
            query = kwargs.get("query", args[0] if args else None)
            key = kwargs.get("key", args[1] if len(args) > 1 else None)
            x, source = query.transpose(0, 1), key.transpose(0, 1)
            key_padding = kwargs.get("key_padding_mask")
            key_padding = None if key_padding is None else key_padding.to(torch.bool)
            cross = name.endswith("encoder_attn")
            query_padding = pad["target"] if name.startswith("decoder") else pad["source"]  # cross included
            causal = name.startswith("decoder") and not cross
            target = softmax_weights(mha, x, source, key_padding, causal)
            records[name].append(Capture(x, source, key_padding, query_padding, target))
        return record

    handles = [modules[name].register_forward_pre_hook(hook(name), with_kwargs=True) for name in names]
    softmax_model.eval()
    try:
        with torch.no_grad():
            for sample in batches:
                net_input = sample["net_input"]
                decoder_input = net_input.get("prev_output_tokens", net_input["src_tokens"])
                pad["source"] = net_input["src_tokens"].eq(pad_index)
                pad["target"] = decoder_input.eq(pad_index)
                softmax_model(**net_input)
    finally:
        for handle in handles:
            handle.remove()
    return records


def fit(module: nn.Module, params: List[nn.Parameter], records: List[Capture], steps: int, lr: float):
    """Adam on `params` (module's) over the recorded batches, in turn; returns the
    mean loss over all batches (before, after)."""
    def mean_loss() -> float:
        with torch.no_grad():
            return sum(float(loss(r)) for r in records) / len(records)

    def loss(r: Capture) -> Tensor:
        return transfer_loss(r.target, module.attention_weights(r.x, r.source, r.key_padding), r.query_padding)

    before = mean_loss()
    frozen = [p for p in module.parameters() if all(p is not q for q in params)]
    flags = [p.requires_grad for p in frozen]
    for p in frozen:
        p.requires_grad_(False)
    optimizer = torch.optim.Adam(params, lr=lr)
    try:
        for step in range(steps):
            optimizer.zero_grad()
            loss(records[step % len(records)]).backward()
            optimizer.step()
    finally:
        for p, flag in zip(frozen, flags):
            p.requires_grad_(flag)
    return before, mean_loss()


def fittable(model: nn.Module, initialized: set) -> dict:
    """{module name: (module, names of its parameters to fit)}: the attentions of
    `model` that can give their weights and have parameters named in `initialized`."""
    targets = {}
    for name, module in model.named_modules():
        if getattr(module, "gives_weights", False):
            params = [pname for pname, _ in module.named_parameters() if f"{name}.{pname}" in initialized]
            if params:
                targets[name] = (module, params)
    return targets


def calibrate(targets: dict, softmax_model: nn.Module, batches, steps: int, lr: float) -> dict:
    """Fit each of `targets` (from fittable) to the same-named attention of
    `softmax_model` on `batches`; returns {module name: (KL before, after)}."""
    records = capture(softmax_model, list(targets), batches)
    for module, _ in targets.values():
        module.eval()  # no dropout; the fitted values are what fine-tuning starts from
    return {name: fit(module, [module.get_parameter(p) for p in params], records[name], steps, lr)
            for name, (module, params) in targets.items()}
