"""The demo's one-page report: pictures, loss curves and the metrics table in one HTML file.

Everything is embedded (PNG as base64), so the page can be mailed or opened from any folder.
"""
from __future__ import annotations

import base64
import html
import json
from pathlib import Path

from ctok.atomic_files import atomic_write, save_figure
from ctok.training.run_log import read_log

# What each reported metric means, shown next to its value.
METRIC_MEANINGS = {
    "test_psnr_db": ("Reconstruction PSNR (test split)", "dB; higher is better. 10 log10(4 / MSE) on [-1, 1] images."),
    "test_ssim": ("Reconstruction SSIM (test split)", "1 is identical; structural similarity on the [0, 1] range."),
    "rfid": ("Reconstruction FID",
             "Fréchet distance between classifier features of reconstructions and of the same test images."),
    "random_latent_fid": ("FID of decoded random latents",
                          "Decoding N(0, 1) latents (denormalised): what an untrained generator would score."),
    "gfid": ("Generation FID", "Generated class-balanced images against the test split; lower is better."),
    "gfid_no_guidance": ("Generation FID without guidance", "The same sampler with cfg scale 1."),
    "class_accuracy": ("Generated-class accuracy",
                       "Share of generated images the packaged classifier assigns to the class "
                       "they were generated for."),
    "class_accuracy_no_guidance": ("Generated-class accuracy without guidance", "As above, cfg scale 1."),
    "classifier_test_accuracy": ("Feature network accuracy",
                                 "The packaged Fashion-MNIST classifier on the test split."),
}


def plot_losses(logs: dict[str, Path], out: Path) -> Path | None:
    """One panel per run: the loss terms of its log.jsonl (total, reconstruction, auxiliary) against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = {name: read_log(path) for name, path in logs.items() if path.exists()}
    runs = {name: records for name, records in runs.items() if records}
    if not runs:
        return None
    fig, axes = plt.subplots(1, len(runs), figsize=(5.5 * len(runs), 3.6), squeeze=False)
    for ax, (name, records) in zip(axes[0], runs.items()):
        keys = sorted({k for r in records for k in r
                       if ("loss" in k or k == "rec" or k.startswith("aux/")) and isinstance(r[k], (int, float))})
        for key in keys:
            points = [(r["step"], r[key]) for r in records if key in r]
            ax.plot(*zip(*points), label=key)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return save_figure(fig, out)


def plot_loss_comparison(logs: dict[str, Path], out: Path, key: str = "loss") -> Path:
    """The ``key`` term of several runs' log.jsonl on one axis (log scale), one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, path in logs.items():
        points = [(r["step"], r[key]) for r in read_log(path) if key in r]
        ax.plot(*zip(*points), label=name)
    ax.set_xlabel("step")
    ax.set_ylabel(f"training {key}")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, out)


def ablation_section(table: dict[str, dict], figures: list[tuple[Path, str]], overrides: list[str]) -> str:
    """The report's ablation section: ``table`` (arm -> metric -> value) as one column per arm,
    and the ``figures`` (png path, caption)."""
    arms = list(table)
    keys = list(dict.fromkeys(k for row in table.values() for k in row))
    rows = "".join(f"<tr><td>{html.escape(METRIC_MEANINGS.get(k, (k,))[0])}</td>"
                   + "".join(f"<td class=num>{_value(table[arm].get(k))}</td>" for arm in arms) + "</tr>"
                   for k in keys)
    header = "".join(f"<th>{html.escape(arm)}</th>" for arm in arms)
    pictures = "".join(f"<figure><figcaption>{html.escape(caption)}</figcaption>{_img(path, caption)}</figure>"
                       for path, caption in figures if path.exists())
    return f"""<h2>Ablation: MAETok against a plain autoencoder</h2>
<p>The same tokenizer recipe, budget and seed with mask modelling and the auxiliary decoders off
(<code>{html.escape(' '.join(overrides))}</code>); the same SiT recipe on each arm's latents. GMM NLL:
held-out negative log-likelihood per dimension (nats) of diagonal Gaussian mixtures with K components
fitted to the normalised latents; probe: held-out linear-probe accuracy of the latents.</p>
<table><tr><th>metric</th>{header}</tr>{rows}</table>
{pictures}
"""


def _img(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _value(v) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:.4g}"
    return html.escape(str(v))


def write_report(out: Path, metrics: dict, figures: list[tuple[str, Path, str]], settings: dict,
                 extra_html: str = "") -> Path:
    """``figures``: (title, png path, caption); ``extra_html``: sections after the figures (the
    ablation's, :func:`ablation_section`). Returns the path of report.html."""
    rows = []
    for key, (label, meaning) in METRIC_MEANINGS.items():
        if key in metrics:
            target = metrics.get("targets", {}).get(key, "")
            rows.append(f"<tr><td>{html.escape(label)}</td><td class=num>{_value(metrics[key])}</td>"
                        f"<td>{html.escape(target)}</td><td>{html.escape(meaning)}</td></tr>")
    sections = [
        f"<figure><figcaption><b>{html.escape(title)}</b> — {html.escape(caption)}</figcaption>"
        f"{_img(path, title)}</figure>"
        for title, path, caption in figures if path is not None and path.exists()
    ]
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>ctok demo report</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; color: #222; }}
table {{ border-collapse: collapse; margin: 1em 0; }} td, th {{ border: 1px solid #ccc; padding: 4px 10px; }}
td.num {{ text-align: right; font-variant-numeric: tabular-nums; }} th {{ background: #f3f3f3; }}
figure {{ margin: 1.5em 0; }} img {{ max-width: 100%; image-rendering: pixelated; border: 1px solid #ddd; }}
code {{ background: #f3f3f3; padding: 1px 4px; }}
</style></head><body>
<h1>ctok demo: MAETok + SiT on Fashion-MNIST</h1>
<p>A small MAETok tokenizer (mask modelling on) was trained on the Fashion-MNIST train split, its
latents were cached, and a class-conditional SiT was trained on them; images were then generated with
classifier-free guidance. FID here uses the Fashion-MNIST classifier that ctok ships as its feature
network (Inception features are meaningless on 32 x 32 grey clothing).</p>
<h2>Metrics</h2>
<table><tr><th>metric</th><th>value</th><th>target</th><th>meaning</th></tr>
{''.join(rows)}
</table>
{''.join(sections)}
{extra_html}
<h2>Settings</h2>
<pre>{html.escape(json.dumps(settings, indent=2))}</pre>
</body></html>
"""
    path = out / "report.html"
    with atomic_write(path, "w") as f:
        f.write(page)
    return path
