"""``ctok analyze-latents``: GMM fits, linear probe and geometry of tokenizers' latents (see ctok.latent_analysis)."""
from __future__ import annotations

import argparse

HELP = ("how well a latent space suits a generator: GMM NLL against components, linear probe, variance spectrum "
        "of one or more tokenizers or latent caches, as analysis.json and plots")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tokenizer", action="append", default=[], metavar="SRC",
                        help="tokenizer folder or hub id whose latents of --data to analyse (repeat to compare)")
    parser.add_argument("--data", help="images for --tokenizer: an image folder or a folder with Fashion-MNIST's files")
    parser.add_argument("--latents", action="append", default=[], metavar="CACHE",
                        help="a finished latent cache (ctok cache-latents) to analyse (repeatable)")
    parser.add_argument("--out", required=True, help="folder for analysis.json and the PNG plots")
    parser.add_argument("--components", default="1,2,4,8,16,32,64",
                        help="mixture component counts K, comma-separated (default: 1,2,4,8,16,32,64)")
    parser.add_argument("--pca-dim", type=int, help="fit the mixtures after PCA to this many dimensions")
    parser.add_argument("--limit", type=int, default=10000,
                        help="analyse this many images / cached samples, drawn at random with --seed (default 10000)")
    parser.add_argument("--held-out", type=float, default=0.2, help="share of the latents held out (default 0.2)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the subset, the split and the fits")
    parser.add_argument("--no-probe", action="store_true", help="skip the linear probe (unlabelled data)")
    parser.add_argument("--view", type=int, default=0, help="cached view: 0 the image, 1 its mirror (--flip caches)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per forward pass")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                        help="what --tokenizer encodes in: fp32 (the default), or bf16 autocast on CUDA as "
                             "cache-latents' default does, to compare with such a cache")
    parser.add_argument("--num-workers", type=int, default=0, help="image decoding workers")
    parser.add_argument("--device", default="auto", help="auto (GPU when present), cpu, cuda, cuda:1, ...")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads torch encodes with (default 1: on a busy 2-core machine two threads made "
                             "encoding 10,000 demo images 15x slower; raise it for big tokenizers on many free cores)")


def parse_components(text: str) -> tuple[int, ...]:
    """``"1,2,4"`` -> (1, 2, 4); anything else is a ValueError naming the flag."""
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise ValueError(f"--components must be comma-separated integers such as 1,2,4,8, got {text!r}") from None


def run(args: argparse.Namespace) -> int:
    import torch

    from ctok.data import open_images
    from ctok.latent_analysis import analyze_to_folder, encode_images, read_latent_cache
    from ctok.loading import load_tokenizer
    from ctok.validation import parse_device

    if not args.tokenizer and not args.latents:
        raise ValueError("give --tokenizer (with --data) or --latents: there is nothing to analyse")
    if bool(args.tokenizer) != bool(args.data):
        raise ValueError("--tokenizer and --data go together: the tokenizers encode the images of --data")
    names = [*args.tokenizer, *args.latents]
    if len(set(names)) != len(names):
        raise ValueError(f"a tokenizer or cache is named twice in {names}")
    components = parse_components(args.components)
    device = parse_device(args.device)
    if args.threads < 1:
        raise ValueError(f"--threads must be at least 1, got {args.threads}")
    torch.set_num_threads(args.threads)
    samples = {}
    for name in args.tokenizer:
        tokenizer = load_tokenizer(name, device=device)
        samples[name] = encode_images(tokenizer, open_images(args.data, tokenizer.image_size), limit=args.limit,
                                      seed=args.seed, batch_size=args.batch_size, num_workers=args.num_workers,
                                      data_source=str(args.data), precision=args.precision)
        print(f"{name}: encoded {samples[name].source['images']} images")
    for name in args.latents:
        samples[name] = read_latent_cache(name, limit=args.limit, seed=args.seed, view=args.view)
    record = analyze_to_folder(samples, args.out, components=components, pca_dim=args.pca_dim,
                               held_out=args.held_out, seed=args.seed, probe=not args.no_probe)
    for name, analysis in record["analyses"].items():
        fits = {f["components"]: f["held_out_nll_per_dim"] for f in analysis["gmm"]["fits"]}
        best = analysis["gmm"]["best_held_out_components"]
        line = f"{name}: held-out GMM NLL/dim {fits[best]:.4f} at K={best} (K=1: {fits[min(fits)]:.4f})"
        if analysis["probe"] is not None:
            probe = analysis["probe"]
            line += (f"; probe {probe['mean_pooled']['held_out_accuracy']:.3f} mean-pooled, "
                     f"{probe['flattened']['held_out_accuracy']:.3f} flattened (chance {probe['chance']:.3f})")
        print(line)
    print(f"analysis of {len(samples)} latent set(s) in {record['seconds']:.1f} s written to {args.out}/analysis.json "
          f"with {', '.join(record['plots'])}")
    return 0
