"""ctok inspect SRC: what a checkpoint folder or hub id holds."""
from __future__ import annotations

import json

HELP = ("describe a checkpoint: kind, resolution, tokens, latent width, parameters, ignored weights, "
        "unused config keys")


def add_arguments(parser) -> None:
    parser.add_argument("src", help="checkpoint folder (config.json + model.safetensors) or hub id")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")


def describe(model, report) -> dict:
    """What ``ctok inspect`` prints of a loaded model and its :class:`~ctok.models.files.LoadReport`."""
    from ctok.models.tokenizer import Tokenizer

    info = {"source": report.source, "folder": str(report.folder), "kind": model.kind}
    if isinstance(model, Tokenizer):
        c = model.config
        info.update(variant=model.variant, image_size=c.image_size, num_tokens=model.num_tokens,
                    latent_dim=model.latent_dim, encoder=c.encoder_model, decoder=c.decoder_model,
                    vq_mean=c.vq_mean, vq_std=c.vq_std)
    else:
        info.update(num_tokens=model.num_tokens, latent_dim=model.in_channels,
                    num_classes=model.num_classes, null_class=model.has_null_class,
                    depth=model.config.depth, hidden_size=model.config.hidden_size)
    info["parameters"] = sum(p.numel() for p in model.parameters())
    info["ignored_weights"] = report.ignored
    info["unused_config_keys"] = report.unused_config_keys
    return info


def run(args) -> int:
    from ctok.loading import load_any

    info = describe(*load_any(args.src))
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    for key, value in info.items():
        if key == "ignored_weights":
            value = f"{len(value)} (training-only)" + (": " + ", ".join(value[:6]) if value else "")
        elif key == "unused_config_keys":
            # A released config keeps its training script's keys; in a ctok-written one this is where a typo shows.
            value = f"{len(value)} (kept, unused)" + (": " + ", ".join(value) if value else "")
        elif key == "parameters":
            value = f"{value:,} ({value / 1e6:.1f}M)"
        print(f"{key:>18}: {value}")
    return 0
