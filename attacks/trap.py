"""The trap-weights attack (Boenisch et al., "When the Curious Abandon Honesty", EuroS&P 2023): exact inputs from the
gradient of a first fully connected layer whose weights the server set (fedsim/trap.py), architecture unchanged.

A row of the layer active for one image alone in the batch has weight gradient g·x and bias gradient g: their
ratio is the image. Rows active for several images give mixtures, which lie off the 8-bit grid the data came in;
several rows catch the same image alone, and the copies are merged.
"""

from __future__ import annotations

import torch

from attacks.base import AttackTarget
from attacks.imprint import Imprint, on_pixel_grid
from fedsim.trap import first_linear


class Trap(Imprint):
    """Exact inputs from the rows of a trapped first layer; closed form, so restarts and seeds do not matter.

    Returns as many images as the update has examples: the distinct images on the 8-bit grid first (each the
    ratio of a row that one image alone activated), then the mixtures of the rows with the largest bias gradients.
    """

    name = "trap"

    def _rows(self, target: AttackTarget, signal: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        first_linear(target.model, tuple(target.input_shape))  # refuses a model without one
        return signal[0].detach().double(), signal[1].detach().double()

    def _candidates(self, d_w: torch.Tensor, d_b: torch.Tensor, n: int, shape: tuple) -> torch.Tensor:
        x = super()._candidates(d_w, d_b, d_w.shape[0], shape)  # every active row, largest bias gradient first
        alone = on_pixel_grid(x)
        seen, distinct = set(), []
        for i in alone.nonzero().squeeze(1).tolist():
            key = (x[i] * 255).round().to(torch.int16).numpy().tobytes()
            if key not in seen:
                seen.add(key)
                distinct.append(i)
        mixtures = (~alone).nonzero().squeeze(1).tolist()
        return x[torch.tensor(distinct + mixtures, dtype=torch.long)][:n]
