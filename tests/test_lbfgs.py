"""Tests of the batched L-BFGS: it follows torch.optim.LBFGS per problem, and a reset problem starts afresh."""

from __future__ import annotations

import torch

from attacks.lbfgs import BatchedLBFGS


def test_batched_lbfgs_follows_torch_lbfgs() -> None:
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(20, 20, generator=gen)
    a = a @ a.T / 20 + 0.1 * torch.eye(20)
    b = torch.randn(20, generator=gen)

    def f(v: torch.Tensor) -> torch.Tensor:
        return 0.5 * v @ a @ v - b @ v + 0.1 * (v**4).sum()

    start = torch.randn(20, generator=gen)
    v = start.clone().requires_grad_()
    reference = torch.optim.LBFGS([v], history_size=5)

    def closure() -> torch.Tensor:
        reference.zero_grad()
        loss = f(v)
        loss.backward()
        return loss

    def batched(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = z.detach().requires_grad_()
        losses = torch.stack([f(row) for row in z])
        return torch.autograd.grad(losses.sum(), z)[0], losses.detach()

    ours = BatchedLBFGS(torch.stack([start, torch.randn(20, generator=gen), start]), batched, history_size=5)
    for _ in range(4):
        reference.step(closure)
        ours.step()
    assert torch.allclose(ours.z[0], v.detach(), atol=1e-5) and torch.equal(ours.z[0], ours.z[2])
    # Float-level differences can move a tolerance_change stop by one evaluation near convergence.
    assert abs(int(ours.evaluations[0]) - reference.state[v]["func_evals"]) <= 1


def test_a_reset_problem_restarts_from_steepest_descent() -> None:
    """After `reset`, a problem steps exactly as a fresh optimiser started at its current point would."""
    gen = torch.Generator().manual_seed(1)
    a = torch.randn(20, 20, generator=gen)
    hessian = a @ a.T + torch.eye(20)

    def batched(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        losses = 0.5 * torch.einsum("ki,ij,kj->k", z, hessian, z) + z.sum(1)
        return z @ hessian + 1, losses

    ours = BatchedLBFGS(torch.randn(2, 20, generator=gen), batched, history_size=5, max_iter=3)
    for _ in range(3):
        ours.step()
    ours.reset(torch.tensor([True, False]))
    fresh = BatchedLBFGS(ours.z[:1].clone(), batched, history_size=5, max_iter=3)
    kept, start = ours.z[1].clone(), ours.z[0].clone()
    ours.step()
    fresh.step()
    assert not torch.allclose(fresh.z[0], start)  # not yet converged: the comparison means something
    assert torch.allclose(ours.z[0], fresh.z[0], atol=1e-6) and int(ours.count[0]) == int(fresh.count[0])
    assert not torch.equal(ours.z[1], kept)  # the other problem went on with its own memory


def test_the_armijo_line_search_never_raises_the_loss() -> None:
    """On a steep quartic a full step of torch's L-BFGS overshoots; with the line search every step goes down."""
    gen = torch.Generator().manual_seed(2)

    def batched(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return 4 * z**3 + z, (z**4).sum(1) + 0.5 * (z**2).sum(1)

    start = 3 * torch.randn(2, 10, generator=gen)
    plain = BatchedLBFGS(start.clone(), batched, lr=5.0, max_iter=1)
    searched = BatchedLBFGS(start.clone(), batched, lr=5.0, max_iter=1, line_search="armijo")
    plain_losses, searched_losses = [], []
    for _ in range(15):
        plain_losses.append(plain.step())
        searched_losses.append(searched.step())
    plain_losses, searched_losses = torch.stack(plain_losses), torch.stack(searched_losses)
    assert bool((plain_losses[1:] > plain_losses[:-1]).any())  # the plain step overshoots at least once
    assert bool((searched_losses[1:] <= searched_losses[:-1]).all())
    assert float(searched.loss.max()) < 1e-3 * float(searched_losses[0].min())


def test_relative_tolerances_make_a_problem_with_a_small_loss_take_the_same_steps() -> None:
    """Problem 1 is problem 0's loss divided by 1000 (like a DLG photo whose class the model already
    predicts). With torch's absolute tolerances it stops its inner iterations early; with `scale` it
    follows problem 0 step for step."""
    gen = torch.Generator().manual_seed(3)
    a = torch.randn(30, 30, generator=gen)
    a = a @ a.T / 30 + 1e-3 * torch.eye(30)  # ill-conditioned: progress needs the full inner iterations
    b = torch.randn(30, generator=gen)
    weight = torch.tensor([1.0, 0.001])

    def batched(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = z.detach().requires_grad_()
        rows = zip(weight, z, strict=True)
        losses = torch.stack([w * (0.5 * row @ a @ row - b @ row + 0.1 * (row**4).sum()) for w, row in rows])
        return torch.autograd.grad(losses.sum(), z)[0], losses.detach()

    start = torch.randn(30, generator=gen).repeat(2, 1)
    absolute = BatchedLBFGS(start.clone(), batched, line_search="armijo", tolerance_change=1e-5)
    relative = BatchedLBFGS(start.clone(), batched, line_search="armijo", tolerance_change=1e-5, scale=weight)
    for _ in range(3):
        absolute.step()
        relative.step()
    assert torch.allclose(relative.z[0], relative.z[1], atol=1e-2)  # float rounding only
    assert int(absolute.evaluations[1]) < int(absolute.evaluations[0])  # the small loss stopped early
    assert int(absolute.evaluations[1]) < int(relative.evaluations[1])
    assert float(relative.loss[1] / weight[1]) < float(absolute.loss[1] / weight[1]) - 1e-3  # measured: 1.2e-2
    assert torch.equal(absolute.z[0], relative.z[0])  # scale 1 is torch's run
