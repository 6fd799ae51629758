"""Ensemble Inversion (Wang & Kurz, WACV 2022): a generator trained against an ensemble of frozen models.

Two generators. The paper's (`generator="unconditional"`, after DAFL, Chen et al. ICCV 2019): G(z) is trained so
that the ensemble is confident about its images (the one-hot loss against the ensemble's own argmax), with high
penultimate-layer activations (the activation loss, an L1 norm) and a class-balanced batch (the information-entropy
term); a sample's label is what the ensemble says it is. fedsim's earlier, easier variant
(`generator="conditional"`): G(z, c) is asked for class c, with the one-hot loss against c and the largest logit as
the activation. Either way an auxiliary dataset can act as a prior through a discriminator, and generated samples
with low activations are filtered out.

This file is the objective (the losses) and the loop (`train_generator`), then the filtered samples (`generate*`).
The nets are in attacks/dcgan.py, the ensemble's outputs in attacks/ensemble_outputs.py, farthest model sampling
(FMS: a diverse subset of candidate models) in attacks/model_sampling.py, and the procedures over a run or a pool
of models in attacks/ensemble_inversion_fl.py.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from attacks.dcgan import ConditionalGenerator, Discriminator, Generator
from attacks.ensemble_outputs import ensemble_features, ensemble_logits, target_activation
from fedsim.errors import FedsimError

Progress = Callable[[int, int, dict], None]  # (step, total, losses)


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
