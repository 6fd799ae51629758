"""Ensemble Inversion (Wang & Kurz, WACV 2022): a generator trained against an ensemble of frozen models.

Two generators. The paper's (`generator="unconditional"`, after DAFL, Chen et al. ICCV 2019): G(z) is trained so
that the ensemble is confident about its images (the one-hot loss against the ensemble's own argmax), with high
penultimate-layer activations (the activation loss, an L1 norm) and a class-balanced batch (the information-entropy
term); a sample's label is what the ensemble says it is. fedsim's earlier, easier variant
(`generator="conditional"`): G(z, c) is asked for class c, with the one-hot loss against c and the largest logit as
the activation. Either way an auxiliary dataset can act as a prior through a discriminator, farthest model sampling
(FMS) picks a diverse subset of candidate models, and generated samples with low activations are filtered out.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from attacks.contract import RunTrajectory, StateDict
from attacks.inversion_eval import attack_accuracy, nearest_private_distance
from fedsim.errors import FedsimError

Progress = Callable[[int, int, dict], None]  # (step, total, losses)


class _DCGAN(nn.Module):
    """DCGAN-style generator (Radford et al. 2016, as DAFL uses): a linear layer from the latent code (and any
    condition) to a (4w, H/4, W/4) map, two stride-2 transposed convolutions, a sigmoid: images in [0, 1]."""

    def __init__(self, input_shape: tuple[int, int, int], conditions: int, latent_dim: int, width: int) -> None:
        super().__init__()
        c, h, w = input_shape
        self.input_shape, self.latent_dim = (c, h, w), latent_dim
        self.h0, self.w0, self.width = math.ceil(h / 4), math.ceil(w / 4), width
        self.fc = nn.Linear(latent_dim + conditions, 4 * width * self.h0 * self.w0)
        self.body = nn.Sequential(
            nn.BatchNorm2d(4 * width),
            nn.ReLU(),
            nn.ConvTranspose2d(4 * width, 2 * width, 4, stride=2, padding=1),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(),
            nn.ConvTranspose2d(2 * width, c, 4, stride=2, padding=1),
        )

    def decode(self, code: torch.Tensor) -> torch.Tensor:
        x = torch.sigmoid(self.body(self.fc(code).view(-1, 4 * self.width, self.h0, self.w0)))
        return x[:, :, : self.input_shape[1], : self.input_shape[2]]


class ConditionalGenerator(_DCGAN):
    """The DCGAN generator conditioned on a one-hot class: G(z, c) (fedsim's variant, not the paper's)."""

    def __init__(
        self, input_shape: tuple[int, int, int], num_classes: int, latent_dim: int = 100, width: int = 16
    ) -> None:
        super().__init__(input_shape, num_classes, latent_dim, width)
        self.num_classes = num_classes

    def forward(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.decode(torch.cat([z, F.one_hot(labels, self.num_classes).to(z.dtype)], dim=1))


class Generator(_DCGAN):
    """The unconditional DCGAN generator G(z) of DAFL and of the paper: the ensemble decides each image's class."""

    def __init__(self, input_shape: tuple[int, int, int], latent_dim: int = 100, width: int = 16) -> None:
        super().__init__(input_shape, 0, latent_dim, width)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.decode(z)


class Discriminator(nn.Module):
    """A small convolutional discriminator: real auxiliary images against generated ones (the optional prior)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(channels, 32, 4, stride=2, padding=1),
            nn.LeakyReLU(0.2),
            nn.Conv2d(32, 64, 4, stride=2, padding=1),
            nn.BatchNorm2d(64),
            nn.LeakyReLU(0.2),
            nn.AdaptiveAvgPool2d(4),
            nn.Flatten(),
            nn.Linear(64 * 16, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(1)


def ensemble_logits(models: Sequence[nn.Module], x: torch.Tensor) -> torch.Tensor:
    """Logits of every model [M, B, K]."""
    return torch.stack([model(x) for model in models])


def last_linear(model: nn.Module) -> nn.Linear:
    """The model's classifier: its last nn.Linear layer, whose input is the penultimate-layer feature vector."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise FedsimError(f"{type(model).__name__} has no linear classifier layer: DAFL's activation loss needs one")
    return linears[-1]


def ensemble_features(models: Sequence[nn.Module], x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits [M, B, K] and penultimate features [M, B, F] (the input of each model's last linear layer)."""
    logits, features = [], []
    for model in models:
        seen: list[torch.Tensor] = []
        hook = last_linear(model).register_forward_pre_hook(lambda _m, args, seen=seen: seen.append(args[0]))
        try:
            logits.append(model(x))
        finally:
            hook.remove()
        features.append(seen[-1].flatten(1))
    return torch.stack(logits), torch.stack(features)


def dafl_losses(logits: torch.Tensor, features: torch.Tensor) -> dict[str, torch.Tensor]:
    """DAFL's three generator losses (Chen et al. 2019, as in its public code), on an ensemble:

    one-hot: each model's cross-entropy against the ensemble's own prediction (the argmax of the mean logits),
      averaged over the models: the ensemble must be confident and agree;
    activation: minus the mean absolute penultimate-layer activation (L1), averaged over the models;
    entropy: sum_k p_k log10 p_k of the class distribution p (softmax averaged over the batch and the models);
      minimising it maximises the entropy: the batch covers the classes evenly.
    """
    m, b, k = logits.shape
    labels = logits.detach().mean(dim=0).argmax(dim=1)
    onehot = F.cross_entropy(logits.reshape(m * b, k), labels.repeat(m))
    activation = -features.abs().mean()
    p = F.softmax(logits, dim=2).mean(dim=(0, 1))
    entropy = (p * torch.log10(p.clamp_min(1e-12))).sum()
    return {"one-hot": onehot, "activation": activation, "entropy": entropy}


def inversion_losses(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """The paper's two losses on ensemble logits [M, B, K] for target classes [B]:

    one-hot: the cross-entropy of each model's prediction against the target class, averaged over models;
    activation: minus the maximum output activation (largest logit) of each model, averaged over models.
    """
    m, b, k = logits.shape
    onehot = F.cross_entropy(logits.reshape(m * b, k), labels.repeat(m))
    activation = -logits.max(dim=2).values.mean()
    return {"one-hot": onehot, "activation": activation}


@dataclass
class InversionConfig:
    """Hyper-parameters of one inversion (the same for ensemble and single-model inversion)."""

    steps: int = 1500
    batch_size: int = 64
    lr: float = 1e-3
    latent_dim: int = 100
    width: int = 16  # generator channels: 4w, 2w
    lambda_activation: float = 0.1
    lambda_prior: float = 0.1  # weight of the discriminator term when auxiliary data is given
    seed: int = 0
    generator: str = "conditional"  # or "unconditional": the paper's G(z) with DAFL's losses
    lambda_entropy: float = 5.0  # DAFL's information-entropy weight (unconditional generator only)


GENERATORS = ("conditional", "unconditional")


def train_generator(
    models: Sequence[nn.Module],
    input_shape: tuple[int, int, int],
    num_classes: int,
    config: InversionConfig | None = None,
    aux: torch.Tensor | None = None,
    progress: Progress | None = None,
) -> ConditionalGenerator | Generator:
    """Train a generator against the frozen `models` (an ensemble, or one model).

    conditional: each step draws a class-balanced batch of targets; the loss is one-hot + lambda_activation *
    activation (`inversion_losses`). unconditional: the loss is DAFL's one-hot + lambda_activation * activation +
    lambda_entropy * entropy (`dafl_losses`). Either adds lambda_prior * the non-saturating GAN loss against
    `aux` images when they are given.
    """
    if not models:
        raise FedsimError("ensemble inversion needs at least one model")
    cfg = config or InversionConfig()
    if cfg.generator not in GENERATORS:
        raise FedsimError(f"unknown generator {cfg.generator!r}; choose one of: {', '.join(GENERATORS)}")
    conditional = cfg.generator == "conditional"
    for model in models:
        model.eval()
        model.requires_grad_(False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        generator: ConditionalGenerator | Generator = (
            ConditionalGenerator(input_shape, num_classes, cfg.latent_dim, cfg.width)
            if conditional
            else Generator(input_shape, cfg.latent_dim, cfg.width)
        )
        disc = Discriminator(input_shape[0]) if aux is not None else None
    g_opt = torch.optim.Adam(generator.parameters(), lr=cfg.lr, betas=(0.5, 0.999))
    d_opt = torch.optim.Adam(disc.parameters(), lr=cfg.lr, betas=(0.5, 0.999)) if disc is not None else None
    gen = torch.Generator().manual_seed(cfg.seed)
    generator.train()
    for step in range(cfg.steps):
        z = torch.randn(cfg.batch_size, cfg.latent_dim, generator=gen)
        if isinstance(generator, ConditionalGenerator):
            labels = (torch.arange(cfg.batch_size) + step * cfg.batch_size) % num_classes
            images = generator(z, labels)
            parts = inversion_losses(ensemble_logits(models, images), labels)
            loss = parts["one-hot"] + cfg.lambda_activation * parts["activation"]
        else:
            images = generator(z)
            parts = dafl_losses(*ensemble_features(models, images))
            loss = (
                parts["one-hot"] + cfg.lambda_activation * parts["activation"] + cfg.lambda_entropy * parts["entropy"]
            )
        if disc is not None and d_opt is not None and aux is not None:
            real = aux[torch.randint(len(aux), (cfg.batch_size,), generator=gen)]
            d_loss = F.softplus(-disc(real)).mean() + F.softplus(disc(images.detach())).mean()
            d_opt.zero_grad(set_to_none=True)
            d_loss.backward()
            d_opt.step()
            parts["prior"] = F.softplus(-disc(images)).mean()
            loss = loss + cfg.lambda_prior * parts["prior"]
        g_opt.zero_grad(set_to_none=True)
        loss.backward()
        g_opt.step()
        if progress is not None:
            progress(step + 1, cfg.steps, {k: float(v.detach()) for k, v in parts.items()})
    generator.eval()
    return generator


@torch.no_grad()
def generate(
    generator: ConditionalGenerator,
    models: Sequence[nn.Module],
    classes: Sequence[int],
    per_class: int,
    keep: float = 0.5,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`per_class` samples of each class, filtered to the `keep` share with the highest activations.

    A sample's activation is the ensemble's mean output activation (logit) of its target class.
    Returns (images, labels, activations) of the kept samples, class by class.
    """
    gen = torch.Generator().manual_seed(seed)
    labels = torch.tensor(classes, dtype=torch.long).repeat_interleave(per_class)
    z = torch.randn(len(labels), generator.latent_dim, generator=gen)
    images = torch.cat([generator(z[s : s + 256], labels[s : s + 256]) for s in range(0, len(labels), 256)])
    activations = target_activation(models, images, labels)
    kept = filter_top_activations(activations, labels, keep)
    return images[kept], labels[kept], activations[kept]


@torch.no_grad()
def generate_unconditional(
    generator: Generator, models: Sequence[nn.Module], samples: int, keep: float = 0.5, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`samples` images of the unconditional generator, labelled by the ensemble (the argmax of its mean logits),
    through the low-activation filter: per label, the `keep` share with the highest activation (the ensemble's
    mean largest logit) is kept, the samples the ensemble is least sure of are dropped.
    Returns (images, labels, activations) of the kept samples, label by label."""
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(samples, generator.latent_dim, generator=gen)
    images = torch.cat([generator(z[s : s + 256]) for s in range(0, samples, 256)])
    mean = torch.cat([ensemble_logits(models, images[s : s + 256]).mean(0) for s in range(0, samples, 256)])
    activations, labels = mean.max(dim=1)
    kept = filter_top_activations(activations, labels, keep)
    return images[kept], labels[kept], activations[kept]


@torch.no_grad()
def target_activation(models: Sequence[nn.Module], images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean over the ensemble of the target-class logit of each image."""
    rows = torch.arange(len(labels))
    logits = torch.cat([ensemble_logits(models, images[s : s + 256]) for s in range(0, len(images), 256)], dim=1)
    return logits[:, rows, labels].mean(dim=0)


def filter_top_activations(activations: torch.Tensor, labels: torch.Tensor, keep: float) -> torch.Tensor:
    """Indices of the samples kept: per class, the ceil(keep * n) with the highest activations (ties: first)."""
    if not 0 < keep <= 1:
        raise FedsimError(f"keep = {keep} must be in (0, 1]: the share of generated samples kept per class")
    kept = []
    for c in labels.unique(sorted=True):
        idx = (labels == c).nonzero().flatten()
        n = math.ceil(keep * len(idx))
        order = torch.sort(activations[idx], descending=True, stable=True).indices
        kept.append(idx[order[:n]])
    return torch.cat(kept)


# ----------------------------------------------------------------------------------------------
# Farthest model sampling
# ----------------------------------------------------------------------------------------------


def weight_distances(states: Sequence[StateDict]) -> np.ndarray:
    """Pairwise L2 distances [M, M] between models' flattened floating-point parameters (float64)."""
    flat = torch.stack(
        [torch.cat([v.detach().double().flatten() for v in s.values() if v.is_floating_point()]) for s in states]
    )
    return torch.cdist(flat, flat).numpy()


@torch.no_grad()
def output_distances(models: Sequence[nn.Module], probe: torch.Tensor) -> np.ndarray:
    """Pairwise distances [M, M]: mean L2 distance between models' softmax outputs on the probe images."""
    probs = torch.stack([F.softmax(m(probe).double(), dim=1) for m in models])  # [M, N, K]
    diff = probs.unsqueeze(0) - probs.unsqueeze(1)
    return diff.norm(dim=3).mean(dim=2).numpy()


def farthest_model_sampling(distances: np.ndarray, k: int, first: int | None = None) -> list[int]:
    """Greedy farthest-point sampling: start at `first` (default: the last, most recent model), then repeatedly
    add the model whose distance to its nearest already-chosen model is largest (ties: the lowest index)."""
    d = np.asarray(distances, dtype=np.float64)
    m = len(d)
    if d.shape != (m, m):
        raise FedsimError(f"FMS needs a square distance matrix; got {d.shape}")
    if not 1 <= k <= m:
        raise FedsimError(f"FMS cannot pick {k} of {m} models; choose 1 <= k <= {m}")
    chosen = [m - 1 if first is None else first]
    nearest = d[chosen[0]].copy()
    while len(chosen) < k:
        nearest[chosen] = -np.inf
        nxt = int(np.argmax(nearest))
        chosen.append(nxt)
        nearest = np.minimum(nearest, d[nxt])
    return chosen


def fms_distances(
    kind: str, states: Sequence[StateDict], models: Sequence[nn.Module], probe: torch.Tensor
) -> np.ndarray:
    """FMS distances between candidate models: "weights" (L2 between parameters) or "outputs" (softmax outputs on
    the probe images)."""
    if kind == "weights":
        return weight_distances(states)
    if kind != "outputs":
        raise FedsimError(f"unknown FMS distance {kind!r}; choose weights or outputs")
    return output_distances(models, probe[:256])


def auxiliary_images(name: str, data_dir: str, shape: tuple[int, int, int]) -> torch.Tensor:
    """A public dataset as the generator's prior: its training images in [0, 1], resized and re-channelled."""
    from fedsim.datasets import LOADERS, load_dataset, to_float

    if name not in LOADERS:
        raise FedsimError(f"unknown auxiliary dataset {name!r}; choose one of: {', '.join(LOADERS)}")
    x = to_float(load_dataset(name, data_dir).train_x)
    if x.shape[1] != shape[0]:
        x = x.mean(dim=1, keepdim=True).expand(-1, shape[0], -1, -1).contiguous()
    if tuple(x.shape[2:]) != tuple(shape[1:]):
        x = F.interpolate(x, size=tuple(shape[1:]), mode="bilinear", antialias=True)
    return x


# ----------------------------------------------------------------------------------------------
# The attack on a run
# ----------------------------------------------------------------------------------------------

ENSEMBLES = ("client", "round")
DISTANCES = ("weights", "outputs")
SELECTIONS = ("fms", "recent")
RunProgress = Callable[[str, int, int], None]  # (task, done, total)


def invert_run(
    run: RunTrajectory,
    load_model: Callable[[StateDict], nn.Module],
    private: dict[int, tuple[torch.Tensor, torch.Tensor]],
    judge: nn.Module,
    config: InversionConfig,
    *,
    input_shape: tuple[int, int, int],
    num_classes: int,
    ensemble: str,
    clients: list[int],
    size: int,
    distance: str,
    selection: str,
    per_class: int,
    keep: float,
    aux: torch.Tensor | None,
    seed: int,
    progress: RunProgress,
) -> tuple[dict[str, dict], dict[str, torch.Tensor]]:
    """Ensemble inversion against single-model inversion of the last model, for each target of `ensemble`.

    ensemble=client: for each of `clients`, its uploads over the rounds (single model: its last upload).
    ensemble=round: every client's upload of the last round (single model: the final global model).
    selection=fms picks `size` candidates by farthest model sampling; selection=recent the `size` most recent.
    `load_model(state)` is the run's architecture with those weights. `private` holds each client's private data
    and `judge` an independent classifier: the scoring side, and which classes a target holds.
    Returns (target -> scores, "<target>-<variant>" -> the kept images, class by class).
    """
    targets, images_of = {}, {}
    everyone = concatenated([private[k] for k in sorted(run.uploads)])
    for k in clients if ensemble == "client" else [None]:
        if k is not None:
            rounds = run.client_rounds(k)
            candidates, last, (px, py) = [run.uploads[k][r] for r in rounds], run.uploads[k][rounds[-1]], private[k]
        else:
            candidates = [u[run.rounds[-1]] for u in run.uploads.values() if run.rounds[-1] in u]
            last, (px, py) = run.final, everyone
        models = [load_model(state) for state in candidates]
        probe = aux if aux is not None else torch.rand(256, *input_shape, generator=torch.Generator().manual_seed(seed))
        distances = fms_distances(distance, candidates, models, probe)
        n = min(size, len(models))
        chosen = farthest_model_sampling(distances, n) if selection == "fms" else list(range(len(models)))[-n:][::-1]
        classes = sorted(int(c) for c in py.unique())
        name = f"client-{k}" if k is not None else "round"
        entry: dict = {"candidates": len(candidates), "chosen": chosen, "classes": classes}
        for variant, members in (("ensemble", [models[i] for i in chosen]), ("single", [load_model(last)])):
            entry[variant], images_of[f"{name}-{variant}"] = invert_members(
                members,
                judge,
                config,
                input_shape=input_shape,
                num_classes=num_classes,
                classes=classes,
                per_class=per_class,
                keep=keep,
                aux=aux,
                private=(px, py),
                seed=seed,
                progress=lambda d, t, _p, v=variant, n=name: progress(f"{n}: {v} inversion", d, t),
            )
        entry["gain"] = entry["ensemble"]["accuracy"] - entry["single"]["accuracy"]
        targets[name] = entry
    return targets, images_of


def invert_members(
    members: Sequence[nn.Module],
    judge: nn.Module,
    config: InversionConfig,
    *,
    input_shape: tuple[int, int, int],
    num_classes: int,
    classes: Sequence[int],
    per_class: int,
    keep: float,
    aux: torch.Tensor | None,
    private: tuple[torch.Tensor, torch.Tensor],
    seed: int,
    progress: Progress | None = None,
) -> tuple[dict, torch.Tensor]:
    """One inversion of `members` (an ensemble, or one model), scored by the independent `judge`.

    conditional: `per_class` images of each of `classes`, each labelled with the class it was asked for.
    unconditional: per_class * len(classes) images, each labelled with the ensemble's prediction.
    Both through the activation filter (`keep`). Attack accuracy is the share of kept images the judge assigns
    to their label; `labels` counts the kept images per label (an unconditional generator may miss classes).
    Returns (scores, the kept images, label by label).
    """
    generator = train_generator(members, input_shape, num_classes, config, aux, progress=progress)
    if isinstance(generator, ConditionalGenerator):
        images, labels, _ = generate(generator, members, classes, per_class, keep, seed)
    else:
        images, labels, _ = generate_unconditional(generator, members, per_class * len(classes), keep, seed)
    nearest = nearest_private_distance(images, labels, *private)
    counts = {int(c): int((labels == c).sum()) for c in labels.unique(sorted=True)}
    return {
        **attack_accuracy(judge, images, labels),
        "models": len(members),
        "generator": config.generator,
        "labels": counts,
        "classes-covered": len(counts),
        "nearest-private-rmse": float(np.nanmean(nearest)),
    }, images


def ensemble_size_curve(
    states: Sequence[StateDict],
    load_model: Callable[[StateDict], nn.Module],
    judge: nn.Module,
    config: InversionConfig,
    *,
    input_shape: tuple[int, int, int],
    num_classes: int,
    sizes: Sequence[int],
    private: tuple[torch.Tensor, torch.Tensor],
    per_class: int,
    keep: float,
    aux: torch.Tensor | None,
    distance: str = "weights",
    seed: int = 0,
    progress: RunProgress | None = None,
) -> tuple[dict, dict[str, torch.Tensor]]:
    """Attack accuracy against ensemble size: for each size n, the first n models of the farthest-model-sampling
    order of the pool `states` (greedy max-min weight distance from the pool's last model, so each ensemble holds
    the smaller ones), inverted with the same generator, losses, steps and seed, scored by the judge.

    The pool is any set of models of one architecture that share the classes: independently trained models (the
    paper's setting), or the uploads of a run. `private` holds the images the pool was trained on (scoring only).
    Returns ({"order": FMS order, "distances": pairwise weight distances, "sizes": {n: scores}}, "size-<n>" ->
    the kept images).
    """
    if not states:
        raise FedsimError("the ensemble-size curve needs at least one model in the pool")
    bad = [n for n in sizes if not 1 <= n <= len(states)]
    if bad:
        raise FedsimError(f"ensemble sizes {bad} are not between 1 and the pool's {len(states)} models")
    models = [load_model(state) for state in states]
    probe = aux if aux is not None else torch.rand(256, *input_shape, generator=torch.Generator().manual_seed(seed))
    distances = fms_distances(distance, states, models, probe)
    order = farthest_model_sampling(distances, max(sizes))
    classes = sorted(int(c) for c in private[1].unique())
    results: dict = {"order": order, "distances": np.round(distances, 4).tolist(), "sizes": {}}
    images_of = {}
    for n in sizes:
        results["sizes"][n], images_of[f"size-{n}"] = invert_members(
            [models[i] for i in order[:n]],
            judge,
            config,
            input_shape=input_shape,
            num_classes=num_classes,
            classes=classes,
            per_class=per_class,
            keep=keep,
            aux=aux,
            private=private,
            seed=seed,
            progress=None if progress is None else lambda d, t, _p, n=n: progress(f"{n} models", d, t),
        )
    return results, images_of


def concatenated(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Several (images, labels) data sets as one."""
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
