"""ctok demo: the whole system end to end on Fashion-MNIST, on a laptop CPU, offline."""
from __future__ import annotations

HELP = "train a tokenizer and a SiT on Fashion-MNIST, generate and evaluate: the whole system on a CPU, offline"


def add_arguments(parser) -> None:
    parser.add_argument("--out", default="demo-out",
                        help="output folder; running again in it resumes (default demo-out)")
    parser.add_argument("--data", help="Fashion-MNIST folder (default: $CTOK_FASHION_MNIST, then "
                                       "/usr/share/datasets/fashion-mnist, then a torchvision download when online)")
    parser.add_argument("--quick", action="store_true", help="a smoke run in under two minutes (figures meaningless)")
    parser.add_argument("--ablation", action="store_true",
                        help="also train a plain autoencoder (mask modelling and auxiliary decoders off) and the "
                             "same SiT on its latents, and compare the two latent spaces (about twice the time)")


def run(args) -> int:
    from ctok.demo.pipeline import run_demo

    run_demo(args.out, args.data, quick=args.quick, ablation=args.ablation)
    return 0
