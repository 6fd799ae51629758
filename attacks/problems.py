"""Many attack problems as one: the victim model as a function, targets x restarts stacked for one vmap."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, grad, grad_and_value
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from attacks.base import (
    AttackTarget,
    GradientFn,
    cross_entropy,
    defense_aware_observed,
    gradient_distance,
    has_defense_knowledge,
    matched_distance,
    observed_signal,
)
from attacks.unroll import simulated_signal


def attack_copy(model: nn.Module, device: torch.device) -> nn.Module:
    """A private copy of the victim model the attack may run functionally (the target is never mutated).

    BatchNorm layers in training mode normalise with batch statistics; their running-stat updates
    are in-place writes that torch.func cannot trace, and they do not change the gradient, so the
    copy stops tracking them.
    """
    model = copy.deepcopy(model).to(device)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.training:
            module.track_running_stats = False
            module.running_mean = module.running_var = module.num_batches_tracked = None
    return model


def model_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(trainable parameters, constants: frozen parameters and buffers), detached, by name."""
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    consts = {n: p.detach() for n, p in model.named_parameters() if not p.requires_grad}
    consts.update({n: b for n, b in model.named_buffers() if b is not None})
    return params, consts


def functional_gradient(model: nn.Module, *, vmapped: bool) -> GradientFn:
    """g(params, consts, x, y) -> the client's gradient as a tuple, differentiable w.r.t. x and y.

    vmapped=True gives a torch.func.grad version that composes with vmap; otherwise plain
    autograd with create_graph, which has less per-op overhead for a single problem.
    """
    names = [n for n, p in model.named_parameters() if p.requires_grad]

    def loss(params: dict, consts: dict, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return cross_entropy(functional_call(model, {**params, **consts}, (x,)), y)

    def func_gradient(params: dict, consts: dict, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
        g = grad(loss)(params, consts, x, y)
        return tuple(g[n] for n in names)

    def autograd_gradient(params: dict, consts: dict, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
        # Constant weights become fresh leaves; unrolled steps pass non-leaf weights already in the graph.
        params = {n: p if p.requires_grad else p.detach().requires_grad_() for n, p in params.items()}
        return torch.autograd.grad(loss(params, consts, x, y), [params[n] for n in names], create_graph=True)

    return func_gradient if vmapped else autograd_gradient


def stack_problems(tensors: Sequence[Any], repeats: int, device: torch.device) -> Any:
    """Stack per-target values (a tensor, a list or a dict of tensors) `repeats` times each: [K, ...]."""
    first = tensors[0]
    if isinstance(first, dict):
        return {k: stack_problems([t[k] for t in tensors], repeats, device) for k in first}
    if isinstance(first, (list, tuple)):
        return [stack_problems([t[i] for t in tensors], repeats, device) for i in range(len(first))]
    return torch.stack([t.detach().to(device) for t in tensors for _ in range(repeats)])


def value_and_grad(fn: Callable[..., Any], k: int, in_dims: tuple, argnum: int, *, has_aux: bool = False) -> Callable:
    """Map a scalar per-problem loss over K stacked problems: returns (d loss/d args[argnum], loss), both [K, ...].

    With has_aux, fn returns (loss, aux) and the result is (grads, (loss, aux)). K > 1:
    torch.func.vmap(grad_and_value(fn)), one batched evaluation. K == 1: plain autograd on the
    squeezed problem, which avoids functorch's per-op overhead.
    """
    if k > 1:
        return torch.func.vmap(
            grad_and_value(fn, argnums=argnum, has_aux=has_aux), in_dims=in_dims, randomness="different"
        )

    def single(*args: Any) -> tuple[Any, Any]:
        args = [a if d is None else tree_map(lambda t: t[0], a) for a, d in zip(args, in_dims, strict=True)]
        leaves, spec = tree_flatten(args[argnum])
        leaves = [t.detach().requires_grad_() for t in leaves]
        args[argnum] = tree_unflatten(leaves, spec)
        out = fn(*args)
        value = out[0] if has_aux else out
        grads = tree_unflatten(list(torch.autograd.grad(value, leaves)), spec)
        out = tree_map(lambda t: t.detach().unsqueeze(0), out)
        return tree_map(lambda t: t.unsqueeze(0), grads), out

    return single


@dataclass
class Problems:
    """K = targets x restarts independent problems, stacked as [K, ...]: target by target, its restarts together."""

    objective: str  # "gradient", "pseudo-gradient" or "unrolled" (attacks.base.observed_signal)
    signals: list[list[torch.Tensor]]  # each target's observed signal, as captured (before stacking)
    examples: int  # dummy examples per problem: the batch, or every example of a FedAvg update when unrolled
    k: int  # number of problems
    model: nn.Module  # the attack's copy of the first target's model, run functionally
    params: dict  # the targets' trainable weights, [K, ...] each
    consts: dict  # frozen weights and buffers
    observed: Any  # what each problem matches: the observed signal, with mask and rescale when defense-aware
    aware: bool  # whether any target carries defense knowledge (then `distance` is matched_distance)
    signal: GradientFn  # simulated signal of dummy data: gradient, or unrolled local SGD
    scale: torch.Tensor  # ||observed||² per problem [K], for the relative early stop

    def distance(self, simulated: Sequence[torch.Tensor], observed: Any) -> torch.Tensor:
        """The gradient distance one problem minimises: plain, or defense-aware (attacks.base.matched_distance)."""
        return matched_distance(simulated, observed) if self.aware else gradient_distance(simulated, observed)


def stack_targets(targets: Sequence[AttackTarget], restarts: int, device: torch.device, *, unroll: bool) -> Problems:
    """Set up every restart of every target (compatible targets: attacks.base.batching_key) as one stack."""
    first, r = targets[0], restarts
    k = len(targets) * r
    signals = [observed_signal(t, unroll=unroll) for t in targets]
    objective = signals[0][0]
    n = (first.recipe.num_examples or first.batch_size) if objective == "unrolled" else first.batch_size
    model = attack_copy(first.model, device)
    states = [model_state(attack_copy(t.model, device)) for t in targets]
    params = stack_problems([s[0] for s in states], r, device)
    consts = stack_problems([s[1] for s in states], r, device)
    aware = has_defense_knowledge(targets)
    matched = [defense_aware_observed(t, s[1]) if aware else s[1] for t, s in zip(targets, signals, strict=True)]
    observed = stack_problems(matched, r, device)
    signal = simulated_signal(objective, functional_gradient(model, vmapped=k > 1), first)
    plain = observed[0] if aware else observed
    scale = torch.stack([sum((o[i] ** 2).sum() for o in plain) for i in range(k)])
    return Problems(objective, [s[1] for s in signals], n, k, model, params, consts, observed, aware, signal, scale)


def with_dtype(problems: Problems, dtype: torch.dtype) -> Problems:
    """The problems with their floating-point weights, buffers and observed signals in `dtype` (the model is
    run functionally on them, so the whole optimisation then runs in that precision); unchanged in float32."""
    if dtype == torch.float32:
        return problems

    def cast(t: Any) -> Any:
        return t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t

    return dataclasses.replace(
        problems,
        params=tree_map(cast, problems.params),
        consts=tree_map(cast, problems.consts),
        observed=tree_map(cast, problems.observed),
        scale=cast(problems.scale),
    )
