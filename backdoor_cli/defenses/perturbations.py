"""Weight perturbations for two-point tuning steps: the gradient is taken at a moved point, applied at θ.

Both are plugged into `tuning.tune(perturb=...)`: called before a step's forward pass, each moves the
trainable weights and returns the function that puts them back before the optimiser step.

- `toward_origin` (PAM, Min et al., NeurIPS 2024): the point θ + ρ·(θ₀ − θ)/‖θ₀ − θ‖, a fixed
  distance back along the straight line to the suspect model θ₀. Descending there pushes the whole
  segment near θ, not only θ, to low clean loss, so the tuned model is driven out of the backdoored
  basin instead of resting on its rim (the paper's account of superficial safety).
- `sharpness_ascent` (SAM, Foret et al. 2021; adaptive SAM, Kwon et al. 2021): the point θ + ε with
  ε = ρ·T²g/‖Tg‖ along the batch gradient g, T = |θ| + η elementwise for ASAM (T = 1 for plain SAM).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch


def global_norm(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t.float()) for t in tensors]))


def _shift(params: Sequence[torch.nn.Parameter], deltas: Sequence[torch.Tensor]) -> Callable[[], None]:
    with torch.no_grad():
        torch._foreach_add_(list(params), list(deltas))

    def restore() -> None:
        with torch.no_grad():
            torch._foreach_sub_(list(params), list(deltas))

    return restore


def _noop() -> None:
    return None


def toward_origin(params: Sequence[torch.nn.Parameter], origin: Sequence[torch.Tensor], rho: float):
    """PAM's perturbation; at θ = θ₀ (the first step) the direction is undefined and the step is plain."""
    params = list(params)
    origin = [o.detach() for o in origin]

    def perturb(_grads_here) -> Callable[[], None]:
        if rho == 0:
            return _noop
        with torch.no_grad():
            direction = torch._foreach_sub(origin, [p.detach() for p in params])
            # No host read of the norm (it would stall a GPU each step): at θ = θ₀ the direction is all
            # zeros, so the clamped division gives a zero shift.
            scale = rho / global_norm(direction).clamp_min(torch.finfo(torch.float32).tiny)
            deltas = [d * scale for d in direction]
        return _shift(params, deltas)

    return perturb


def sharpness_ascent(params: Sequence[torch.nn.Parameter], rho: float, adaptive: bool, eta: float = 0.01):
    """(A)SAM's perturbation; it runs one extra forward/backward per step for the ascent gradient."""
    params = list(params)

    def perturb(grads_here) -> Callable[[], None]:
        if rho == 0:
            return _noop
        grads_here()
        with torch.no_grad():
            pairs = [(p, p.grad) for p in params if p.grad is not None]
            if not pairs:
                return _noop
            moved = [p for p, _ in pairs]
            scales = [p.detach().abs() + eta if adaptive else torch.ones_like(p) for p, _ in pairs]
            scaled = [s * g for s, (_, g) in zip(scales, pairs)]
            factor = rho / global_norm(scaled).clamp_min(torch.finfo(torch.float32).tiny)
            deltas = [s * sg * factor for s, sg in zip(scales, scaled)]
        return _shift(moved, deltas)

    return perturb
