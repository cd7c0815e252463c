"""Sampling SiT: integrate its velocity field from noise (t = 1) to data (t = 0).

The flow-matching path is ``x_t = alpha_t x_0 + sigma_t eps`` with ``alpha = 1 - t, sigma = t``
(linear) or ``alpha = cos(pi t / 2), sigma = sin(pi t / 2)`` (cosine); the model predicts the
velocity ``v = dx_t / dt``. Three solvers, all stepping in float64 as the original does (the model
itself runs in its own dtype):

* ``euler`` and ``heun``: the probability-flow ODE ``dx = v dt`` on ``num_steps`` equal steps from
  1 to 0; Heun averages the slope at both ends of a step, except on the last step (t_next = 0).
* ``euler-maruyama``: the reverse SDE ``dx = [v - g^2/2 * score] dt + g dW`` with ``g^2 = 2t``,
  where the score follows from the velocity,
  ``score = (r v - x) / (sigma^2 - r sigma sigma')`` with ``r = alpha / alpha'``. Steps run from 1
  to 0.04 (``num_steps - 1`` stochastic steps) and a last noise-free step goes to 0.

Classifier-free guidance mixes the velocities of the label and of the null class,
``v = v_null + s (v_label - v_null)``, in one forward on the stacked batch, and only while
``low <= t <= high``; elsewhere a single unguided forward is made.
"""
from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

from ctok.sampling.noise import Generators, check_generators, randn
from ctok.validation import check_labels, check_tensor

SOLVERS = ("euler", "heun", "euler-maruyama")
PATHS = ("linear", "cosine")
# The SDE stops injecting noise here: the score of the linear path diverges as t -> 0.
SDE_LAST_TIME = 0.04


def path_coefficients(t: float, path_type: str) -> tuple[float, float, float, float]:
    """(alpha_t, d alpha/dt, sigma_t, d sigma/dt) of the interpolation ``alpha x_0 + sigma eps``."""
    if path_type == "linear":
        return 1.0 - t, -1.0, t, 1.0
    half_pi = math.pi / 2
    return (math.cos(half_pi * t), -half_pi * math.sin(half_pi * t),
            math.sin(half_pi * t), half_pi * math.cos(half_pi * t))


def sde_drift_coefficients(t: float, path_type: str) -> tuple[float, float]:
    """(a, b) with the reverse-SDE drift ``v - t * score(v, x) = a v + b x`` at time t.

    The diffusion is g^2 = 2t, so the score correction is ``t * (r v - x) / var``.
    Writing the drift as two scalars keeps each step to a couple of tensor operations.
    """
    alpha, d_alpha, sigma, d_sigma = path_coefficients(t, path_type)
    ratio = alpha / d_alpha
    var = sigma**2 - ratio * d_sigma * sigma
    return 1.0 - t * ratio / var, t / var


def model_dtype(model: torch.nn.Module) -> torch.dtype:
    """The dtype the model computes in (its first floating parameter), float32 if it has none."""
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def check_guidance(model: torch.nn.Module, cfg_scale: float) -> None:
    if cfg_scale < 1.0:
        raise ValueError(f"cfg_scale must be >= 1 (1 turns guidance off), got {cfg_scale}")
    if cfg_scale > 1.0 and not model.has_null_class:
        raise ValueError(f"cfg_scale {cfg_scale} needs a null class, but this {type(model).__name__} was trained "
                         "without label dropout (class_dropout_prob = 0); use cfg_scale 1")


def check_sampler_inputs(model: torch.nn.Module, noise: torch.Tensor, labels: torch.Tensor, num_steps: int) -> None:
    check_tensor("noise", noise, (None, model.num_tokens, model.in_channels))
    # The null class is a valid label too: it samples unconditionally.
    check_labels("labels", labels, noise.shape[0], model.num_classes + int(model.has_null_class))
    if labels.device != noise.device:
        raise ValueError(f"labels are on {labels.device} but noise is on {noise.device}")
    if not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive integer, got {num_steps!r}")


@torch.no_grad()
def sample_sit(
    model: torch.nn.Module,
    noise: torch.Tensor,
    labels: torch.Tensor,
    num_steps: int = 250,
    solver: str = "euler-maruyama",
    cfg_scale: float = 1.0,
    guidance_interval: tuple[float, float] = (0.0, 1.0),
    path_type: str | None = None,
    generator: Generators = None,
    progress: bool = False,
) -> torch.Tensor:
    """Draw latents from a SiT by integrating from ``noise`` (B, N, D) at t = 1 to t = 0.

    Args:
        model: a SiT (``model(x, t, y) -> v``), in eval mode.
        noise: the starting point, standard normal latents.
        labels: (B,) class ids; the null class ``model.num_classes`` samples unconditionally.
        num_steps: solver steps (model evaluations per sample: ``num_steps`` for Euler and
            Euler-Maruyama, ``2 num_steps - 1`` for Heun; twice the batch while guided).
        solver: ``"euler"``, ``"heun"`` or ``"euler-maruyama"``.
        cfg_scale: guidance scale s; 1 disables guidance.
        guidance_interval: (low, high): guide only while low <= t <= high.
        path_type: ``"linear"`` or ``"cosine"``, used by the SDE's score; None takes the model's
            ``config.path_type`` (linear if it has none).
        generator: the SDE's noise source: one ``torch.Generator``, or a list with one per
            sample so that a sample's result does not depend on its batch-mates.
        progress: show a progress bar over the steps.

    Returns:
        The final latents, (B, N, D), in the dtype of ``noise``.
    """
    check_sampler_inputs(model, noise, labels, num_steps)
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
    if path_type is None:
        path_type = getattr(getattr(model, "config", None), "path_type", "linear")
    if path_type not in PATHS:
        raise ValueError(f"path_type must be one of {PATHS}, got {path_type!r}")
    check_guidance(model, cfg_scale)
    low, high = (float(v) for v in guidance_interval)
    if not 0.0 <= low <= high <= 1.0:
        raise ValueError(f"guidance_interval must satisfy 0 <= low <= high <= 1, got ({low}, {high})")
    batch = noise.shape[0]
    check_generators(generator, batch, noise.device)

    dtype = model_dtype(model)
    stacked_labels = torch.cat([labels, torch.full_like(labels, model.num_classes)])

    def guided(t: float) -> bool:
        return cfg_scale > 1.0 and low <= t <= high

    def velocity(x: torch.Tensor, t: float, guide: bool) -> torch.Tensor:
        if not guide:
            time = torch.full((batch,), t, dtype=dtype, device=x.device)
            return model(x.to(dtype), time, labels).to(torch.float64)
        time = torch.full((2 * batch,), t, dtype=dtype, device=x.device)
        cond, uncond = model(torch.cat([x, x]).to(dtype), time, stacked_labels).to(torch.float64).chunk(2)
        return uncond + cfg_scale * (cond - uncond)

    x = noise.to(torch.float64)
    if solver == "euler-maruyama":
        # num_steps - 1 stochastic steps from 1 to SDE_LAST_TIME, then one deterministic step to 0.
        times = torch.linspace(1.0, SDE_LAST_TIME, num_steps, dtype=torch.float64).tolist() + [0.0]
        for i in tqdm(range(num_steps), desc="sampling", disable=not progress, leave=False):
            t_cur, t_next = times[i], times[i + 1]
            dt = t_next - t_cur
            a, b = sde_drift_coefficients(t_cur, path_type)
            drift = a * velocity(x, t_cur, guided(t_cur)) + b * x
            if i == num_steps - 1:
                x = x + dt * drift
            else:
                dw = randn(x.shape, generator, x.device, x.dtype) * math.sqrt(abs(dt))
                x = x + dt * drift + math.sqrt(2.0 * t_cur) * dw
    else:
        times = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64).tolist()
        for i in tqdm(range(num_steps), desc="sampling", disable=not progress, leave=False):
            t_cur, t_next = times[i], times[i + 1]
            guide = guided(t_cur)
            slope = velocity(x, t_cur, guide)
            x_next = x + (t_next - t_cur) * slope
            if solver == "heun" and i < num_steps - 1:
                # The corrector keeps the guidance decision of t_cur, as the original does.
                slope_next = velocity(x_next, t_next, guide)
                x_next = x + (t_next - t_cur) * (0.5 * slope + 0.5 * slope_next)
            x = x_next
    return x.to(noise.dtype)
