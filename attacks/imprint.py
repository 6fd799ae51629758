"""The imprint attack of Robbing the Fed (Fowl et al., ICLR 2022): closed-form images from a tampered model's update.

The server put an imprint block (fedsim/imprint.py) in front of the model: row k of its linear layer is active
for the images whose statistic exceeds q_k, and every active row receives the same gradient g_n·x_n from image
n. Row k's weight gradient minus row k+1's is then the sum of g_n·x_n over the images whose statistic falls in
[q_k, q_k+1), and likewise the bias gradients sum g_n; for an image alone in its bin their ratio is the image.
The same holds for a FedAvg update (the pseudo-gradient sums every local step's gradient, each a multiple of
the same image) and for a secure aggregate of many clients (a sum of updates is a bigger batch).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from attacks.base import Attack, AttackTarget, Progress, Trial, observed_signal, trainable_parameters
from attacks.base import cross_entropy as _ce
from attacks.labels import infer_labels
from attacks.problems import attack_copy
from fedsim.errors import FedsimError
from fedsim.imprint import ImprintBlock


def imprint_block(target: AttackTarget) -> ImprintBlock:
    """The target model's imprint block, whose weight and bias must be the first trainable parameters."""
    block = getattr(target.model, "imprint", None)
    params = trainable_parameters(target.model)
    if not isinstance(block, ImprintBlock) or len(params) < 2 or params[0] is not block.linear.weight:
        raise FedsimError(
            "the imprint attack needs a capture of a run with server-mode = imprint (a model behind a trainable "
            "imprint block); use dlg, idlg, grnn or analytic for this one"
        )
    return block


def bin_differences(g_w: torch.Tensor, g_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-bin sums: row k minus row k+1 (the last row stands alone), for the weights and the biases."""
    d_w, d_b = g_w.clone(), g_b.clone()
    d_w[:-1] -= g_w[1:]
    d_b[:-1] -= g_b[1:]
    return d_w, d_b


def on_pixel_grid(x: torch.Tensor, levels: int = 255, tolerance: float = 0.05) -> torch.Tensor:
    """Per image: inside [0, 1] and on the 8-bit grid the data came in, the mark of an image alone in its bin
    (a mixture of two images lies off the grid)."""
    flat = x.flatten(1) * levels
    inside = (x.flatten(1) >= -tolerance / levels).all(1) & (x.flatten(1) <= 1 + tolerance / levels).all(1)
    return inside & ((flat - flat.round()).abs().amax(1) < tolerance)


class Imprint(Attack):
    """Exact images from the bins of an imprint block; closed form, so restarts and seeds do not matter.

    Returns as many images as the update has examples (num-examples): the bins with the largest bias
    gradients first; slots no bin fills are mid-grey. info["exact"] counts the images on the 8-bit grid.
    """

    name = "imprint"
    batchable = False

    def __init__(self, *, min_bias_grad: float = 1e-7, cpu_threads: int | None = 1) -> None:
        super().__init__(cpu_threads=cpu_threads)
        self.min_bias_grad = min_bias_grad

    def _solve(
        self, targets: Sequence[AttackTarget], *, seed: int, device: torch.device, progress: Progress | None
    ) -> tuple[list[list[Trial]], list[dict]]:
        runs, infos = [], []
        for target in targets:
            run, info = self._attack(target, device)
            runs.append([run])
            infos.append(info)
            if progress:
                progress(0, run.loss)
        return runs, infos

    def _rows(self, target: AttackTarget, signal: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per bin: the weight and bias gradients of the images in it (the differences of consecutive rows)."""
        imprint_block(target)
        return bin_differences(signal[0].detach().double(), signal[1].detach().double())

    def _candidates(self, d_w: torch.Tensor, d_b: torch.Tensor, n: int, shape: tuple) -> torch.Tensor:
        """Up to n images: the ratio of every filled bin, those with the largest bias gradients first."""
        filled = (d_b.abs() > self.min_bias_grad * d_b.abs().max()).nonzero().squeeze(1)
        if filled.numel() == 0 or not torch.isfinite(d_b).all():
            raise FedsimError(f"{self.name} attack: the tampered layer's bias gradient is zero; nothing leaks")
        order = filled[d_b[filled].abs().argsort(descending=True)][:n]
        return (d_w[order] / d_b[order, None]).view(-1, *shape)

    def _attack(self, target: AttackTarget, device: torch.device) -> tuple[Trial, dict]:
        objective, signal = observed_signal(target, unroll=False)
        n = target.batch_size if objective == "gradient" else (target.recipe.num_examples or target.batch_size)
        d_w, d_b = self._rows(target, signal)
        x = self._candidates(d_w, d_b, n, tuple(target.input_shape))
        exact = on_pixel_grid(x)
        missing = n - len(x)
        x = torch.cat([x, torch.full((missing, *target.input_shape), 0.5, dtype=x.dtype)])
        model = attack_copy(target.model, device)
        if target.labels is not None:
            labels, method = target.labels.detach().long().cpu(), "given"
        else:
            labels = infer_labels(target.model, signal, n, target.num_classes, tuple(target.input_shape)).labels
            method = "bias"
        loss = self._loss(model, x, labels, signal)
        run = Trial(x.float(), labels, loss, [{"iteration": 0, "loss": loss, "evaluations": 1}], [], 1)
        run.snapshots = [(0, x.clamp(0, 1).float())]
        info = {
            "objective": objective,
            "label_method": method,
            "attack": self.name,
            "bins": int(d_b.numel()),
            "bins_filled": int((d_b.abs() > self.min_bias_grad * d_b.abs().max()).sum()),
            "exact": int(exact.sum()),
            "exact_slots": [int(i) for i in exact.nonzero().squeeze(1)],
            "missing": missing,
        }
        return run, info

    def _loss(self, model: torch.nn.Module, x: torch.Tensor, labels: torch.Tensor, signal: list) -> float:
        """Gradient distance of the reconstruction, reported like the other attacks' final loss."""
        params = trainable_parameters(model)
        loss = _ce(model(x.to(params[0].device, params[0].dtype)), labels.to(params[0].device))
        grads = torch.autograd.grad(loss, params)
        return float(
            sum(((a.double() - b.to(a.device).double()) ** 2).sum() for a, b in zip(grads, signal, strict=True))
        )
