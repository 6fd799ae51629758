"""The closed-form start of DLG and iDLG's defaults, before any gradient matching.

For one example, the last fully connected layer's input comes out of its gradient in closed form
(h = g_Wᵀ g_b / ||g_b||², attacks.labels.last_layer_features), and so does the label (attacks.labels). The dummy
image is first fitted to h, one backward pass per evaluation instead of matching's double backward, and DLG's
soft label starts at the label read off the same gradient. Gradient matching (attacks/dlg.py) then finishes.

Why the label start: DLG's label logits start `label_gap` (20) at that class, 0 elsewhere, so the soft label
starts one-hot instead of at softmax(N(0, 1)). The gradient is zero when the soft label equals the model's
prediction, and the untrained LeNet predicts one class with p ≈ 0.8 whatever the photo, so for the photos of
that class the true gradient is small (∝ 1 − p_y, ~40 times below the others) and a noise start falls towards
that trivial point; measured, all four such photos of 20 stayed at 24-28 dB while iDLG (labels fixed)
reached 31-35 dB on them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.func import functional_call

from attacks.base import AttackTarget
from attacks.labels import infer_labels, last_layer_features
from attacks.lbfgs import BatchedLBFGS
from attacks.problems import Problems, value_and_grad
from fedsim.errors import FedsimError


def closed_form_features(
    targets: Sequence[AttackTarget], problems: Problems, restarts: int
) -> tuple[torch.Tensor | None, str]:
    """Per problem [K, F] (each target's row once per restart), the last layer's input features from its
    gradient, or None and why not: they need an undefended FedSGD gradient of one example and a last nn.Linear
    with a trainable bias."""
    first = targets[0]
    if problems.objective != "gradient" or problems.examples != 1 or problems.aware:
        return None, "features need an undefended FedSGD gradient of one example; drew noise"
    try:
        rows = [last_layer_features(first.model, s, first.num_classes) for s in problems.signals]
    except FedsimError as exc:
        return None, f"{exc}; drew noise"
    if rows[0] is None:
        return None, "features need a last layer with a trainable bias; drew noise"
    device = problems.scale.device
    return torch.stack([h.to(device) for h in rows for _ in range(restarts)]), ""


def closed_form_labels(
    targets: Sequence[AttackTarget], problems: Problems, z0: torch.Tensor, numel: int, restarts: int, gap: float
) -> torch.Tensor:
    """DLG's label logits (the entries of z after the `numel` image entries) set to `gap` at the label inferred
    from each target's last layer, 0 elsewhere. `infer_labels` reads only the model's layout (which parameter is
    the last layer), never its weights, and every target of one batch has the same layout (`batching_key`), so
    the first target's model serves all."""
    first, z = targets[0], z0.clone()
    for j, signal in enumerate(problems.signals):
        shape = tuple(first.input_shape)
        label = infer_labels(first.model, signal, 1, first.num_classes, shape).labels.reshape(-1)[0]
        logits = torch.zeros(first.num_classes, dtype=z.dtype, device=z.device)
        logits[int(label)] = gap
        z[j * restarts : (j + 1) * restarts, numel:] = logits
    return z


def fit_features(
    problems: Problems,
    z0: torch.Tensor,
    numel: int,
    shape: tuple,
    features: torch.Tensor,
    *,
    to_images: Callable[[torch.Tensor], torch.Tensor],
    grey: float,
    steps: int,
    max_iter: int,
    history_size: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fit the dummy images (the first `numel` entries of each row of z0) to the closed-form features: `steps`
    L-BFGS steps with the Armijo line search, from `grey` plus a tenth of the restart's noise. Returns the new
    initial variables (a fit that failed keeps its noise), evaluations per problem and the relative error."""
    layer = [m for m in problems.model.modules() if isinstance(m, nn.Linear)][-1]
    seen: list[torch.Tensor] = []

    def feature_loss(p: dict, c: dict, z: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        seen.clear()
        functional_call(problems.model, {**p, **c}, (to_images(z.view(shape)),))
        return ((seen[0].flatten() - h) ** 2).sum() / (h**2).sum().clamp(min=1e-30)

    handle = layer.register_forward_hook(lambda _m, inp, _out: seen.append(inp[0]))
    try:
        images = z0[:, :numel]
        fn = value_and_grad(feature_loss, problems.k, (0, 0, 0, 0), argnum=2)
        fit = BatchedLBFGS(
            (images * 0.1 + grey).clone(),
            lambda z_: fn(problems.params, problems.consts, z_, features),
            max_iter=max_iter,
            history_size=history_size,
            reset_stalled=True,
            line_search="armijo",
        )
        for _ in range(steps):
            fit.step()
            fit.frozen |= fit.loss <= 1e-8
            if bool(fit.frozen.all()):
                break
        loss, _ = fit.evaluate(torch.ones_like(fit.frozen))
    finally:
        handle.remove()
    ok = torch.isfinite(loss) & torch.isfinite(fit.z).all(1)
    z = z0.clone()
    z[:, :numel] = torch.where(ok[:, None], fit.z, images)
    return z, fit.evaluations.cpu(), loss.cpu()


def closed_form_start(
    attack, targets: Sequence[AttackTarget], problems: Problems, z0: torch.Tensor, numel: int, shape: tuple, r: int
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None, str, str]:
    """DLG's (`attack`'s) starting variables from the noise z0 ([K, numel + labels], `r` restarts per target):
    with init "features" and a closed form, the images fitted to the features and, when DLG optimises the
    labels, the label logits at the label read off the gradient. Returns the variables, (feature evaluations,
    feature error) per problem or None when no fit ran, the label start and why there was no fit ("" if none)."""
    features, init_note = closed_form_features(targets, problems, r) if attack.init == "features" else (None, "")
    if features is None:
        return z0, None, "noise", init_note
    grey = 0.0 if attack.image_param == "sigmoid" else 0.5
    z0, feature_evals, feature_error = fit_features(
        problems, z0, numel, shape, features, to_images=attack._images, grey=grey,
        steps=attack.feature_iterations, max_iter=attack.max_iter, history_size=attack.history_size,
    )  # fmt: skip
    label_init = "noise"
    if attack.optimise_labels:  # the soft labels start at the closed-form label
        z0, label_init = closed_form_labels(targets, problems, z0, numel, r, attack.label_gap), "closed-form"
    return z0, (feature_evals, feature_error), label_init, init_note
