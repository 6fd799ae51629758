"""Label inference from the last layer's gradient: iDLG's sign rule for one example, count estimates for batches.

With the client's mean cross-entropy over B examples, the last layer's bias gradient is
g_b[c] = (1/B) Σ_n (p_nc - y_nc), so the number of examples of class c is exactly
count_c = Σ_n p_nc - B·g_b[c]. The server does not know Σ_n p_nc; like Geng et al. (2021) it
estimates the mean softmax output p̄ of the (known) model on dummy inputs and sets
count_c ≈ B·(p̄_c - g_b[c]); a class with g_b[c] < 0 is certainly present (Wainakh et al.'s LLG
observation), and the estimates are rounded to non-negative integers summing to B. Without a
last-layer bias the weight rows' sums play the same role, scaled by the mean L1 norm of the
penultimate features (assumed non-negative: sigmoid or ReLU in front of the last layer).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from attacks.base import trainable_parameters
from attacks.problems import attack_copy
from fedsim.errors import FedsimError

METHODS = ("auto", "idlg", "bias", "weight")


@dataclass
class LabelEstimate:
    """Inferred labels (sorted by class: order carries no information), per-class counts and the method used."""

    labels: torch.Tensor
    counts: torch.Tensor
    method: str


def last_layer(model: nn.Module, num_classes: int) -> tuple[nn.Linear, int, int | None]:
    """The classifier layer (last nn.Linear with num_classes outputs) and the indices of its weight and
    bias among the trainable parameters (bias index None when it has no trainable bias)."""
    layers = [m for m in model.modules() if isinstance(m, nn.Linear) and m.out_features == num_classes]
    if not layers:
        raise FedsimError(f"label inference needs a final nn.Linear with {num_classes} outputs; none found")
    layer = layers[-1]
    index = {id(p): i for i, p in enumerate(trainable_parameters(model))}
    if id(layer.weight) not in index:
        raise FedsimError("label inference needs the gradient of the last layer's weight (it is frozen)")
    bias = index.get(id(layer.bias)) if layer.bias is not None else None
    return layer, index[id(layer.weight)], bias


def dummy_statistics(
    model: nn.Module, layer: nn.Linear, input_shape: tuple[int, ...], *, samples: int = 64, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean softmax output p̄ [K] and mean L1 norm of the last layer's input, on uniform-noise images."""
    device = next(model.parameters()).device
    x = torch.rand(samples, *input_shape, generator=torch.Generator().manual_seed(seed)).to(device)
    copy = attack_copy(model, device)
    copy_layer = [m for m in copy.modules() if isinstance(m, nn.Linear) and m.out_features == layer.out_features][-1]
    features: list[torch.Tensor] = []
    handle = copy_layer.register_forward_hook(lambda _m, inp, _out: features.append(inp[0].detach()))
    try:
        with torch.no_grad():
            probs = torch.softmax(copy(x).double(), dim=-1).mean(0)
    finally:
        handle.remove()
    return probs, features[0].double().flatten(1).sum(1).mean()


def round_counts(estimate: torch.Tensor, present: torch.Tensor, total: int) -> torch.Tensor:
    """Non-negative integer counts summing to `total`, nearest to `estimate`, >= 1 for `present` classes."""
    estimate = estimate.double()
    if int(present.sum()) > total:  # more negative entries than examples: keep the most certain ones
        keep = torch.zeros_like(present)
        keep[torch.topk(estimate.masked_fill(~present, -float("inf")), total).indices] = True
        present = keep
    floor = present.long()
    counts = torch.maximum(estimate.round().clamp(min=0).long(), floor)
    while int(counts.sum()) > total:  # remove where the count overshoots its estimate most
        excess = (counts - estimate).masked_fill(counts <= floor, -float("inf"))
        counts[int(excess.argmax())] -= 1
    while int(counts.sum()) < total:  # add where the estimate exceeds the count most
        counts[int((estimate - counts).argmax())] += 1
    return counts


def counts_to_labels(counts: torch.Tensor) -> torch.Tensor:
    """[B] labels, sorted by class, from per-class counts."""
    return torch.repeat_interleave(torch.arange(counts.numel()), counts.cpu()).long()


def infer_labels(
    model: nn.Module,
    gradients: list[torch.Tensor],
    batch_size: int,
    num_classes: int,
    input_shape: tuple[int, ...],
    *,
    method: str = "auto",
    seed: int = 0,
) -> LabelEstimate:
    """Infer the labels behind a gradient (or pseudo-gradient) of the mean cross-entropy.

    method "idlg": Zhao et al. 2020, one example: the weight row whose sum is negative.
    "bias": counts from the last-layer bias gradient (exact for one example). "weight": the same
    from the weight rows' sums, for a last layer without bias. "auto": bias when there is one.
    """
    if method not in METHODS:
        raise FedsimError(f"unknown label method {method!r}; choose one of: {', '.join(METHODS)}")
    if batch_size < 1:
        raise FedsimError(f"batch_size must be >= 1, got {batch_size}")
    layer, w_idx, b_idx = last_layer(model, num_classes)
    if method == "auto":
        method = "bias" if b_idx is not None else "weight"
    if method == "bias" and b_idx is None:
        raise FedsimError("label method 'bias' needs a last layer with a trainable bias; use 'weight'")
    row_sums = gradients[w_idx].detach().double().sum(1).cpu()
    if method == "idlg":
        if batch_size != 1:
            raise FedsimError("label method 'idlg' recovers one label; use 'bias' or 'weight' for batches")
        counts = torch.zeros(num_classes, dtype=torch.long)
        counts[int(row_sums.argmin())] = 1
        return LabelEstimate(counts_to_labels(counts), counts, "idlg")
    probs, feature_l1 = dummy_statistics(model, layer, input_shape, seed=seed)
    probs = probs.cpu()
    if method == "bias":
        signal = gradients[b_idx].detach().double().cpu()
    else:  # row sums ≈ (1/B) Σ_n (p_nc - y_nc)·|h_n|_1: divide by the typical feature mass
        signal = row_sums / feature_l1.clamp(min=1e-12).cpu()
    estimate = batch_size * (probs - signal)
    counts = round_counts(estimate, signal < 0, batch_size)
    return LabelEstimate(counts_to_labels(counts), counts, method)


def last_layer_features(model: nn.Module, gradients: list[torch.Tensor], num_classes: int) -> torch.Tensor | None:
    """The input features [F] of the last layer for one example, in closed form from its gradient (None
    without a trainable last-layer bias).

    With the mean cross-entropy of one example the last layer's gradients are g_b = p - y and
    g_W = g_b h^T, so h = g_W^T g_b / ||g_b||² exactly: least squares over the classes.
    """
    _, w_idx, b_idx = last_layer(model, num_classes)
    if b_idx is None:
        return None
    g_w, g_b = gradients[w_idx].detach().double(), gradients[b_idx].detach().double()
    return (g_w.T @ g_b / (g_b @ g_b).clamp(min=1e-300)).float()
