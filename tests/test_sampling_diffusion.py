"""DiT's Gaussian diffusion: schedules, respacing, DDPM/DDIM with guidance, and the training loss."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from conftest import assert_conforms, conformance_case, conformance_model
from ctok.models.diffusion_transformer import DiT
from ctok.sampling import GaussianDiffusion, sample_dit
from ctok.sampling.gaussian_diffusion import beta_schedule, space_timesteps


@pytest.fixture(scope="module")
def dit_small():
    return conformance_model("dit_small", DiT)


def cosine_alpha_bar(t: np.ndarray) -> np.ndarray:
    return np.cos((t + 0.008) / 1.008 * np.pi / 2) ** 2


def alpha_bar_1000(schedule: str) -> np.ndarray:
    """abar_t for t = 0..999, straight from each schedule's definition."""
    if schedule == "cosine":
        betas = np.minimum(1 - cosine_alpha_bar(np.arange(1, 1001) / 1000) / cosine_alpha_bar(np.arange(1000) / 1000),
                           0.999)
    else:
        betas = 1e-4 + (0.02 - 1e-4) * np.arange(1000) / 999
    return np.cumprod(1 - betas)


class GaussianDenoiser(torch.nn.Module):
    """The exact noise prediction E[eps | x_t] for x_0 ~ N(means[y], std^2 I), at original steps t.

    With std = 0 the data is a point per class, for which DDIM has a closed form (see the test
    below). It records the steps it is asked about.
    ``variance`` (None, or a value in [-1, 1]) adds learned-range channels.
    """

    def __init__(self, means: torch.Tensor, std: float, schedule: str, variance: float | None = None):
        super().__init__()
        self.register_buffer("means", means.double())
        self.register_buffer("abar", torch.from_numpy(alpha_bar_1000(schedule)))
        self.std, self.variance = std, variance
        self.num_classes = means.shape[0] - 1
        self.has_null_class = True
        self.num_tokens, self.in_channels = means.shape[1:]
        self.anchor = torch.nn.Parameter(torch.zeros((), dtype=torch.float64))
        self.seen: list[tuple[int, torch.Tensor]] = []
        self.eval()  # the samplers refuse a model in train mode

    def forward(self, x, t, y):
        assert t.dtype == torch.long
        self.seen.append((int(t[0]), x.clone()))
        abar = self.abar[t].view(-1, 1, 1)
        mu = self.means[y]
        eps = (1 - abar).sqrt() * (x - abar.sqrt() * mu) / (abar * self.std**2 + 1 - abar)
        if self.variance is None:
            return eps
        return torch.cat([eps, torch.full_like(eps, self.variance)], dim=-1)


# -- schedules and respacing ----------------------------------------------------------------

def test_beta_schedules_follow_their_definitions():
    linear = beta_schedule("linear", 1000)
    assert linear[0] == pytest.approx(1e-4) and linear[-1] == pytest.approx(0.02)
    assert np.allclose(np.diff(linear), (0.02 - 1e-4) / 999)
    assert np.allclose(beta_schedule("linear", 250), 4 * np.linspace(1e-4, 0.02, 250))
    abar = np.cumprod(1 - beta_schedule("cosine", 1000))
    expected = cosine_alpha_bar(np.arange(1, 1001) / 1000) / cosine_alpha_bar(0.0)
    assert np.allclose(abar[:-1], expected[:-1], rtol=1e-10)  # the last beta is capped at 0.999
    assert beta_schedule("cosine", 1000)[-1] == 0.999
    with pytest.raises(ValueError, match="noise_schedule must be one of"):
        beta_schedule("sqrt")


def test_space_timesteps_keeps_evenly_spaced_steps_rounded_half_to_even():
    assert space_timesteps(1000, 10) == [0, 111, 222, 333, 444, 555, 666, 777, 888, 999]
    assert space_timesteps(1000, 3) == [0, 500, 999]  # 499.5 rounds to the even 500
    assert space_timesteps(1000, 5) == [0, 250, 500, 749, 999]  # 249.75, 499.5, 749.25
    assert space_timesteps(1000, 1000) == list(range(1000))
    assert space_timesteps(1000, 1) == [0]
    steps = space_timesteps(1000, 250)
    assert steps[0] == 0 and steps[-1] == 999 and len(set(steps)) == 250
    assert set(np.diff(steps)) == {4, 5}
    with pytest.raises(ValueError, match=r"integer in \[1, 1000\], got 1001"):
        space_timesteps(1000, 1001)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_respacing_keeps_the_cumulative_alphas_of_the_kept_steps(schedule):
    spaced = GaussianDiffusion(schedule, 1000, respacing=25)
    assert spaced.num_timesteps == 25
    assert np.allclose(spaced.alphas_cumprod, alpha_bar_1000(schedule)[spaced.timestep_map], rtol=1e-9)


# -- sampling -------------------------------------------------------------------------------

def test_ddim_matches_the_original(dit_small):
    model, io = dit_small
    out = sample_dit(model, io["noise"], io["labels"], num_steps=10, solver="ddim", noise_schedule="cosine")
    assert_conforms(out, io["ddim_10_cosine"], "ddim_10_cosine")


@pytest.mark.parametrize("schedule, steps, cfg", [("linear", 7, 1.0), ("cosine", 13, 1.0), ("linear", 4, 2.5)])
def test_ddim_follows_the_exact_trajectory_of_a_point_mass(schedule, steps, cfg):
    """With a point target m the predicted noise eps = (x_T - sqrt(abar_999) m) / sqrt(1 - abar_999)
    never changes: the model sees x_t = sqrt(abar_t) m + sqrt(1 - abar_t) eps at the original
    steps t of the respacing, and the chain ends at m. Guidance s aims at
    m_null + s (m_label - m_null), because the exact noise is affine in the target."""
    torch.manual_seed(0)
    means = torch.randn(4, 16, 8)
    model = GaussianDenoiser(means, std=0.0, schedule=schedule, variance=0.3)
    noise = torch.randn(2, 16, 8, dtype=torch.float64)
    labels = torch.tensor([1, 2])
    means = means.double()
    target = means[3] + cfg * (means[labels] - means[3]) if cfg > 1 else means[labels]
    out = sample_dit(model, noise, labels, num_steps=steps, solver="ddim", noise_schedule=schedule, cfg_scale=cfg)

    abar = alpha_bar_1000(schedule)
    assert [t for t, _ in model.seen] == space_timesteps(1000, steps)[::-1]
    eps = (noise - math.sqrt(abar[999]) * target) / math.sqrt(1 - abar[999])
    for t, x in model.seen:
        expected = math.sqrt(abar[t]) * target + math.sqrt(1 - abar[t]) * eps
        torch.testing.assert_close(x[: len(labels)], expected, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(out, target, rtol=1e-9, atol=1e-9)


@torch.no_grad()
def test_guided_ddpm_with_learned_variance_matches_a_hand_unrolled_chain(dit_small):
    """3 respaced steps of the cosine schedule keep steps 999, 500, 0. Each step: guided noise on
    the first D channels, variance channels of the label's forward, posterior mean of the
    predicted x_0, log-variance between log beta_t and the clipped log posterior variance, and
    noise on all but the last step."""
    model, io = dit_small
    x, y = io["noise"].double(), io["labels"]
    null = torch.full_like(y, model.num_classes)
    kept = [0, 500, 999]
    abar = alpha_bar_1000("cosine")[kept]
    abar_prev = np.append(1.0, abar[:-1])
    betas = 1 - abar / abar_prev
    posterior_var = betas * (1 - abar_prev) / (1 - abar)
    log_min = np.log(np.append(posterior_var[1], posterior_var[1:]))
    stream = torch.Generator().manual_seed(3)
    for i in (2, 1, 0):
        t = torch.full((2,), kept[i])
        cond, uncond = model(x.float(), t, y).double(), model(x.float(), t, null).double()
        eps = uncond[..., :8] + 1.75 * (cond[..., :8] - uncond[..., :8])
        x0 = (x - math.sqrt(1 - abar[i]) * eps) / math.sqrt(abar[i])
        mean = (math.sqrt(abar_prev[i]) * betas[i] * x0
                + math.sqrt(1 - betas[i]) * (1 - abar_prev[i]) * x) / (1 - abar[i])
        frac = (cond[..., 8:] + 1) / 2
        log_var = frac * math.log(betas[i]) + (1 - frac) * log_min[i]
        x = mean
        if i > 0:
            x = x + torch.exp(0.5 * log_var) * torch.randn(x.shape, generator=stream).double()

    out = sample_dit(model, io["noise"], y, num_steps=3, solver="ddpm", cfg_scale=1.75,
                     generator=torch.Generator().manual_seed(3))
    assert_conforms(out, x, "guided ddpm, 3 steps")


class GuidedEveryForward(torch.nn.Module):
    """Guides on every forward itself: the noise channels mixed, the variance channels the label's.

    Sampled with ``cfg_scale=1`` it is the oracle for a guided DiT sampler, which has no interval.
    """

    def __init__(self, model: torch.nn.Module, scale: float):
        super().__init__()
        self.model, self.scale = model, scale
        self.num_classes, self.has_null_class = model.num_classes, True
        self.num_tokens, self.in_channels = model.num_tokens, model.in_channels
        self.eval()

    def forward(self, x, t, y):
        cond, uncond = self.model(x, t, y), self.model(x, t, torch.full_like(y, self.num_classes))
        d = self.in_channels
        eps = uncond[..., :d] + self.scale * (cond[..., :d] - uncond[..., :d])
        return torch.cat([eps, cond[..., d:]], dim=-1)


@pytest.mark.parametrize("sampler, eta", [("ddpm", 0.0), ("ddim", 0.0), ("ddim", 1.0)])
def test_a_dit_is_guided_at_every_step_the_first_and_last_included(sampler, eta):
    """DiT's guidance has no interval: steps 999 (pure noise) and 0 (the last) are guided too."""
    torch.manual_seed(0)
    model = GaussianDenoiser(torch.randn(4, 4, 2), std=0.5, schedule="cosine", variance=0.2)
    noise = torch.randn(3, 4, 2, dtype=torch.float64)
    labels = torch.tensor([0, 1, 2])

    def sample(model, cfg_scale):
        return sample_dit(model, noise, labels, num_steps=4, solver=sampler, eta=eta, cfg_scale=cfg_scale,
                          generator=torch.Generator().manual_seed(8))

    expected = sample(GuidedEveryForward(model, 3.0), 1.0)
    torch.testing.assert_close(sample(model, 3.0), expected, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(sample(model, 1.0), expected)


def ddpm_chain_moments(mean: float, std: float, num_steps: int, variance: float | None) -> tuple[float, float]:
    """Mean and variance of DDPM's chain for one coordinate of the target N(mean, std^2), with
    the exact noise prediction (affine in x, so the chain stays Gaussian), on the linear schedule."""
    abar = alpha_bar_1000("linear")[space_timesteps(1000, num_steps)]
    abar_prev = np.append(1.0, abar[:-1])
    betas = 1 - abar / abar_prev
    posterior_var = betas * (1 - abar_prev) / (1 - abar)
    lower = np.append(posterior_var[1], posterior_var[1:])
    upper = np.append(lower[0], betas[1:])  # the fixed variance: beta_t, beta~_1 at the first step
    m, var = 0.0, 1.0
    for i in reversed(range(num_steps)):
        # E[eps | x] = gain * (x - sqrt(abar) mean) / sqrt(1 - abar), so x_0-hat = slope * x + offset.
        gain = (1 - abar[i]) / (abar[i] * std**2 + 1 - abar[i])
        slope_x0 = (1 - gain) / math.sqrt(abar[i])
        offset_x0 = gain * mean
        c1 = math.sqrt(abar_prev[i]) * betas[i] / (1 - abar[i])
        c2 = math.sqrt(1 - betas[i]) * (1 - abar_prev[i]) / (1 - abar[i])
        m = (c1 * slope_x0 + c2) * m + c1 * offset_x0
        var = (c1 * slope_x0 + c2) ** 2 * var
        if i > 0:
            if variance is None:
                var += upper[i]
            else:
                frac = (variance + 1) / 2
                var += math.exp(frac * math.log(betas[i]) + (1 - frac) * math.log(lower[i]))
    return m, var


@pytest.mark.parametrize("variance", [-1.0, 0.5, None])
def test_ddpm_samples_have_the_moments_of_the_chain(variance):
    """Ancestral sampling with the exact noise prediction has the chain's mean and variance,
    whatever the variance channels say (-1: the posterior variance, +1: beta_t) or without them;
    with beta_t or the fixed variance 100 steps already land near the target N(mean, 0.5^2)."""
    means = torch.zeros(3, 4, 2)
    means[0], means[1] = 1.0, -2.0
    model = GaussianDenoiser(means, std=0.5, schedule="linear", variance=variance)
    n, steps = 4000, 100
    noise = torch.randn(n, 4, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    labels = torch.arange(n) % 2
    out = sample_dit(model, noise, labels, num_steps=steps, noise_schedule="linear",
                     generator=torch.Generator().manual_seed(2))
    for label, mean in [(0, 1.0), (1, -2.0)]:
        samples = out[labels == label]
        chain_mean, chain_var = ddpm_chain_moments(mean, 0.5, steps, variance)
        assert abs(float(samples.mean()) - chain_mean) < 5 * math.sqrt(chain_var / samples.numel())
        assert abs(float(samples.var()) / chain_var - 1) < 5 * math.sqrt(2 / samples.numel())
        assert abs(chain_mean - mean) < 1e-3
        if variance is None:
            assert abs(math.sqrt(chain_var) / 0.5 - 1) < 0.02


def test_a_model_trained_on_fewer_steps_is_sampled_on_its_own_process():
    """A 100-step linear schedule has betas 10x those of the 1000-step one; 100 DDIM steps of it
    visit every step and follow a point target's exact trajectory."""
    torch.manual_seed(0)
    model = GaussianDenoiser(torch.randn(3, 4, 2), std=0.0, schedule="linear")
    model.abar = torch.from_numpy(np.cumprod(1 - np.linspace(1e-3, 0.2, 100)))
    noise = torch.randn(2, 4, 2, dtype=torch.float64)
    out = sample_dit(model, noise, torch.tensor([0, 1]), num_steps=100, solver="ddim", noise_schedule="linear",
                     diffusion_steps=100)
    assert [t for t, _ in model.seen] == list(range(99, -1, -1))
    torch.testing.assert_close(out, model.means[:2], rtol=1e-9, atol=1e-9)


def test_ddim_with_eta_one_is_ddpm_with_the_posterior_variance():
    """Song et al.: at eta = 1 DDIM's step is the posterior q(x_prev | x_t, x_0-hat), i.e. DDPM with
    the lower variance bound (variance channels at -1)."""
    model = GaussianDenoiser(torch.randn(3, 4, 2), std=0.5, schedule="cosine", variance=-1.0)
    noise = torch.randn(5, 4, 2, dtype=torch.float64)
    labels = torch.tensor([0, 1, 0, 1, 1])
    ddim = sample_dit(model, noise, labels, num_steps=20, solver="ddim", eta=1.0,
                      generator=torch.Generator().manual_seed(9))
    ddpm = sample_dit(model, noise, labels, num_steps=20, solver="ddpm", generator=torch.Generator().manual_seed(9))
    torch.testing.assert_close(ddim, ddpm, rtol=1e-9, atol=1e-9)


def test_ddim_with_eta_draws_from_each_samples_own_stream():
    model = GaussianDenoiser(torch.randn(3, 4, 2), std=0.5, schedule="cosine")
    noise = torch.randn(3, 4, 2, dtype=torch.float64)
    labels = torch.tensor([0, 1, 0])
    kwargs = dict(num_steps=10, solver="ddim", eta=1.0)
    batch = sample_dit(model, noise, labels, generator=[torch.Generator().manual_seed(s) for s in (4, 5, 6)], **kwargs)
    alone = sample_dit(model, noise[1:2], labels[1:2], generator=[torch.Generator().manual_seed(5)], **kwargs)
    deterministic = sample_dit(model, noise[1:2], labels[1:2], num_steps=10, solver="ddim")
    assert torch.equal(batch[1:2], alone)
    assert not torch.allclose(alone, deterministic)


def test_sampler_arguments_are_checked(dit_small):
    model, io = dit_small
    noise, labels = io["noise"], io["labels"]
    for kwargs, message in [
        (dict(solver="plms"), "solver must be one of"),
        (dict(noise_schedule="sqrt"), "noise_schedule must be one of"),
        (dict(eta=0.5), "eta applies to DDIM only"),
        (dict(num_steps=1001), "at most the 1000 training steps"),
        (dict(num_steps=101, diffusion_steps=100), "at most the 100 training steps"),
    ]:
        with pytest.raises(ValueError, match=message):
            sample_dit(model, noise, labels, **{"num_steps": 2, **kwargs})


# -- training loss --------------------------------------------------------------------------

class TwoHeads(torch.nn.Module):
    """eps = a * x and variance value = tanh(b) everywhere: separate parameters for the two heads."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Parameter(torch.tensor(0.7))
        self.b = torch.nn.Parameter(torch.tensor(0.2))

    def forward(self, x, t, y):
        return torch.cat([self.a * x, torch.tanh(self.b).expand_as(x)], dim=-1)


def test_training_loss_is_noise_mse_plus_the_variational_bound_in_bits():
    diffusion = GaussianDiffusion("linear")
    model = TwoHeads()
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, 16, 8, generator=gen) * 0.3
    noise = torch.randn(4, 16, 8, generator=gen)
    t = torch.tensor([0, 1, 500, 999])
    terms = diffusion.training_losses(model, x0, t, torch.zeros(4, dtype=torch.long), noise=noise)

    abar = torch.from_numpy(alpha_bar_1000("linear")).float()
    betas = torch.from_numpy(1e-4 + (0.02 - 1e-4) * np.arange(1000) / 999).float()
    ab, beta = abar[t].view(-1, 1, 1), betas[t].view(-1, 1, 1)
    ab_prev = torch.cat([torch.ones(1), abar])[t].view(-1, 1, 1)
    x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
    torch.testing.assert_close(diffusion.q_sample(x0, t, noise), x_t)
    eps = 0.7 * x_t
    torch.testing.assert_close(terms["mse"], ((eps - noise) ** 2).mean(dim=(1, 2)))

    def posterior_mean(start):
        return (ab_prev.sqrt() * beta * start + (1 - beta).sqrt() * (1 - ab_prev) * x_t) / (1 - ab)

    posterior_var = beta * (1 - ab_prev) / (1 - ab)
    clipped = torch.where(t.view(-1, 1, 1) == 0, beta[1:2] * (1 - abar[0]) / (1 - abar[1]), posterior_var)
    frac = (math.tanh(0.2) + 1) / 2
    model_var = torch.exp(frac * beta.log() + (1 - frac) * clipped.log())
    model_mean = posterior_mean((x_t - (1 - ab).sqrt() * eps) / ab.sqrt())
    kl = torch.distributions.kl_divergence(
        torch.distributions.Normal(posterior_mean(x0), clipped.sqrt()),
        torch.distributions.Normal(model_mean, model_var.sqrt()),
    ).mean(dim=(1, 2)) / math.log(2)
    torch.testing.assert_close(terms["vb"][1:], kl[1:], rtol=1e-4, atol=1e-6)
    # At t = 0: -log2 of the probability of x_0's 2/255 bin (IDDPM's tanh-approximate CDF is
    # within about 1e-3 of the exact one used here).
    normal = torch.distributions.Normal(model_mean[0], model_var[0].sqrt())
    nll = -(normal.cdf(x0[0] + 1 / 255) - normal.cdf(x0[0] - 1 / 255)).log().mean() / math.log(2)
    assert float(terms["vb"][0].detach()) == pytest.approx(float(nll), rel=2e-3)
    torch.testing.assert_close(terms["loss"], terms["mse"] + terms["vb"])


def test_the_bound_trains_only_the_variance_and_the_mse_only_the_noise():
    diffusion = GaussianDiffusion("cosine")
    model = TwoHeads()
    x0 = torch.randn(4, 16, 8) * 0.3
    terms = diffusion.training_losses(model, x0, torch.tensor([3, 100, 400, 900]), torch.zeros(4, dtype=torch.long))
    terms["vb"].sum().backward(retain_graph=True)
    assert model.a.grad is None or float(model.a.grad) == 0.0
    assert float(model.b.grad) != 0.0
    model.zero_grad()
    terms["mse"].sum().backward()
    assert float(model.a.grad) != 0.0 and (model.b.grad is None or float(model.b.grad) == 0.0)


def test_training_loss_of_a_dit(dit_small):
    model, io = dit_small
    diffusion = GaussianDiffusion("linear")
    t = torch.tensor([0, 500, 999])
    terms = diffusion.training_losses(model, io["x"], t, io["y"])
    assert {k: tuple(v.shape) for k, v in terms.items()} == {"loss": (3,), "mse": (3,), "vb": (3,)}
    assert all(bool(torch.isfinite(v).all()) for v in terms.values())
    fixed = DiT.from_config({**conformance_case("dit_small")[0], "learn_sigma": False})
    terms = diffusion.training_losses(fixed, io["x"], t, io["y"])
    assert torch.equal(terms["vb"], torch.zeros(3)) and torch.equal(terms["loss"], terms["mse"])


@pytest.mark.parametrize("cfg_scale", [1.0, 1.5])
def test_function_evaluations_count_the_forwards_sample_dit_makes(cfg_scale):
    from ctok.sampling.gaussian_diffusion import function_evaluations

    calls = []

    class Counted(torch.nn.Module):
        num_tokens, in_channels, num_classes, has_null_class = 2, 3, 4, True

        def forward(self, x, t, y):
            calls.append(x.shape[0])
            return torch.zeros(x.shape[0], 2, 6)

    noise = torch.randn(3, 2, 3)
    sample_dit(Counted().eval(), noise, [0, 1, 2], num_steps=7, cfg_scale=cfg_scale,
               generator=torch.Generator().manual_seed(0))
    assert function_evaluations(7, cfg_scale) == sum(calls) // 3
