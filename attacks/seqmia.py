"""SeqMIA (Li et al., CCS 2024): multi-metric sequences over a model trajectory, classified by an attention LSTM."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from attacks.membership_metrics import sample_metrics
from fedsim.errors import FedsimError

Progress = Callable[[int, int, float], None]  # (step, total, loss)


@contextmanager
def single_thread() -> Iterator[None]:
    """One intra-op thread while training the tiny LSTM: its kernels are too small to gain from more, and on a
    shared CPU more threads only wait for each other (measured: 25 ms a step on 1 thread, 380 ms on 2)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class AttentionLSTM(nn.Module):
    """The paper's attack model: one LSTM layer, dot-product attention of the last hidden state over all time
    steps, and a linear layer on [last hidden state, context vector] giving (non-member, member) logits."""

    def __init__(self, num_features: int = 5, hidden: int = 50) -> None:
        super().__init__()
        self.lstm = nn.LSTM(num_features, hidden, num_layers=1, batch_first=True)
        self.head = nn.Linear(2 * hidden, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outputs, (h_last, _) = self.lstm(x)  # outputs [B, T, H], h_last [1, B, H]
        h = h_last[-1]
        energies = torch.einsum("bth,bh->bt", outputs, h)
        weights = F.softmax(energies, dim=1)
        context = torch.einsum("bt,bth->bh", weights, outputs)
        return self.head(torch.cat([h, context], dim=1))


@dataclass
class SeqMIAClassifier:
    """A trained attack model with the per-metric standardisation fitted on its training sequences, and the
    indices of the sequences it held out for validation (never trained on; they calibrate its scores)."""

    model: AttentionLSTM
    mean: np.ndarray
    std: np.ndarray
    history: list[float]
    held_out: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    def score(self, sequences: np.ndarray, batch_size: int = 4096) -> np.ndarray:
        """Membership score of each sequence [N, T, F]: the member-vs-non-member log-odds, float64."""
        x = torch.from_numpy(self.standardise(sequences))
        self.model.eval()
        out = []
        with torch.no_grad():
            for start in range(0, len(x), batch_size):
                logits = self.model(x[start : start + batch_size]).double()
                out.append(logits[:, 1] - logits[:, 0])
        return torch.cat(out).numpy() if out else np.zeros(0)

    def standardise(self, sequences: np.ndarray) -> np.ndarray:
        return ((np.asarray(sequences, dtype=np.float64) - self.mean) / self.std).astype(np.float32)


def train_attack_model(
    sequences: np.ndarray,
    labels: np.ndarray,
    *,
    epochs: int = 150,
    batch_size: int = 100,
    lr: float = 0.01,
    weight_decay: float = 1e-4,
    hidden: int = 50,
    validation: float = 0.2,
    patience: int = 20,
    seed: int = 0,
    progress: Progress | None = None,
) -> SeqMIAClassifier:
    """Train the attention LSTM on labelled sequences [N, T, F] (label 1 = member) as the paper's code does:
    Adam (lr 0.01, L2 1e-4 on weights only), cross-entropy, the lr times 0.9 every 10 epochs, up to 150 epochs.

    Unlike the paper (tens of thousands of shadow samples), a `validation` share of the sequences is held out:
    the weights with the lowest validation loss are kept, and training stops after `patience` epochs without
    improvement. validation=0 trains the fixed number of epochs.
    """
    x = np.asarray(sequences, dtype=np.float64)
    y = np.asarray(labels).astype(np.int64)
    if x.ndim != 3 or len(x) != len(y):
        raise FedsimError(f"sequences must be [N, T, F] with one label each; got {x.shape} and {y.shape}")
    if len(np.unique(y)) != 2:
        raise FedsimError("the attack model needs both members (1) and non-members (0) to learn from")
    rng = np.random.default_rng([seed, 7])
    order = rng.permutation(len(x))
    n_val = int(round(validation * len(x))) if validation > 0 else 0
    val, train = order[:n_val], order[n_val:]
    flat = x[train].reshape(-1, x.shape[2])
    mean, std = flat.mean(axis=0), flat.std(axis=0)
    std = np.where(std > 0, std, 1.0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AttentionLSTM(x.shape[2], hidden)
    decay = [p for n, p in model.named_parameters() if not n.endswith("bias")]
    no_decay = [p for n, p in model.named_parameters() if n.endswith("bias")]
    optimizer = torch.optim.Adam(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=lr
    )
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=10, gamma=0.9)
    classifier = SeqMIAClassifier(model, mean, std, [], np.sort(val))
    inputs, targets = torch.from_numpy(classifier.standardise(x)), torch.from_numpy(y)
    data = (inputs[train], targets[train], inputs[val], targets[val])
    with single_thread():
        _fit(model, optimizer, scheduler, data, rng, epochs, batch_size, patience, classifier.history, progress)
    model.eval()
    return classifier


def _fit(model, optimizer, scheduler, data, rng, epochs, batch_size, patience, history, progress) -> None:
    x, y, val_x, val_y = data
    best, best_state, since = float("inf"), None, 0
    for epoch in range(epochs):
        model.train()
        order = torch.from_numpy(rng.permutation(len(x)))
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        if optimizer.param_groups[0]["lr"] > 5e-4:
            scheduler.step()
        model.eval()
        with torch.no_grad():
            check_x, check_y = (val_x, val_y) if len(val_y) else (x, y)
            history.append(float(F.cross_entropy(model(check_x), check_y)))
        if progress is not None:
            progress(epoch + 1, epochs, history[-1])
        if not len(val_y):
            continue
        if history[-1] < best:
            best, since = history[-1], 0
            best_state = {k: v.clone() for k, v in model.state_dict().items()}
        else:
            since += 1
            if since >= patience:
                break
    if best_state is not None:
        model.load_state_dict(best_state)


# ----------------------------------------------------------------------------------------------
# Metric sequences
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def model_metrics(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1024) -> np.ndarray:
    """The five metrics [N, 5] (float64) of every sample on one model, queried in inference mode."""
    was_training = model.training
    model.eval()
    dev = next(model.parameters()).device
    logits = [model(x[s : s + batch_size].to(dev)).cpu() for s in range(0, len(x), batch_size)]
    model.train(was_training)
    return sample_metrics(torch.cat(logits), y)


def metric_sequences(models: Iterable[nn.Module], x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    """[N, T, 5]: the metrics of every sample on each model of a trajectory, in the order given (oldest first).

    `models` may yield the same module with new weights loaded at each step: each is queried at once.
    """
    steps = [model_metrics(model, x, y) for model in models]
    if not steps:
        raise FedsimError("a metric sequence needs at least one model")
    return np.stack(steps, axis=1)


def loss_baselines(sequences: np.ndarray) -> dict[str, np.ndarray]:
    """The two baseline scores (higher = member): Yeom et al.'s loss on the final model (the last step of the
    sequence) and the mean loss over the whole trajectory; both from metric 0 (the loss), float64."""
    loss = np.asarray(sequences, dtype=np.float64)[:, :, 0]
    return {"loss-final": -loss[:, -1], "loss-mean": -loss.mean(axis=1)}
