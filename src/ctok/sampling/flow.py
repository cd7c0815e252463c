"""SiT's flow-matching path, and sampling SiT by integrating its velocity from noise (t = 1) to data (t = 0).

The path is ``x_t = alpha_t x_0 + sigma_t eps`` with ``alpha = 1 - t, sigma = t`` (linear) or
``alpha = cos(pi t / 2), sigma = sin(pi t / 2)`` (cosine); the model predicts the velocity
``v = dx_t / dt = alpha'_t x_0 + sigma'_t eps``. :class:`FlowPath` holds these coefficients once,
for the training loss and for the samplers alike, so that the velocity a model learns is the one it
is sampled with (as SiT's ``transport`` package does).

Three solvers, all stepping in float64 as the original does (the model itself runs in its own dtype):

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

import contextlib
import math
from collections.abc import Sequence
from typing import Protocol

import torch
from tqdm.auto import tqdm

from ctok.models.diffusion_transformer import PATH_TYPES, DiffusionTransformer
from ctok.models.tokenizer import Tokenizer
from ctok.sampling.noise import Generators, check_generators, randn
from ctok.validation import check_labels, check_tensor

SOLVERS = ("euler", "heun", "euler-maruyama")
TIME_SAMPLINGS = ("uniform", "lognormal")
# The SDE stops injecting noise here: the score of the linear path diverges as t -> 0.
SDE_LAST_TIME = 0.04

# A time: a Python float while sampling (every sample shares it), a tensor while training (one per sample).
Time = float | torch.Tensor
# Class ids as the samplers take them: a tensor (B,), or a list of B ints.
Labels = torch.Tensor | Sequence[int]
# What a sampler reads off its model besides calling it.
GENERATOR_ATTRIBUTES = ("num_tokens", "in_channels", "num_classes", "has_null_class")


class PerSampleRandom(Protocol):
    """One random number per sample of the batch on each call, as ``ctok.training.sharding.BatchRandom`` draws."""

    def rand(self) -> torch.Tensor:
        """Uniform numbers in [0, 1), one per sample (B,)."""

    def randn(self) -> torch.Tensor:
        """Standard normal numbers, one per sample (B,)."""


class FlowPath:
    """The interpolation ``x_t = alpha_t x_0 + sigma_t eps`` of one path type, for training and sampling.

    Every function of t takes a Python float or a tensor and computes with the same formulas:
    ``math`` functions on a float (the samplers step in float64 scalars, as the original does),
    ``torch`` functions elementwise on a tensor.

    Args:
        path_type: ``"linear"`` or ``"cosine"`` (a SiT's ``config.path_type``).
    """

    def __init__(self, path_type: str):
        if path_type not in PATH_TYPES:
            raise ValueError(f"path_type must be one of {PATH_TYPES}, got {path_type!r}")
        self.path_type = path_type

    def coefficients(self, t: Time) -> tuple[Time, Time, Time, Time]:
        """(alpha_t, d alpha/dt, sigma_t, d sigma/dt) at t.

        The linear path's derivatives are the constants -1 and 1, returned as floats: they broadcast
        against a tensor t, and multiplying by them is exact, so nothing is lost by not expanding them.
        """
        if self.path_type == "linear":
            return 1 - t, -1.0, t, 1.0
        ops = torch if torch.is_tensor(t) else math
        half_pi = math.pi / 2
        return (ops.cos(half_pi * t), -half_pi * ops.sin(half_pi * t),
                ops.sin(half_pi * t), half_pi * ops.cos(half_pi * t))

    # -- training ------------------------------------------------------------------------------
    def sample_time(self, rng: PerSampleRandom, time_sampling: str) -> torch.Tensor:
        """Training times in (0, 1), one per sample, drawn with a single call of ``rng``.

        ``"uniform"``, or ``"lognormal"`` in the noise-to-signal ratio: sigma_t / alpha_t = exp(n)
        with n ~ N(0, 1), which is t = sigmoid(n) on the linear path (the SiT recipe) and
        tan(pi t / 2) = exp(n) on the cosine path.
        """
        if time_sampling not in TIME_SAMPLINGS:
            raise ValueError(f"time_sampling must be one of {TIME_SAMPLINGS}, got {time_sampling!r}")
        if time_sampling == "uniform":
            return rng.rand()
        log_ratio = rng.randn()
        if self.path_type == "linear":
            return torch.sigmoid(log_ratio)
        return torch.atan(log_ratio.exp()) / (math.pi / 2)

    def training_targets(self, x0: torch.Tensor, t: torch.Tensor,
                         noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_t, v): the point of the path at per-sample times t (B,) and its velocity dx_t/dt there."""
        alpha, d_alpha, sigma, d_sigma = self.coefficients(t.view(-1, *([1] * (x0.dim() - 1))))
        return alpha * x0 + sigma * noise, d_alpha * x0 + d_sigma * noise

    def training_loss(self, model, x0: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
                      noise: torch.Tensor) -> torch.Tensor:
        """SiT's loss: the mean squared error of the predicted velocity ``model(x_t, t, y)``, over all elements.

        ``x0`` are the (normalised) latents, ``t`` the times (B,), ``y`` the labels, ``noise`` eps.
        """
        x_t, target = self.training_targets(x0, t, noise)
        return (model(x_t, t, y).float() - target).pow(2).mean()

    # -- sampling ------------------------------------------------------------------------------
    def sde_drift(self, t: Time) -> tuple[Time, Time]:
        """(a, b) with the reverse-SDE drift ``v - g_t^2 / 2 * score(v, x) = a v + b x`` at time t.

        The score follows from the velocity (see the module docstring), so the drift is affine in
        (v, x); two scalars keep each sampler step to a couple of tensor operations.
        """
        alpha, d_alpha, sigma, d_sigma = self.coefficients(t)
        ratio = alpha / d_alpha
        var = sigma**2 - ratio * d_sigma * sigma
        half_g2 = self._diffusion_squared(t) / 2
        return 1.0 - half_g2 * ratio / var, half_g2 / var

    def sde_diffusion(self, t: Time) -> Time:
        """g_t, the reverse SDE's noise scale at time t."""
        ops = torch if torch.is_tensor(t) else math
        return ops.sqrt(self._diffusion_squared(t))

    def _diffusion_squared(self, t: Time) -> Time:
        # g^2 = 2t, SiT's choice for both paths; halving it again is exact, so the drift sees t itself.
        return 2.0 * t


def model_dtype(model: torch.nn.Module) -> torch.dtype:
    """The dtype the model computes in (its first floating parameter), float32 if it has none."""
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def check_guidance(model: torch.nn.Module, cfg_scale: float) -> None:
    """Raise ValueError for a guidance scale below 1, or above 1 for a model without a null class."""
    if cfg_scale < 1.0:
        raise ValueError(f"cfg_scale must be >= 1 (1 turns guidance off), got {cfg_scale}")
    if cfg_scale > 1.0 and not model.has_null_class:
        raise ValueError(f"cfg_scale {cfg_scale} needs a null class, but this {type(model).__name__} was trained "
                         "without label dropout (class_dropout_prob = 0); use cfg_scale 1")


def check_generator(model: torch.nn.Module, kind: str) -> None:
    """Raise unless ``model`` can be sampled by ``sample_{kind}`` (kind ``"sit"`` or ``"dit"``) as it is.

    A SiT and a DiT take the same inputs, so the wrong one runs and returns garbage (a SiT's
    velocity read as noise gives latents with a std in the tens of thousands); both are refused by
    name. Any other module with the generator attributes is accepted (tests sample exact toy
    models). The model must be in eval mode: in train mode label dropout would replace some labels
    by the null class.
    """
    names = {"sit": "SiT", "dit": "DiT"}
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a {names[kind]} (a torch.nn.Module), got {type(model).__name__}")
    if isinstance(model, DiffusionTransformer) and model.kind != kind:
        raise ValueError(f"sample_{kind} samples a {names[kind]}, but model is a {names[model.kind]}: "
                         f"use sample_{model.kind}")
    if isinstance(model, Tokenizer):
        raise ValueError(f"model must be a {names[kind]}, got a {model.variant} tokenizer: sample latents with the "
                         f"{names[kind]} trained on its latents and decode them with ctok.LatentPipeline")
    missing = [name for name in GENERATOR_ATTRIBUTES if not hasattr(model, name)]
    if missing:
        raise ValueError(f"model must be a {names[kind]}; a {type(model).__name__} has no {', '.join(missing)}")
    if model.training:
        raise ValueError("model is in train mode, where label dropout would change the samples: "
                         "call model.eval() first")


def check_sampler_inputs(model: torch.nn.Module, kind: str, noise: torch.Tensor, labels: Labels,
                         num_steps: int) -> torch.Tensor:
    """Check a sampler's arguments (see :func:`check_generator`); returns ``labels`` as a tensor on
    ``noise``'s device (a list of ints is converted).

    This is the sampling call's only check of values: the steps run under :func:`inputs_checked`.
    """
    check_generator(model, kind)
    check_tensor("noise", noise, (None, model.num_tokens, model.in_channels))
    if not isinstance(labels, torch.Tensor):
        try:
            labels = torch.as_tensor(labels, device=noise.device)
        except (TypeError, ValueError, RuntimeError):
            raise ValueError(f"labels must be a tensor or a list of class ids, got {labels!r}") from None
    if labels.dim() == 0:  # one number could mean a class for all samples or a sample count: refuse both
        raise ValueError(f"labels must hold one class id per sample ({noise.shape[0]}), got the single value "
                         f"{labels.item()!r}: pass [label] * {noise.shape[0]} for one class throughout")
    # The null class is a valid label too: it samples unconditionally.
    check_labels("labels", labels, noise.shape[0], model.num_classes + int(model.has_null_class))
    if labels.device != noise.device:
        raise ValueError(f"labels are on {labels.device} but noise is on {noise.device}")
    if not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive integer, got {num_steps!r}")
    return labels


def inputs_checked(model: torch.nn.Module) -> contextlib.AbstractContextManager:
    """The solver loop's context: ctok's SiT and DiT skip their per-call input checks in it
    (:meth:`~ctok.models.diffusion_transformer.DiffusionTransformer.inputs_checked`), whose reads of
    device values would stall every step; :func:`check_sampler_inputs` has checked the inputs the
    steps are built from. Other modules (toy models in tests) are called as they are."""
    return model.inputs_checked() if isinstance(model, DiffusionTransformer) else contextlib.nullcontext()


@torch.no_grad()
def sample_sit(
    model: torch.nn.Module,
    noise: torch.Tensor,
    labels: Labels,
    num_steps: int = 250,
    solver: str = "euler-maruyama",
    cfg_scale: float = 1.0,
    guidance_interval: tuple[float, float] = (0.0, 1.0),
    path_type: str | None = None,
    generator: Generators = None,
    progress: bool = False,
) -> torch.Tensor:
    """Draw latents from a SiT by integrating from ``noise`` (B, N, D) at t = 1 to t = 0.

    The latents are in the normalised space the SiT was trained in, not the tokenizer's: decode them
    with :meth:`ctok.LatentPipeline.decode`, which undoes the normalisation (or, by hand,
    ``tokenizer.decode(z * std + mean)`` with the generator's latent statistics).
    :meth:`ctok.LatentPipeline.generate` does all of it in one call.

    Args:
        model: a SiT (``model(x, t, y) -> v``), in eval mode (a DiT, a tokenizer or a model left in
            train mode is refused).
        noise: the starting point, standard normal latents.
        labels: (B,) class ids, a tensor or a list of ints; the null class ``model.num_classes``
            samples unconditionally.
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
        The final latents, (B, N, D), normalised, in the dtype of ``noise``.
    """
    labels = check_sampler_inputs(model, "sit", noise, labels, num_steps)
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
    if path_type is None:
        path_type = getattr(getattr(model, "config", None), "path_type", "linear")
    path = FlowPath(path_type)
    check_generators(generator, noise.shape[0], noise.device)
    velocity = GuidedVelocity(model, labels, cfg_scale, guidance_interval)
    x = noise.to(torch.float64)
    steps = tqdm(range(num_steps), desc="sampling", disable=not progress, leave=False)
    with inputs_checked(model):
        if solver == "euler-maruyama":
            x = _integrate_sde(velocity, path, x, steps, generator)
        else:
            x = _integrate_ode(velocity, x, steps, heun=solver == "heun")
    return x.to(noise.dtype)


class GuidedVelocity:
    """A SiT's velocity in float64, with classifier-free guidance inside the guidance interval.

    Guided, the label and the null class go through the model as one stacked batch and their
    velocities are mixed as ``v_null + s (v_label - v_null)``; outside the interval (or with s = 1)
    a single unguided forward is made.
    """

    def __init__(self, model: torch.nn.Module, labels: torch.Tensor, cfg_scale: float,
                 guidance_interval: tuple[float, float]):
        check_guidance(model, cfg_scale)
        low, high = (float(v) for v in guidance_interval)
        if not 0.0 <= low <= high <= 1.0:
            raise ValueError(f"guidance_interval must satisfy 0 <= low <= high <= 1, got ({low}, {high})")
        self.model, self.labels, self.cfg_scale, self.low, self.high = model, labels, cfg_scale, low, high
        self.stacked_labels = torch.cat([labels, torch.full_like(labels, model.num_classes)])
        self.dtype = model_dtype(model)

    def guided(self, t: float) -> bool:
        """Whether the step that starts at time ``t`` is guided."""
        return self.cfg_scale > 1.0 and self.low <= t <= self.high

    def __call__(self, x: torch.Tensor, t: float, guide: bool) -> torch.Tensor:
        """The velocity at latents x (float64) and time t, guided or not as ``guide`` says."""
        batch = x.shape[0]
        if not guide:
            time = torch.full((batch,), t, dtype=self.dtype, device=x.device)
            return self.model(x.to(self.dtype), time, self.labels).to(torch.float64)
        time = torch.full((2 * batch,), t, dtype=self.dtype, device=x.device)
        both = self.model(torch.cat([x, x]).to(self.dtype), time, self.stacked_labels)
        cond, uncond = both.to(torch.float64).chunk(2)
        return uncond + self.cfg_scale * (cond - uncond)


def solver_times(solver: str, num_steps: int) -> list[float]:
    """The ``num_steps + 1`` times a solver steps through, from 1 to 0: equal steps for the ODE
    solvers; for Euler-Maruyama equal steps from 1 to :data:`SDE_LAST_TIME`, then 0."""
    if solver == "euler-maruyama":
        return torch.linspace(1.0, SDE_LAST_TIME, num_steps, dtype=torch.float64).tolist() + [0.0]
    return torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64).tolist()


def function_evaluations(solver: str, num_steps: int, cfg_scale: float = 1.0,
                         guidance_interval: tuple[float, float] = (0.0, 1.0)) -> int:
    """Model evaluations per sample of :func:`sample_sit`: one per step (Heun: two, except on the
    last step), each counted twice where the step is guided (the null-class forward)."""
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
    low, high = guidance_interval
    times = solver_times(solver, num_steps)
    total = 0
    for i in range(num_steps):
        per_forward = 2 if cfg_scale > 1.0 and low <= times[i] <= high else 1
        total += per_forward * (2 if solver == "heun" and i < num_steps - 1 else 1)
    return total


def _integrate_ode(velocity: GuidedVelocity, x: torch.Tensor, steps, heun: bool) -> torch.Tensor:
    """Euler or Heun steps of ``dx = v dt`` over equal steps from t = 1 to 0."""
    num_steps = len(steps)
    times = solver_times("heun" if heun else "euler", num_steps)
    for i in steps:
        t_cur, t_next = times[i], times[i + 1]
        guide = velocity.guided(t_cur)
        slope = velocity(x, t_cur, guide)
        x_next = x + (t_next - t_cur) * slope
        if heun and i < num_steps - 1:
            # The corrector keeps the guidance decision of t_cur, as the original does.
            slope_next = velocity(x_next, t_next, guide)
            x_next = x + (t_next - t_cur) * (0.5 * slope + 0.5 * slope_next)
        x = x_next
    return x


def _integrate_sde(velocity: GuidedVelocity, path: FlowPath, x: torch.Tensor, steps,
                   generator: Generators) -> torch.Tensor:
    """Euler-Maruyama on the reverse SDE: ``num_steps - 1`` stochastic steps from 1 to
    :data:`SDE_LAST_TIME`, then one deterministic step to 0."""
    num_steps = len(steps)
    times = solver_times("euler-maruyama", num_steps)
    for i in steps:
        t_cur, t_next = times[i], times[i + 1]
        dt = t_next - t_cur
        a, b = path.sde_drift(t_cur)
        drift = a * velocity(x, t_cur, velocity.guided(t_cur)) + b * x
        if i == num_steps - 1:
            x = x + dt * drift
        else:
            dw = randn(x.shape, generator, x.device, x.dtype) * math.sqrt(abs(dt))
            x = x + dt * drift + path.sde_diffusion(t_cur) * dw
    return x
