"""``ctok export SRC --format onnx --out DIR``: a checkpoint as portable graphs (see :mod:`ctok.export`)."""
from __future__ import annotations

import argparse

HELP = ("export a checkpoint to ONNX: a tokenizer's encoder and decoder, or a SiT / DiT forward, with a dynamic "
        "batch axis and a manifest of inputs, outputs and normalisation")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", help="checkpoint folder (config.json + model.safetensors) or hub id")
    parser.add_argument("--format", default="onnx", help="export format: onnx (the only one so far; the default)")
    parser.add_argument("--out", required=True, help="new (or empty) folder for the graphs and manifest.json")
    parser.add_argument("--opset", type=int, help="ONNX opset to write, 18 or later (default: the exporter's own)")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ctok.export import MANIFEST_NAME, export_model

    manifest = export_model(args.src, args.out, format=args.format, opset=args.opset)
    for graph in manifest["graphs"].values():
        described = {side: ", ".join(f"{name} {tuple(t['shape'])} {t['dtype']}" for name, t in graph[side].items())
                     for side in ("inputs", "outputs")}
        print(f"{graph['file']}: {described['inputs']} -> {described['outputs']}; "
              f"max |onnxruntime - PyTorch| {graph['max_abs_diff_vs_pytorch']:.2g}")
    print(f"opset {manifest['opset']}; shapes, dtypes and normalisation in {Path(args.out) / MANIFEST_NAME}")
    return 0
