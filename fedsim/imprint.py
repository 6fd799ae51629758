"""The imprint block of Robbing the Fed (Fowl et al., ICLR 2022): a layer a cheating server puts in front of the model.

A fully connected layer of `bins` rows, each measuring the same statistic s(x) = v·x of the input (its mean
brightness, or a random projection), with biases -q_k that cut the statistic's distribution into bins, then a
ReLU. Row k passes gradient for exactly the images with s(x) > q_k, so the difference of two consecutive rows'
weight gradients, divided by the difference of their bias gradients, is the one image whose statistic lies in
[q_k, q_k+1), when it is alone there. The block's output is mapped back to the input's shape (the input plus a
brightness shift, a bounded function of the mean of the rows' activations) so that the rest of the model runs
unchanged; that map is fixed, the same for every row, which keeps every row's gradient a multiple of one image.

The clients build the architecture from the run config (`server-mode = "imprint"`); the server sets the rows'
weights (`tamper`) in every global model it sends.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from fedsim.errors import FedsimError

STATISTICS = ("brightness", "random")
GAIN = 1e-4
"""The rows' weights and biases are scaled by GAIN and their activations by 1/GAIN: the forward pass is the
same, but the gradients grow by 1/GAIN while the weights shrink by GAIN, so the update a client sends
(weights - lr·gradient, in float32) keeps the gradient's digits instead of drowning them in the weights', and
SecAgg+'s quantisation (steps of 16 / 2^22 by default) stays far below one image's share of the update."""
MAX_PARAMETERS = 50_000_000
"""Above this many imprint weights (bins x input size) the block is refused: it would not fit a client."""


SHIFT = 0.5
"""The largest brightness shift the block adds. The map back is bounded (a tanh) because one client step moves
the rows by about 1/GAIN^2 times their size: unbounded, the next step's inputs would be ruined; saturated, the
block passes no more gradient and the rest of the model trains on x plus a constant."""


class ImprintBlock(nn.Module):
    """Linear(C·H·W -> bins) + ReLU, mapped back to (C, H, W) as x + SHIFT·tanh(mean_k(h_k) / GAIN)."""

    def __init__(self, input_shape: tuple[int, int, int], bins: int) -> None:
        super().__init__()
        self.input_shape = tuple(input_shape)
        self.linear = nn.Linear(math.prod(self.input_shape), bins)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.linear(x.flatten(1)))
        shift = SHIFT * torch.tanh(h.mean(1) / GAIN)  # the same for every row: each row's gradient is c_n·x_n
        return x + shift.view(-1, *([1] * (x.dim() - 1)))


class ImprintedModel(nn.Module):
    """The run's model behind an imprint block; the block's parameters come first, as the attack reads them."""

    def __init__(self, model: nn.Module, input_shape: tuple[int, int, int], bins: int) -> None:
        super().__init__()
        self.imprint = ImprintBlock(input_shape, bins)
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(self.imprint(x))


def check_imprint(input_shape: tuple[int, ...], bins: int) -> None:
    """Refuse an input the block cannot wrap, in one line."""
    if len(input_shape) != 3 or min(input_shape) < 1:
        raise FedsimError(f"server-mode = imprint needs image inputs (C, H, W); this model's input is {input_shape}")
    if bins * math.prod(input_shape) > MAX_PARAMETERS:
        raise FedsimError(
            f"server-mode = imprint: {bins} bins x {math.prod(input_shape)} inputs is more than {MAX_PARAMETERS:,} "
            "weights; lower imprint-bins or image-size"
        )


def imprinted(model: nn.Module, input_shape: tuple[int, int, int], bins: int) -> ImprintedModel:
    """`model` behind an imprint block of `bins` rows (the architecture only; `tamper` sets the weights)."""
    check_imprint(tuple(input_shape), bins)
    return ImprintedModel(model, tuple(input_shape), bins)


def projection(statistic: str, input_shape: tuple[int, int, int], seed: int) -> torch.Tensor:
    """The vector v of s(x) = v·x: uniform (mean brightness) or a seeded random unit direction."""
    size = math.prod(input_shape)
    if statistic == "brightness":
        return torch.full((size,), 1.0 / size)
    if statistic == "random":
        v = torch.randn(size, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        return (v / v.norm()).float()
    raise FedsimError(f"imprint-statistic = {statistic!r} is not allowed; choose one of: {', '.join(STATISTICS)}")


def bin_edges(values: torch.Tensor, bins: int) -> torch.Tensor:
    """`bins` lower edges q_0 < ... < q_bins-1 with equal shares of `values` between them; q_0 lies below all."""
    values = values.double().flatten()
    if values.numel() < 2 or not torch.isfinite(values).all():
        raise FedsimError("the imprint block needs at least two finite public examples to place its bins")
    edges = torch.quantile(values, torch.linspace(0, 1, bins + 1, dtype=torch.float64)[:-1])
    spread = float(values.max() - values.min()) or 1.0
    edges[0] = values.min() - spread  # every image activates row 0: none falls below the first bin
    return edges


def tamper(model: ImprintedModel, public_x: torch.Tensor, statistic: str, seed: int) -> dict:
    """Set the block's rows from public images `public_x` [N, C, H, W]; returns how it tampered, for the records."""
    block = model.imprint
    v = projection(statistic, block.input_shape, seed)
    stats = public_x.flatten(1).double() @ v.double()
    edges = bin_edges(stats, block.linear.out_features)
    with torch.no_grad():
        block.linear.weight.copy_(GAIN * v.expand_as(block.linear.weight))
        block.linear.bias.copy_((-GAIN * edges).float())
    return {
        "mode": "imprint",
        "bins": block.linear.out_features,
        "statistic": statistic,
        "public-examples": int(len(public_x)),
        "tampered": ["imprint.linear.weight", "imprint.linear.bias"],
    }


def imprint_state(model: ImprintedModel) -> dict[str, torch.Tensor]:
    """The tampered tensors, by state-dict name, to write into every global model the server sends."""
    return {f"imprint.{k}": v.detach().clone() for k, v in model.imprint.state_dict().items()}
