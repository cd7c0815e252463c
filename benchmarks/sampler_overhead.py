"""What the samplers cost beyond the network: a full sampling run against the same forwards alone.

The sampler's own work (the float64 update, guidance mixing, per-sample noise streams, Python
per step) is the difference between ``sample_sit`` / ``sample_dit`` and a replay of exactly the
forwards it made (same count, same batch sizes), timed side by side in one process. A first run
records those batch sizes with a forward hook, so the replay needs no knowledge of the schedule.
"""
from __future__ import annotations

from contextlib import nullcontext

import torch

from benchmarks.measure import paired_ratio, timed_side_by_side
from ctok.models.diffusion_transformer import build_preset
from ctok.sampling import sample_dit, sample_sit


def _autocast(device: torch.device):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


def _measure(model, sample, *, batch: int, device: torch.device, repeats: int) -> dict:
    tokens, channels = model.num_tokens, model.in_channels
    noise = torch.randn(batch, tokens, channels, device=device)
    labels = torch.randint(0, model.num_classes, (batch,), device=device)

    sizes: list[int] = []
    hook = model.register_forward_pre_hook(lambda module, args: sizes.append(args[0].shape[0]))
    with torch.no_grad(), _autocast(device):
        sample(model, noise, labels)
    hook.remove()

    x = torch.randn(max(sizes), tokens, channels, device=device)
    y = torch.randint(0, model.num_classes, (max(sizes),), device=device)
    t = torch.rand(max(sizes), device=device)
    if model.kind == "dit":
        t = (t * 999).long()

    def forwards():
        with torch.no_grad(), _autocast(device):
            for n in sizes:
                model(x[:n], t[:n], y[:n])

    def run(generator):
        def go():
            with torch.no_grad(), _autocast(device):
                sample(model, noise, labels, generator=generator())
        return go

    def per_sample():
        return [torch.Generator(device).manual_seed(i) for i in range(batch)]

    def shared():
        return torch.Generator(device).manual_seed(0)

    t = timed_side_by_side({"bare": forwards, "own": run(per_sample), "one": run(shared)}, device, repeats=repeats)
    return {
        "forwards": len(sizes), "forward_rows": sum(sizes),
        "bare_forwards_s": t["bare"], "sampling_s": t["own"], "sampling_one_generator_s": t["one"],
        "overhead_fraction": paired_ratio(t["own"], t["bare"]) - 1,
        "overhead_fraction_one_generator": paired_ratio(t["one"], t["bare"]) - 1,
    }


def sampler_overhead(device: str | torch.device = "cpu", quick: bool = False) -> dict:
    """Sampling time against bare forwards for SiT (Euler-Maruyama, guided on [0, 0.75]) and DiT
    (DDPM, cosine, guided), as ``ctok generate`` runs them (one noise generator per sample).

    ``overhead_fraction`` = sampling time / forward time - 1, the median over rounds that time the
    bare forwards and the two sampling variants one after another (paired against drift). GPU: the
    XL/1 models on 128 x 32 latents, 250 steps, batch 32. CPU: S/1 models, 20 steps (5 with
    ``quick``), batch 4.
    """
    device = torch.device(device)
    gpu = device.type == "cuda"
    size, batch = ("XL", 32) if gpu else ("S", 4)
    steps = 250 if gpu else (5 if quick else 20)
    repeats = 5
    torch.manual_seed(0)
    result = {"device": str(device), "batch": batch, "steps": steps, "latents": "128x32"}
    settings = {
        "sit": dict(solver="euler-maruyama", cfg_scale=1.9, guidance_interval=(0.0, 0.75)),
        "dit": dict(solver="ddpm", noise_schedule="cosine", cfg_scale=1.75),
    }
    for kind, sampler in (("sit", sample_sit), ("dit", sample_dit)):
        name = f"{'SiT' if kind == 'sit' else 'DiT'}-{size}/1"
        model = build_preset(name, input_size=128, in_channels=32).to(device).eval()
        # adaLN-Zero starts every block as the identity; random weights give the forwards real work.
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0.0, 0.02)

        def sample(model, noise, labels, generator=None, sampler=sampler, kwargs=settings[kind]):
            return sampler(model, noise, labels, num_steps=steps, generator=generator, **kwargs)

        result[kind] = {"model": name, **{k: list(v) if isinstance(v, tuple) else v for k, v in settings[kind].items()},
                        **_measure(model, sample, batch=batch, device=device, repeats=repeats)}
        del model
        if gpu:
            torch.cuda.empty_cache()
    return result


if __name__ == "__main__":
    import argparse
    import json

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    print(json.dumps(sampler_overhead(args.device, args.quick), indent=2))
