"""``ctok evaluate``: ADM's FID, sFID, IS, precision and recall of a samples .npz against a reference."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

HELP = "FID, sFID, IS, precision and recall of samples (.npz or folder) against a reference (ADM evaluator)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--samples", required=True,
                        help="samples: an .npz with arr_0 uint8 (N, H, W, 3), or a folder of images")
    parser.add_argument("--ref", required=True,
                        help="reference: an ADM reference batch .npz (arr_0 and/or mu, sigma, mu_s, sigma_s), "
                             "a samples .npz, or a folder of images (centre-cropped to --image-size)")
    parser.add_argument("--out", help="JSON file for the results (default: next to the samples, <samples>.eval.json)")
    network = parser.add_mutually_exclusive_group()
    network.add_argument("--inception-weights", metavar="PATH|random",
                         help="Inception weight file weights-inception-2015-12-05-6726825d.pth (default: "
                              "$CTOK_INCEPTION_WEIGHTS, then torch's hub cache); 'random' for a random network "
                              "whose numbers mean nothing (tests)")
    network.add_argument("--feature-network", metavar="MODULE:FACTORY",
                         help="use another feature network: FACTORY() from MODULE returns it "
                              "(see ctok.metrics.features), "
                              "e.g. ctok.models.fmnist_classifier:load_fmnist_classifier")
    parser.add_argument("--image-size", type=int, help="crop size for a folder reference (default: the samples' size)")
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--k", type=int, default=3, help="neighbours for precision/recall (ADM: 3)")
    parser.add_argument("--device", default="auto", help="auto (GPU when present), cpu, cuda, cuda:1, ...")
    parser.add_argument("--num-workers", type=int, default=4, help="image decoding workers for folders")
    parser.add_argument("--pr-float32", action="store_true",
                        help="precision/recall distances in float32 instead of ADM's float16 arithmetic")
    parser.add_argument("--no-cache", action="store_true",
                        help="neither read nor write the reference's cached statistics")


def format_results(results: dict, names: dict[str, str]) -> str:
    lines = []
    for key, label in names.items():
        value = results.get(key)
        reason = results.get("unavailable", {}).get(key)
        lines.append(f"{label:>16}: " + (f"{value:.4f}" if value is not None else f"n/a ({reason})"))
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from ctok.atomic_files import write_json
    from ctok.metrics.evaluator import evaluate
    from ctok.metrics.features import load_feature_network
    from ctok.validation import parse_device

    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be positive, got {args.batch_size}")
    # Checked before the feature network is loaded: a typo should not first send the user looking for weights.
    for flag, path in (("--samples", args.samples), ("--ref", args.ref)):
        if not Path(path).expanduser().exists():
            raise FileNotFoundError(f"{flag}: no image set at {path} (an .npz or a folder of images)")
    device = parse_device(args.device)
    network = load_feature_network(args.feature_network, args.inception_weights, device)
    results = evaluate(args.samples, args.ref, network, batch_size=args.batch_size, device=device, k=args.k,
                       image_size=args.image_size, use_cache=not args.no_cache, num_workers=args.num_workers,
                       adm_fp16=not args.pr_float32)
    samples = Path(args.samples)
    out = Path(args.out) if args.out else samples.with_name(samples.name.removesuffix(".npz") + ".eval.json")
    write_json(out, results)
    print(format_results(results, {"fid": "FID", "sfid": "sFID", "inception_score": "Inception Score",
                                   "precision": "Precision", "recall": "Recall"}))
    print(f"{'images':>16}: {results['num_samples']} samples, {results['num_reference']} reference")
    print(f"{'feature network':>16}: {results['feature_network']['identity']}")
    for warning in results["warnings"]:
        print(warning, file=sys.stderr)
    print(f"results written to {out}")
    return 0
