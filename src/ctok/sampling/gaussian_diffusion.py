"""Gaussian diffusion for DiT: noise schedules, respacing, DDPM/DDIM sampling and the training loss.

The forward process is ``q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I)`` with
``abar_t = prod_{s <= t} (1 - beta_s)`` over ``T = 1000`` steps. DiT predicts the noise ``eps``
and, with learned sigma, a value ``v`` in [-1, 1] per channel that places the reverse step's
log-variance between the posterior variance ``beta~_t`` and ``beta_t`` (IDDPM's learned range):

    log sigma_t^2 = (v + 1)/2 * log beta_t + (1 - v)/2 * log beta~_t.

Sampling uses a respaced process: K of the T steps, kept evenly spaced, with betas recomputed
so that the kept steps have the same ``abar``; the model is always given the original step index.
Latents are not images, so the predicted x_0 is never clipped.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from tqdm.auto import tqdm

from ctok.models.diffusion_transformer import NOISE_SCHEDULES
from ctok.sampling.flow import Labels, check_guidance, check_sampler_inputs, inputs_checked, model_dtype
from ctok.sampling.noise import Generators, check_generators, randn

SOLVERS = ("ddpm", "ddim")


def beta_schedule(name: str, num_timesteps: int = 1000) -> np.ndarray:
    """Betas of the named schedule, float64.

    ``linear``: Ho et al.'s 1e-4 .. 0.02, scaled by 1000 / T so that other step counts keep the
    same total noise. ``cosine``: Nichol & Dhariwal's ``abar(s) = cos^2((s + 0.008) / 1.008 * pi/2)``
    discretised as ``beta_i = 1 - abar((i+1)/T) / abar(i/T)``, capped at 0.999.
    """
    if name == "linear":
        scale = 1000.0 / num_timesteps
        return np.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=np.float64)
    if name == "cosine":
        s = np.arange(num_timesteps + 1, dtype=np.float64) / num_timesteps
        abar = np.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
        return np.minimum(1.0 - abar[1:] / abar[:-1], 0.999)
    raise ValueError(f"noise_schedule must be one of {NOISE_SCHEDULES}, got {name!r}")


def space_timesteps(num_timesteps: int, count: int) -> list[int]:
    """``count`` step indices spread evenly over [0, num_timesteps - 1], both ends included.

    The stride is accumulated in floating point and each position rounded (half to even), as the
    ADM/DiT ``space_timesteps`` does with one section, so that the kept steps are the same.
    """
    if not isinstance(count, int) or not 1 <= count <= num_timesteps:
        raise ValueError(f"the number of sampling steps must be an integer in [1, {num_timesteps}], got {count!r}")
    stride = 1.0 if count == 1 else (num_timesteps - 1) / (count - 1)
    steps, position = [], 0.0
    for _ in range(count):
        steps.append(round(position))
        position += stride
    return steps


class GaussianDiffusion:
    """The schedule of a (possibly respaced) diffusion process and what is computed from it.

    Args:
        noise_schedule: ``"linear"`` or ``"cosine"``.
        num_timesteps: steps of the training process (1000 for every released DiT).
        respacing: keep only this many evenly spaced steps (for sampling); None keeps all.
    """

    def __init__(self, noise_schedule: str = "linear", num_timesteps: int = 1000, respacing: int | None = None):
        base = beta_schedule(noise_schedule, num_timesteps)
        if respacing is None:
            self.timestep_map = list(range(num_timesteps))
            betas = base
        else:
            self.timestep_map = space_timesteps(num_timesteps, respacing)
            abar = np.cumprod(1.0 - base)[self.timestep_map]
            betas = 1.0 - abar / np.append(1.0, abar[:-1])
        self.num_timesteps = len(betas)
        self.betas = betas
        self.alphas_cumprod = np.cumprod(1.0 - betas)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        abar, abar_prev = self.alphas_cumprod, self.alphas_cumprod_prev
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / abar)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / abar - 1.0)
        self.posterior_variance = betas * (1.0 - abar_prev) / (1.0 - abar)
        # The posterior variance is 0 at the first step; its log takes step 1's value there instead.
        # (A one-step process never adds noise, so any finite value does.)
        clipped = np.append(self.posterior_variance[1], self.posterior_variance[1:]) if len(betas) > 1 else betas
        self.posterior_log_variance_clipped = np.log(clipped)
        self.log_betas = np.log(betas)
        # Without learned sigma DiT uses the larger bound, beta_t (beta~_1 at the first step).
        self.fixed_log_variance = np.log(np.append(clipped[0], betas[1:]))
        self.posterior_mean_coef1 = betas * np.sqrt(abar_prev) / (1.0 - abar)
        self.posterior_mean_coef2 = (1.0 - abar_prev) * np.sqrt(1.0 - betas) / (1.0 - abar)
        self._device_tables: dict[torch.device, dict[str, torch.Tensor]] = {}

    # -- per-sample coefficients (training: every sample has its own t) ----------------------
    _TABLES = ("alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod", "log_betas",
               "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2", "timestep_map")

    def _table(self, name: str, device: torch.device) -> torch.Tensor:
        tables = self._device_tables.get(device)
        if tables is None:
            # Copied once per device, so that a training step does not upload tables every time.
            tables = {k: torch.as_tensor(np.asarray(getattr(self, k)), device=device) for k in self._TABLES}
            self._device_tables[device] = tables
        return tables[name]

    def _extract(self, name: str, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Row t[i] of table ``name`` for every sample, in ``like``'s dtype, broadcastable against it."""
        return self._table(name, t.device)[t].to(like.dtype).view(-1, *([1] * (like.dim() - 1)))

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, for integer steps t (B,)."""
        abar = self._extract("alphas_cumprod", t, x0)
        return abar.sqrt() * x0 + (1.0 - abar).sqrt() * noise

    def training_losses(self, model, x0: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
                        noise: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """DiT's per-sample loss at steps t (B,) of this process: ``loss = mse + vb``, each (B,).

        ``x0`` are the (normalised) latents, ``y`` the labels; ``noise`` defaults to fresh draws.
        The model is given the original step of each t (the same step unless respaced).

        ``mse`` is the mean squared error of the predicted noise. With learned sigma (the model
        returns 2D channels) ``vb`` is the variational-bound term in bits per dimension,
        ``KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) / ln 2``, or at t = 0 the negative
        log-likelihood of x_0 under a Gaussian discretised to 2/255 bins; the predicted noise is
        detached inside it, so the bound trains only the variance. The bound is added
        unscaled: DiT trains with IDDPM's plain ``MSE`` loss type, not ``RESCALED_MSE`` (whose
        factor T / 1000 is 1 at T = 1000 anyway). Without learned sigma ``vb`` is zero.
        """
        if noise is None:
            noise = torch.randn_like(x0)
        x0, noise = x0.float(), noise.float()
        x_t = self.q_sample(x0, t, noise)
        out = model(x_t, self._table("timestep_map", t.device)[t], y).float()
        channels = x0.shape[-1]
        if out.shape[-1] == 2 * channels:
            eps, variance_value = out.split(channels, dim=-1)
            vb = self._variational_bound_bits(x0, x_t, t, eps.detach(), variance_value)
        elif out.shape[-1] == channels:
            eps, vb = out, torch.zeros(x0.shape[0], device=x0.device)
        else:
            raise ValueError(f"model output has {out.shape[-1]} channels; expected {channels} or {2 * channels}")
        mse = (noise - eps).pow(2).flatten(1).mean(1)
        return {"loss": mse + vb, "mse": mse, "vb": vb}

    def _variational_bound_bits(self, x0, x_t, t, eps, variance_value) -> torch.Tensor:
        coef1, coef2 = self._extract("posterior_mean_coef1", t, x0), self._extract("posterior_mean_coef2", t, x0)
        true_mean = coef1 * x0 + coef2 * x_t
        true_log_var = self._extract("posterior_log_variance_clipped", t, x0)
        pred_x0 = (self._extract("sqrt_recip_alphas_cumprod", t, x0) * x_t
                   - self._extract("sqrt_recipm1_alphas_cumprod", t, x0) * eps)
        mean = coef1 * pred_x0 + coef2 * x_t
        frac = (variance_value + 1) / 2
        log_var = frac * self._extract("log_betas", t, x0) + (1 - frac) * true_log_var
        kl = 0.5 * (-1.0 + log_var - true_log_var + torch.exp(true_log_var - log_var)
                    + (true_mean - mean) ** 2 * torch.exp(-log_var))
        nll = -discretized_gaussian_log_likelihood(x0, mean, 0.5 * log_var)
        per_sample = torch.where(t == 0, nll.flatten(1).mean(1), kl.flatten(1).mean(1))
        return per_sample / math.log(2.0)


def approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    """Phi(x) ~ (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) / 2, the approximation IDDPM's bound uses."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def discretized_gaussian_log_likelihood(x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """log P(x) for N(mean, exp(log_scale)^2) integrated over x's bin of width 2/255.

    The outermost bins (x below -0.999 or above 0.999) extend to -inf / +inf. Probabilities are
    floored at 1e-12 before the log.
    """
    inv_std = torch.exp(-log_scale)
    cdf_plus = approx_standard_normal_cdf(inv_std * (x - mean + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_std * (x - mean - 1.0 / 255.0))
    log_cdf_plus = cdf_plus.clamp(min=1e-12).log()
    log_one_minus_cdf_min = (1.0 - cdf_min).clamp(min=1e-12).log()
    log_delta = (cdf_plus - cdf_min).clamp(min=1e-12).log()
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


@torch.no_grad()
def sample_dit(
    model: torch.nn.Module,
    noise: torch.Tensor,
    labels: Labels,
    num_steps: int = 250,
    solver: str = "ddpm",
    noise_schedule: str = "cosine",
    cfg_scale: float = 1.0,
    eta: float = 0.0,
    generator: Generators = None,
    progress: bool = False,
    diffusion_steps: int = 1000,
) -> torch.Tensor:
    """Draw latents from a DiT by running a respaced 1000-step diffusion backwards from ``noise``.

    The latents are in the normalised space the DiT was trained in, not the tokenizer's: decode them
    with :meth:`ctok.LatentPipeline.decode`, which undoes the normalisation;
    :meth:`ctok.LatentPipeline.generate` samples and decodes in one call.

    Args:
        model: a DiT (``model(x, t, y)`` with integer t in [0, 1000)), in eval mode (a SiT, a
            tokenizer or a model left in train mode is refused).
        noise: (B, N, D) standard normal latents, x_T.
        labels: (B,) class ids, a tensor or a list of ints; the null class ``model.num_classes``
            samples unconditionally.
        num_steps: respaced steps (one model evaluation each; twice the batch when guided).
        solver: ``"ddpm"`` (ancestral, with the model's learned variance) or ``"ddim"``.
        noise_schedule: the schedule the model was trained with, ``"cosine"`` or ``"linear"``.
        cfg_scale: guidance scale s on the predicted noise, ``eps_null + s (eps_label - eps_null)``;
            the variance channels are the label's. 1 disables guidance.
        eta: DDIM's noise level (0 is deterministic); only for ``"ddim"``.
        generator: noise source for the stochastic steps: one ``torch.Generator``, or one per sample.
        progress: show a progress bar over the steps.
        diffusion_steps: steps of the process the model was trained on (1000 for every released DiT).

    Returns:
        x_0, (B, N, D), normalised, in the dtype of ``noise``.
    """
    labels = check_sampler_inputs(model, "dit", noise, labels, num_steps)
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
    if solver == "ddpm" and eta != 0.0:
        raise ValueError(f"eta applies to DDIM only; got eta={eta} with solver 'ddpm'")
    if eta < 0.0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    check_guidance(model, cfg_scale)
    check_generators(generator, noise.shape[0], noise.device)
    if num_steps > diffusion_steps:
        raise ValueError(f"num_steps must be at most the {diffusion_steps} training steps, got {num_steps}")
    diffusion = GaussianDiffusion(noise_schedule, diffusion_steps, respacing=num_steps)
    x = noise
    steps = tqdm(reversed(range(diffusion.num_timesteps)), total=diffusion.num_timesteps, desc="sampling",
                 disable=not progress, leave=False)
    with inputs_checked(model):
        for i in steps:
            out = _guided_output(model, x, diffusion.timestep_map[i], labels, cfg_scale)
            if solver == "ddim":
                x = _ddim_step(diffusion, i, x, out, eta, generator)
            else:
                x = _ddpm_step(diffusion, i, x, out, generator)
    return x


def function_evaluations(num_steps: int, cfg_scale: float = 1.0) -> int:
    """Model evaluations per sample of :func:`sample_dit`: one per respaced step, two when guided."""
    return num_steps * (2 if cfg_scale > 1.0 else 1)


def _guided_output(model: torch.nn.Module, x: torch.Tensor, timestep: int, labels: torch.Tensor,
                   cfg_scale: float) -> torch.Tensor:
    """The DiT's output at x and one timestep, in x's dtype; guided, the noise channels are
    ``eps_null + s (eps_label - eps_null)`` and the variance channels are the label's."""
    channels = x.shape[-1]
    guided = cfg_scale > 1.0
    model_labels = torch.cat([labels, torch.full_like(labels, model.num_classes)]) if guided else labels
    time = torch.full((model_labels.shape[0],), timestep, dtype=torch.long, device=x.device)
    out = model((torch.cat([x, x]) if guided else x).to(model_dtype(model)), time, model_labels).to(x.dtype)
    if out.shape[-1] not in (channels, 2 * channels):
        raise ValueError(f"model output has {out.shape[-1]} channels; expected {channels} or {2 * channels}")
    if not guided:
        return out
    cond, uncond = out.chunk(2)
    eps = uncond[..., :channels] + cfg_scale * (cond[..., :channels] - uncond[..., :channels])
    return torch.cat([eps, cond[..., channels:]], dim=-1)


def _predicted_x0(diffusion: GaussianDiffusion, i: int, x: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    return float(diffusion.sqrt_recip_alphas_cumprod[i]) * x - float(diffusion.sqrt_recipm1_alphas_cumprod[i]) * eps


def _ddim_step(diffusion: GaussianDiffusion, i: int, x: torch.Tensor, out: torch.Tensor, eta: float,
               generator: Generators) -> torch.Tensor:
    """One DDIM step from respaced step i to i - 1; noise is added only when eta > 0."""
    eps = out[..., :x.shape[-1]]
    pred_x0 = _predicted_x0(diffusion, i, x, eps)
    abar, abar_prev = float(diffusion.alphas_cumprod[i]), float(diffusion.alphas_cumprod_prev[i])
    sigma = eta * math.sqrt((1 - abar_prev) / (1 - abar)) * math.sqrt(1 - abar / abar_prev)
    x = math.sqrt(abar_prev) * pred_x0 + math.sqrt(1 - abar_prev - sigma**2) * eps
    if i > 0 and sigma > 0:
        x = x + sigma * randn(x.shape, generator, x.device, x.dtype)
    return x


def _ddpm_step(diffusion: GaussianDiffusion, i: int, x: torch.Tensor, out: torch.Tensor,
               generator: Generators) -> torch.Tensor:
    """One ancestral step: the posterior mean, plus noise at the learned variance (interpolated between
    the posterior's and beta_t's log-variance) or, without learned sigma, the fixed one."""
    channels = x.shape[-1]
    pred_x0 = _predicted_x0(diffusion, i, x, out[..., :channels])
    x_prev = float(diffusion.posterior_mean_coef1[i]) * pred_x0 + float(diffusion.posterior_mean_coef2[i]) * x
    if i == 0:
        return x_prev
    if out.shape[-1] == 2 * channels:
        frac = (out[..., channels:] + 1) / 2
        log_var = frac * float(diffusion.log_betas[i]) + (1 - frac) * float(diffusion.posterior_log_variance_clipped[i])
        std = torch.exp(0.5 * log_var)
    else:
        std = math.exp(0.5 * float(diffusion.fixed_log_variance[i]))
    return x_prev + std * randn(x.shape, generator, x.device, x.dtype)
