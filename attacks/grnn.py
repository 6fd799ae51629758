"""GRNN (Ren, Deng, Xie, ACM TIST 2022): a generator whose images and labels reproduce the observed gradient."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from attacks.base import Attack, AttackTarget, Progress, Trial, divergence_reasons
from attacks.problems import Problems, stack_problems, stack_targets, value_and_grad
from attacks.recorder import Recorder
from fedsim.errors import FedsimError


class GLU(nn.Module):
    """Gated linear unit over channels: the first half gated by the sigmoid of the second."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = x.chunk(2, dim=1)
        return a * torch.sigmoid(b)


def up_block(in_planes: int, out_planes: int) -> nn.Sequential:
    """Nearest 2x upsampling, 3x3 conv, batch norm, GLU (GRNN's upBlock)."""
    return nn.Sequential(
        nn.Upsample(scale_factor=2, mode="nearest"),
        nn.Conv2d(in_planes, out_planes * 2, kernel_size=3, padding=1, bias=False),
        # Batch statistics always (GRNN never switches its generator to eval mode); no running
        # stats, so the generator stays a pure function that torch.func can vmap.
        nn.BatchNorm2d(out_planes * 2, track_running_stats=False),
        GLU(),
    )


class Generator(nn.Module):
    """GRNN's generator: noise [B, g_in] -> (images [B, C, H, W] in [0, 1], label distributions [B, K]).

    Image branch: a 4x4 transposed conv with GLU, then upsampling blocks to the next power of
    two >= max(H, W) (at least 8), a sigmoid, and a bilinear (antialiased) resize to (H, W) when
    the input is not a square power of two. Label branch: linear + softmax, one per noise vector.
    """

    def __init__(self, num_classes: int, input_shape: tuple[int, int, int], g_in: int = 128, width: int = 32):
        super().__init__()
        channels, self.height, self.width = input_shape
        size = max(8, 2 ** math.ceil(math.log2(max(self.height, self.width))))
        blocks = int(math.log2(size)) - 3
        self.label = nn.Linear(g_in, num_classes)
        self.stem = nn.Sequential(nn.ConvTranspose2d(g_in, width * 2**blocks * 2, 4, 1, 0), GLU())
        self.up = nn.Sequential(*[up_block(width * 2 ** (b + 1), width * 2**b) for b in reversed(range(blocks))])
        self.out = up_block(width, channels)

    def forward(self, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        labels = torch.softmax(self.label(noise), dim=-1)
        x = torch.sigmoid(self.out(self.up(self.stem(noise[:, :, None, None]))))
        if x.shape[-2:] != (self.height, self.width):
            x = F.interpolate(x, size=(self.height, self.width), mode="bilinear", antialias=True, align_corners=False)
        return x, labels


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """GRNN's TV loss: mean squared neighbour differences, 2·(h/count_h + w/count_w)/B."""
    b, c, h, w = x.shape
    h_tv = ((x[:, :, 1:, :] - x[:, :, :-1, :]) ** 2).sum() / max(c * (h - 1) * w, 1)
    w_tv = ((x[:, :, :, 1:] - x[:, :, :, :-1]) ** 2).sum() / max(c * h * (w - 1), 1)
    return 2 * (h_tv + w_tv) / b


class GRNN(Attack):
    """GRNN: RMSprop(lr 1e-4, momentum 0.99) on a generator, 1000 iterations, loss
    ||∇' - ∇||² + ||∇' - ∇|| + λ·TV with λ = 1e-3 (the GRNN code's LeNet setting; it uses 1e-6
    for ResNet-18). The GRNN code calls its second term a Wasserstein distance, but its
    implementation reduces to the plain L2 norm of the gradient difference, which we use.
    """

    name = "grnn"

    def __init__(
        self,
        *,
        iterations: int = 1000,
        lr: float = 1e-4,
        momentum: float = 0.99,
        tv_weight: float = 1e-3,
        g_in: int = 128,
        width: int = 32,
        unroll: bool = False,
        restarts: int = 1,
        tolerance: float = 1e-9,
        snapshot_every: int | None = None,
        cpu_threads: int | None = 1,
    ) -> None:
        super().__init__(restarts=restarts, tolerance=tolerance, snapshot_every=snapshot_every, cpu_threads=cpu_threads)
        if iterations < 1 or lr <= 0 or g_in < 1 or width < 2 or tv_weight < 0:
            raise FedsimError("grnn: iterations, lr, g_in, width must be positive and tv_weight >= 0")
        self.iterations, self.lr, self.momentum, self.tv_weight = iterations, lr, momentum, tv_weight
        self.g_in, self.width, self.unroll = g_in, width, unroll

    def _initial(self, seed: int, restart: int, n: int, target: AttackTarget) -> tuple[Generator, torch.Tensor]:
        """One restart's generator (torch's default init: GRNN's weight_init call does not reach its
        layers) and its fixed noise input, both seeded and drawn on CPU so the device does not matter."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed * 1_000_003 + restart)
            generator = Generator(target.num_classes, tuple(target.input_shape), self.g_in, self.width)
            return generator, torch.randn(n, self.g_in)

    def _solve(
        self, targets: Sequence[AttackTarget], *, seed: int, device: torch.device, progress: Progress | None
    ) -> tuple[list[list[Trial]], list[dict]]:
        problems = stack_targets(targets, self.restarts, device, unroll=self.unroll)
        first, r, k = targets[0], self.restarts, problems.k
        made = [self._initial(seed, i, problems.examples, first) for _ in targets for i in range(r)]
        generators, noises = [g for g, _ in made], [z for _, z in made]
        generator = generators[0].to(device)
        weights = stack_problems([dict(g.named_parameters()) for g in generators], 1, device)
        for w in weights.values():
            w.requires_grad_()
        noise = torch.stack(noises).to(device)

        def grnn_loss(gw: dict, z: torch.Tensor, p: dict, c: dict, obs: list) -> tuple[torch.Tensor, tuple]:
            """GRNN's objective of one problem: ||∇' - ∇||² + ||∇' - ∇|| + λ·TV of the generated batch."""
            x, y = functional_call(generator, gw, (z,))
            distance = problems.distance(problems.signal(p, c, x, y), obs)
            loss = distance + torch.sqrt(distance + 1e-30) + self.tv_weight * total_variation(x)
            return loss, (distance, x, y)

        fn = value_and_grad(grnn_loss, k, (0, 0, 0, 0, 0), argnum=0, has_aux=True)
        optimizer = torch.optim.RMSprop(list(weights.values()), lr=self.lr, momentum=self.momentum)
        detached = {name: w.detach() for name, w in weights.items()}  # views: see the optimiser updates
        trials = self._optimise(
            lambda: fn(detached, noise, problems.params, problems.consts, problems.observed),
            weights,
            optimizer,
            problems,
            progress,
        )
        info = {"objective": problems.objective, "label_method": "grnn-generated", "attack": self.name}
        return [trials[i * r : (i + 1) * r] for i in range(len(targets))], [dict(info) for _ in targets]

    def _optimise(
        self,
        evaluate,
        weights: dict,
        optimizer: torch.optim.Optimizer,
        problems: Problems,
        progress: Progress | None,
    ) -> list[Trial]:
        """The GRNN loop: generate, match gradients, RMSprop step on the generator; keep each problem's last
        good state, drop diverged ones, stop a problem early once its gradient distance is below tolerance."""
        k = problems.k
        recorder = Recorder(k, self.iterations, self.snapshot_interval(self.iterations))
        done = [False] * k
        for it in range(self.iterations + 1):
            grads, (loss, (distance, x, y)) = evaluate()  # state after `it` optimiser steps
            x = x.detach()
            for i, reason in enumerate(divergence_reasons(loss, x, limit=float("inf"))):
                if done[i]:
                    continue
                if reason:
                    recorder.drop(i, f"{reason} at iteration {it}")
                    done[i] = True
                    continue
                trial = recorder.trials[i]
                trial.loss, trial.evaluations = float(distance[i]), it + 1
                trial.images, trial.labels = x[i].float().cpu(), y[i].argmax(-1).cpu()
                done[i] = it == self.iterations or trial.loss <= self.tolerance * float(problems.scale[i])
                recorder.record(i, it, trial.loss, trial.evaluations, x[i], last=done[i])
            live = [float(distance[i]) for i in range(k) if not recorder.trials[i].dropped]
            if progress and live:
                progress(it, min(live))
            if all(done):
                break
            with torch.no_grad():  # finished problems keep their recorded state; zero grads keep NaN out
                keep = torch.tensor([not d for d in done], device=loss.device)
                for w, g in zip(weights.values(), grads.values(), strict=True):
                    w.grad = torch.where(keep.view(-1, *[1] * (g.dim() - 1)), torch.nan_to_num(g), 0.0)
            optimizer.step()
        return recorder.trials
