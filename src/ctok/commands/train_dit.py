"""``ctok train-dit``: Gaussian-diffusion training of a DiT on a tokenizer's latents (see ctok.training.generator)."""
from __future__ import annotations

HELP = "train a DiT on a tokenizer's latents, from a latent cache or images encoded on the fly"


def add_arguments(parser) -> None:
    from ctok.training.config import add_config_arguments

    add_config_arguments(parser)


def run(args) -> int:
    from ctok.training.config import config_from_args
    from ctok.training.generator import DiTTrainConfig, train_generator

    train_generator("dit", config_from_args(DiTTrainConfig, args))
    return 0
