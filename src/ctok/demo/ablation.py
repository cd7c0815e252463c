"""``ctok demo --ablation``: MAETok's ablation at demo scale, mask modelling against a plain autoencoder.

The paper's claim is about the latent space: mask modelling (with its auxiliary decoders) gives
latents with fewer, better separated Gaussian-mixture modes and more discriminative features, on
which a diffusion model learns faster and better. Here the default demo's MAETok (the demo's own
stages, reused when they already ran in the same folder) is compared with a plain autoencoder:
the same demo-maetok recipe, budget and seed with mask modelling and the auxiliary decoders off.
Each arm runs every demo stage (reconstruct, cache the latents, train the same demo-sit recipe,
generate, evaluate); then both latent caches are analysed together (GMM NLL against K, linear
probe, variance spectrum) and the SiTs' loss curves are drawn on one axis. Everything lands in
``<out>/ablation/`` (``metrics.json`` side by side, ``analysis.json``, PNGs); the plain arm's own
demo folder is ``<out>/ablation/plain-ae``. Every stage resumes like the default demo's.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from tqdm import tqdm

from ctok.atomic_files import write_json

# The demo-maetok recipe without MAETok's parts: no mask token (enc_token_drop 0 turns masking off),
# no HOG auxiliary decoder, and the "published" mask schedule, which is a no-op without masking
# ("anneal" is refused for an unmasked tokenizer).
PLAIN_OVERRIDES = ("model.enc_token_drop=0.0", "auxiliary.enabled=false", "masking.schedule=published")
ARMS = ("MAETok", "plain AE")
# The demo metrics compared side by side (metrics.json keys of each arm's demo).
COMPARED = ("test_psnr_db", "test_ssim", "rfid", "gfid", "gfid_no_guidance", "class_accuracy",
            "class_accuracy_no_guidance", "random_latent_fid")
# Latents analysed per arm: the 10,000 (under two minutes per tokenizer on 2 cores), fewer on --quick.
ANALYSED_LATENTS = {"default": 10000, "quick": 1000}


def plain_arm(demo):
    """The plain-autoencoder arm: a demo in ``<out>/ablation/plain-ae`` sharing ``demo``'s data,
    classifier and settings."""
    # type(demo): the demo's class, without importing ctok.demo.pipeline, which imports this module.
    plain = type(demo)(demo.out / "ablation" / "plain-ae", demo.data_arg, demo.settings,
                 title="a plain autoencoder (demo-maetok without mask modelling and auxiliary decoders)",
                 tokenizer_overrides=PLAIN_OVERRIDES)
    plain.classifier = demo.classifier
    return plain


def analyse(arms: dict, folder: Path, quick: bool, seed: int) -> dict:
    """``analysis.json`` of both arms' latent caches (computed once; a rerun reads it back)."""
    from ctok.latent_analysis import DEFAULT_COMPONENTS, QUICK_COMPONENTS, analyze_to_folder, read_latent_cache

    path = folder / "analysis.json"
    if path.exists():
        return json.loads(path.read_text())
    limit = ANALYSED_LATENTS["quick" if quick else "default"]
    samples = {name: read_latent_cache(arm.latent_dir, limit=limit, seed=seed) for name, arm in arms.items()}
    return analyze_to_folder(samples, folder, components=QUICK_COMPONENTS if quick else DEFAULT_COMPONENTS,
                             seed=seed)


def summarise(arms: dict, analysis: dict) -> dict[str, dict]:
    """Per arm: the demo metrics of :data:`COMPARED`, the held-out GMM NLL per K and the probe accuracies."""
    from ctok.latent_analysis import summary_scores
    from ctok.training.run_log import read_log

    table = {}
    for name, arm in arms.items():
        result = analysis["analyses"][name]
        row = {key: arm.metrics.get(key) for key in COMPARED}
        row.update(summary_scores(result))
        losses = [record["loss"] for record in read_log(arm.out / "runs" / "sit" / "log.jsonl")]
        row["sit_final_loss_mean_last_5_logs"] = sum(losses[-5:]) / len(losses[-5:])
        table[name] = row
    return table


def say(message: str) -> None:
    tqdm.write(f"\n== {message}")


def run_ablation(demo, quick: bool) -> str:
    """Run the plain-autoencoder arm next to ``demo`` (whose stages 1-7 ran), compare the two and
    return the report section (HTML); ``<out>/ablation/metrics.json`` holds the numbers. ``quick``:
    the demo runs with its --quick settings, so the analysis is cut down too."""
    from ctok.demo.report import ablation_section, plot_loss_comparison

    start = time.time()
    say("Ablation: the same demo with a plain autoencoder (mask modelling and auxiliary decoders off)")
    plain = plain_arm(demo)
    plain.out.mkdir(parents=True, exist_ok=True)
    plain.check_settings()
    plain.run_stages()
    arms = dict(zip(ARMS, (demo, plain)))
    folder = demo.out / "ablation"
    say("Ablation: latent analysis of both caches (GMM NLL against K, linear probe, variance spectrum)")
    analysis = analyse(arms, folder, quick=quick, seed=demo.settings.seed)
    curves = plot_loss_comparison({name: arm.out / "runs" / "sit" / "log.jsonl" for name, arm in arms.items()},
                                  folder / "sit_loss.png")
    table = summarise(arms, analysis)
    write_json(folder / "metrics.json", {"arms": table, "plain_overrides": list(PLAIN_OVERRIDES),
                                         "analysed_latents": analysis["analyses"][ARMS[0]]["num_latents"],
                                         "elapsed_s_this_run": round(time.time() - start, 1)})
    figures = [(folder / p, p) for p in analysis["plots"]] + [(curves, "SiT training loss of both arms")]
    figures += [(arm.out / "runs" / "tokenizer" / "dashboard.png", f"{name}: latent dashboard during training")
                for name, arm in arms.items()]
    return ablation_section(table, figures, list(PLAIN_OVERRIDES))
