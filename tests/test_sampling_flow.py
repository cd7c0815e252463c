"""SiT sampling: the original's ODE/SDE samplers, checked against its outputs and against exact solutions."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from conftest import assert_conforms, conformance_case, conformance_model
from ctok.models.diffusion_transformer import SiT
from ctok.sampling import FlowPath, sample_sit
from ctok.sampling.flow import PATH_TYPES


@pytest.fixture(scope="module")
def sit_small():
    return conformance_model("sit_small", SiT)


class GaussianFlow(torch.nn.Module):
    """The exact velocity field that carries N(0, I) at t = 1 to N(means[y], std^2 I) at t = 0.

    For x_t = a_t x_0 + s_t eps with Gaussian x_0 the posterior means are linear in x_t, so
    ``v = a'_t E[x_0 | x_t] + s'_t E[eps | x_t]`` is known in closed form for every class.
    Row ``num_classes`` of ``means`` is the null class.
    """

    def __init__(self, means: torch.Tensor, std: float, path_type: str = "linear"):
        super().__init__()
        self.register_buffer("means", means.double())
        self.std = std
        self.num_classes = means.shape[0] - 1
        self.has_null_class = True
        self.num_tokens, self.in_channels = means.shape[1:]
        self.config = SimpleNamespace(path_type=path_type)
        # Only its dtype matters: the sampler casts the model's inputs to it.
        self.anchor = torch.nn.Parameter(torch.zeros((), dtype=torch.float64))
        self.eval()  # the samplers refuse a model in train mode

    def forward(self, x, t, y):
        a, da, s, ds = path(t.double().view(-1, 1, 1), self.config.path_type)
        mu = self.means[y]
        var = a**2 * self.std**2 + s**2
        x0 = mu + a * self.std**2 / var * (x - a * mu)
        eps = s / var * (x - a * mu)
        return da * x0 + ds * eps


def path(t, path_type):
    """(a, a', s, s') of the linear or cosine interpolation, for floats or tensors."""
    if path_type == "linear":
        return 1 - t, -1.0, t, 1.0
    h = math.pi / 2
    sin, cos = (torch.sin, torch.cos) if torch.is_tensor(t) else (math.sin, math.cos)
    return cos(h * t), -h * sin(h * t), sin(h * t), h * cos(h * t)


# -- the path object shared by training and sampling ----------------------------------------

def as_tuple(values) -> tuple:
    return values if isinstance(values, tuple) else (values,)


def stacked(values, like: torch.Tensor) -> torch.Tensor:
    """One row per value (a float or a tensor), each broadcast to ``like``'s shape."""
    return torch.stack([torch.as_tensor(v, dtype=like.dtype).expand_as(like) for v in as_tuple(values)])


@pytest.mark.parametrize("path_type", PATH_TYPES)
def test_path_coefficients_agree_for_float_and_tensor_times(path_type):
    """The samplers ask at float times, training at tensor times: one formula answers both."""
    flow = FlowPath(path_type)
    grid = torch.linspace(0.04, 1.0, 25, dtype=torch.float64)
    for method in (flow.coefficients, flow.sde_drift, flow.sde_diffusion):
        on_floats = [as_tuple(method(t)) for t in grid.tolist()]
        # float in, float out: the samplers' scalar arithmetic stays in Python floats
        assert all(isinstance(c, float) for values in on_floats for c in values), method.__name__
        torch.testing.assert_close(stacked(method(grid), grid), torch.tensor(on_floats, dtype=torch.float64).T,
                                   rtol=1e-14, atol=0, msg=method.__name__)
    # and both are this file's independent statement of the paths
    torch.testing.assert_close(stacked(flow.coefficients(grid), grid), stacked(path(grid, path_type), grid))


@pytest.mark.parametrize("path_type", PATH_TYPES)
def test_the_training_target_is_the_velocity_the_samplers_integrate(path_type):
    """The regression target is dx_t/dt (what the ODE solvers integrate), and with it the SDE
    drift is ``v - t * score`` for the true score: for one data point x_0, x_t ~ N(alpha x_0, sigma^2),
    whose score at x_t is -eps / sigma."""
    flow = FlowPath(path_type)
    x0 = torch.randn(6, 4, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    noise = torch.randn(6, 4, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    t = torch.linspace(0.05, 0.95, 6, dtype=torch.float64)
    x_t, target = flow.training_targets(x0, t, noise)
    # Each element as a sample of its own, with its own copy of its time: the gradient of the sum
    # with respect to those times is then every element's dx_t/dt.
    times = t.repeat_interleave(8).requires_grad_()
    (dx_dt,) = torch.autograd.grad(flow.training_targets(x0.reshape(-1, 1), times, noise.reshape(-1, 1))[0].sum(),
                                   times)
    torch.testing.assert_close(target, dx_dt.view_as(target))

    for i, time in enumerate(t.tolist()):
        a, b = flow.sde_drift(time)
        sigma = flow.coefficients(time)[2]
        score = -noise[i] / sigma
        torch.testing.assert_close(a * target[i] + b * x_t[i], target[i] - flow.sde_diffusion(time) ** 2 / 2 * score)


def test_the_training_loss_regresses_the_target_velocity():
    flow = FlowPath("cosine")
    x0, noise = torch.randn(5, 4, 2), torch.randn(5, 4, 2)
    t, y = torch.rand(5), torch.arange(5)
    x_t, target = flow.training_targets(x0, t, noise)
    seen = {}

    def model(x, time, labels):
        seen.update(x=x, t=time, y=labels)
        return target + 0.5

    assert float(flow.training_loss(model, x0, t, y, noise)) == pytest.approx(0.25)
    assert torch.equal(seen["x"], x_t) and seen["t"] is t and seen["y"] is y


def test_flow_path_rejects_unknown_settings():
    with pytest.raises(ValueError, match="path_type must be one of"):
        FlowPath("vp")
    with pytest.raises(ValueError, match="time_sampling must be one of"):
        FlowPath("linear").sample_time(None, "logit")


# -- conformance with the original samplers -------------------------------------------------

@pytest.mark.parametrize("key, kwargs", [
    ("euler_8", dict(solver="euler")),
    ("heun_8", dict(solver="heun")),
    ("euler_8_cfg2.5_high0.7", dict(solver="euler", cfg_scale=2.5, guidance_interval=(0.0, 0.7))),
])
def test_ode_samplers_match_the_original(sit_small, key, kwargs):
    model, io = sit_small
    out = sample_sit(model, io["noise"], io["labels"], num_steps=8, **kwargs)
    assert out.dtype == io["noise"].dtype
    assert_conforms(out, io[key], key)


@torch.no_grad()
def test_heun_with_a_guidance_interval_matches_a_hand_unrolled_solve(sit_small):
    """3 steps t = 1, 2/3, 1/3 -> 0, guidance 3.0 on [0.5, 0.9]: the first step is unguided, the
    second is guided (its corrector at t = 1/3 too, though 1/3 is outside), the last is a plain
    unguided Euler step. Each forward is made separately here, cond and null apart."""
    model, io = sit_small
    x, y = io["noise"].double(), io["labels"]
    null = torch.full_like(y, model.num_classes)

    def v(x, t, labels):
        return model(x.float(), torch.full((len(y),), t), labels).double()

    def guided(x, t):
        return v(x, t, null) + 3.0 * (v(x, t, y) - v(x, t, null))

    h = -1 / 3
    pred = x + h * v(x, 1.0, y)
    x = x + h * 0.5 * (v(x, 1.0, y) + v(pred, 2 / 3, y))
    pred = x + h * guided(x, 2 / 3)
    x = x + h * 0.5 * (guided(x, 2 / 3) + guided(pred, 1 / 3))
    x = x + h * v(x, 1 / 3, y)

    out = sample_sit(model, io["noise"], y, num_steps=3, solver="heun", cfg_scale=3.0, guidance_interval=(0.5, 0.9))
    assert_conforms(out, x, "heun 3 steps, guided on [0.5, 0.9]")


@torch.no_grad()
def test_euler_maruyama_matches_a_hand_unrolled_solve(sit_small):
    """3 steps: t = 1 -> 0.52 and 0.52 -> 0.04 with noise, then 0.04 -> 0 without. The drift is
    v + (1 - t) v + x, i.e. v - t * score with the linear path's score -((1 - t) v + x) / t.
    Guidance 2.0 on [0, 0.6] covers the last two steps."""
    model, io = sit_small
    x, y = io["noise"].double(), io["labels"]
    null = torch.full_like(y, model.num_classes)
    stream = torch.Generator().manual_seed(7)

    def v(x, t, guide):
        cond = model(x.float(), torch.full((len(y),), t), y).double()
        if not guide:
            return cond
        uncond = model(x.float(), torch.full((len(y),), t), null).double()
        return uncond + 2.0 * (cond - uncond)

    for t, t_next, guide in [(1.0, 0.52, False), (0.52, 0.04, True)]:
        drift = (2 - t) * v(x, t, guide) + x
        x = x + (t_next - t) * drift + math.sqrt(2 * t) * math.sqrt(t - t_next) * torch.randn(
            x.shape, generator=stream, dtype=torch.float64)
    x = x - 0.04 * ((2 - 0.04) * v(x, 0.04, True) + x)

    out = sample_sit(model, io["noise"], y, num_steps=3, solver="euler-maruyama", cfg_scale=2.0,
                     guidance_interval=(0.0, 0.6), generator=torch.Generator().manual_seed(7))
    assert_conforms(out, x, "euler-maruyama 3 steps")


# -- exact solutions ------------------------------------------------------------------------

def test_ode_solvers_converge_to_the_exact_flow_at_their_order():
    """For a Gaussian target the flow map is x_0 = mean + std * x_1; Euler's error halves and
    Heun's quarters when the step count doubles."""
    torch.manual_seed(0)
    means = torch.randn(4, 16, 8)
    model = GaussianFlow(means, std=0.5)
    noise = torch.randn(32, 16, 8, dtype=torch.float64)
    labels = torch.arange(32) % 3
    exact = means[labels].double() + 0.5 * noise
    for solver, order in [("euler", 1), ("heun", 2)]:
        errors = [float((sample_sit(model, noise, labels, num_steps=n, solver=solver) - exact).abs().max())
                  for n in (16, 32, 64)]
        rates = [math.log2(errors[i] / errors[i + 1]) for i in range(2)]
        assert all(abs(r - order) < 0.2 for r in rates), f"{solver}: errors {errors}, observed orders {rates}"
    assert errors[-1] < 1e-3


def em_chain_moments(mean: float, std: float, num_steps: int, path_type: str) -> tuple[float, float]:
    """Mean and variance of the Euler-Maruyama chain for one coordinate of the Gaussian target.

    The reverse drift v + t (x - a mean) / var_t (with the Gaussian marginal's true score) is
    affine in x, so the discretised chain stays Gaussian and its moments follow exactly.
    """
    times = torch.linspace(1.0, 0.04, num_steps, dtype=torch.float64).tolist() + [0.0]
    m, var = 0.0, 1.0
    for i in range(num_steps):
        t, dt = times[i], times[i + 1] - times[i]
        a, da, s, ds = path(t, path_type)
        marginal_var = a * a * std * std + s * s
        slope = (da * a * std * std + ds * s) / marginal_var + t / marginal_var
        offset = da * mean - slope * a * mean
        m = m + dt * (slope * m + offset)
        var = (1 + dt * slope) ** 2 * var + (2 * t * -dt if i < num_steps - 1 else 0.0)
    return m, var


@pytest.mark.parametrize("path_type", ["linear", "cosine"])
def test_euler_maruyama_samples_have_the_moments_of_the_discretised_sde(path_type):
    """On the exact Gaussian velocity the SDE's samples have the chain's mean and variance (to
    sampling error), and the chain itself lands near the target N(mean, 0.5^2)."""
    means = torch.zeros(3, 4, 2)
    means[0], means[1] = 1.0, -2.0
    model = GaussianFlow(means, std=0.5, path_type=path_type)
    n, steps = 4000, 50
    noise = torch.randn(n, 4, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    labels = torch.arange(n) % 2
    out = sample_sit(model, noise, labels, num_steps=steps, generator=torch.Generator().manual_seed(2))
    for label, mean in [(0, 1.0), (1, -2.0)]:
        samples = out[labels == label]
        chain_mean, chain_var = em_chain_moments(mean, 0.5, steps, path_type)
        stderr = math.sqrt(chain_var / samples.numel())
        assert abs(float(samples.mean()) - chain_mean) < 5 * stderr
        assert abs(float(samples.var()) / chain_var - 1) < 5 * math.sqrt(2 / samples.numel())
        # The last noise-free jump from t = 0.04 shrinks the spread a little (about 1%).
        assert abs(chain_mean - mean) < 0.03 and abs(math.sqrt(chain_var) / 0.5 - 1) < 0.03


def test_per_sample_generators_make_a_sample_independent_of_its_batch():
    model = GaussianFlow(torch.randn(3, 4, 2), std=0.5)
    noise = torch.randn(3, 4, 2, dtype=torch.float64)
    labels = torch.tensor([0, 1, 0])
    batch = sample_sit(model, noise, labels, num_steps=10,
                       generator=[torch.Generator().manual_seed(s) for s in (10, 11, 12)])
    alone = sample_sit(model, noise[1:2], labels[1:2], num_steps=10, generator=[torch.Generator().manual_seed(11)])
    assert torch.equal(batch[1:2], alone)
    assert not torch.equal(batch[0], batch[2])


# -- where guidance applies -----------------------------------------------------------------

class GuidedOnCalls(torch.nn.Module):
    """Does classifier-free guidance itself, on the forwards flagged in ``guided`` (in call order).

    Sampled with ``cfg_scale=1`` it is the oracle for a guided sampler: the two agree exactly
    when the sampler guides on these forwards and no others.
    """

    def __init__(self, model: torch.nn.Module, scale: float, guided: list[bool]):
        super().__init__()
        self.model, self.scale, self.guided = model, scale, guided
        self.num_classes, self.has_null_class = model.num_classes, True
        self.num_tokens, self.in_channels, self.config = model.num_tokens, model.in_channels, model.config
        self.calls = 0
        self.eval()

    def forward(self, x, t, y):
        guide = self.guided[self.calls]
        self.calls += 1
        cond = self.model(x, t, y)
        if not guide:
            return cond
        uncond = self.model(x, t, torch.full_like(y, self.num_classes))
        return uncond + self.scale * (cond - uncond)


def step_times(solver: str, num_steps: int) -> list[float]:
    """The times of the solver's steps as the module docstring gives them: 1 .. 1/n for the ODEs,
    n points from 1 to 0.04 for the SDE (its last step is the noise-free one)."""
    if solver == "euler-maruyama":
        return torch.linspace(1.0, 0.04, num_steps, dtype=torch.float64).tolist()
    return torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64).tolist()[:-1]


T, F = True, False


@pytest.mark.parametrize("solver, num_steps, ends, guided", [
    # Steps at t = 1, 3/4, 1/2, 1/4; the interval [1/4, 3/4] has a step on each end.
    ("euler", 4, (3, 1), [F, T, T, T]),
    # Heun's corrector keeps its step's decision: the step from t = 1 corrects at 3/4 unguided.
    ("heun", 4, (3, 1), [F, F, T, T, T, T, T]),
    # Steps at t = 1, 0.76, 0.52, 0.28, 0.04: [0.28, 0.76], then [0.04, 0.52] (the last, noise-free step).
    ("euler-maruyama", 5, (3, 1), [F, T, T, T, F]),
    ("euler-maruyama", 5, (4, 2), [F, F, T, T, T]),
    # The default interval [0, 1] guides every forward, the first at t = 1 included.
    ("euler", 3, None, [T] * 3),
    ("heun", 3, None, [T] * 5),
    ("euler-maruyama", 3, None, [T] * 3),
])
def test_guidance_applies_on_both_ends_of_its_interval(solver, num_steps, ends, guided):
    torch.manual_seed(0)
    model = GaussianFlow(torch.randn(4, 4, 2), std=0.5)
    noise = torch.randn(3, 4, 2, dtype=torch.float64)
    labels = torch.tensor([0, 1, 2])
    interval = {}
    if ends is not None:
        times = step_times(solver, num_steps)
        interval = dict(guidance_interval=(times[ends[0]], times[ends[1]]))

    def sample(model, cfg_scale, **kwargs):
        return sample_sit(model, noise, labels, num_steps=num_steps, solver=solver, cfg_scale=cfg_scale,
                          generator=torch.Generator().manual_seed(5), **kwargs)

    oracle = GuidedOnCalls(model, 2.5, guided)
    expected = sample(oracle, 1.0)
    assert oracle.calls == len(guided)
    torch.testing.assert_close(sample(model, 2.5, **interval), expected, rtol=1e-12, atol=1e-12)
    # Guidance moves the samples, so a forward guided or not shows in the result.
    assert not torch.allclose(sample(model, 1.0), expected)


def test_default_guidance_of_a_real_sit_on_the_cpu_guides_every_step(sit_small):
    """The command's default: Euler-Maruyama, guidance on [0, 1], one stacked forward per step."""
    model, io = sit_small
    oracle = GuidedOnCalls(model, 2.0, [True] * 4)
    expected = sample_sit(oracle, io["noise"], io["labels"], num_steps=4, generator=torch.Generator().manual_seed(1))
    out = sample_sit(model, io["noise"], io["labels"], num_steps=4, cfg_scale=2.0,
                     generator=torch.Generator().manual_seed(1))
    assert_conforms(out, expected, "default-interval guidance")


# -- errors ---------------------------------------------------------------------------------

def test_bad_arguments_raise_clear_errors(sit_small):
    model, io = sit_small
    noise, labels = io["noise"], io["labels"]
    cases = [
        (dict(solver="rk4"), "solver must be one of"),
        (dict(path_type="vp"), "path_type must be one of"),
        (dict(num_steps=0), "num_steps must be a positive integer"),
        (dict(cfg_scale=0.5), "cfg_scale must be >= 1"),
        (dict(guidance_interval=(0.8, 0.2)), "guidance_interval must satisfy"),
        (dict(generator=[torch.Generator()]), "a list of 2"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            sample_sit(model, noise, labels, num_steps=kwargs.pop("num_steps", 2), **kwargs)
    with pytest.raises(ValueError, match=r"noise must have shape \(B, 16, 8\), got \(2, 16, 4\)"):
        sample_sit(model, noise[..., :4], labels, num_steps=2)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 1000\]"):
        sample_sit(model, noise, torch.tensor([5, 1001]), num_steps=2)


def test_guidance_needs_a_null_class(sit_small):
    config, state, io = conformance_case("sit_small")
    model = SiT.from_config({**config, "class_dropout_prob": 0.0}).eval()
    with pytest.raises(ValueError, match="needs a null class"):
        sample_sit(model, io["noise"], io["labels"], num_steps=2, cfg_scale=1.5)


@pytest.mark.parametrize("solver", ["euler", "heun", "euler-maruyama"])
@pytest.mark.parametrize("cfg_scale, interval", [(1.0, (0.0, 1.0)), (2.0, (0.0, 1.0)), (2.0, (0.0, 0.5))])
def test_function_evaluations_count_the_forwards_sample_sit_makes(solver, cfg_scale, interval):
    from ctok.sampling.flow import function_evaluations

    calls = []

    class Counted(GaussianFlow):
        def forward(self, x, t, y):
            calls.append(x.shape[0])
            return super().forward(x, t, y)

    model = Counted(torch.randn(4, 2, 3, dtype=torch.float64), 0.5)
    noise = torch.randn(3, 2, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    sample_sit(model, noise, [0, 1, 2], num_steps=6, solver=solver, cfg_scale=cfg_scale, guidance_interval=interval,
               generator=torch.Generator().manual_seed(1))
    assert function_evaluations(solver, 6, cfg_scale, interval) == sum(calls) // 3
