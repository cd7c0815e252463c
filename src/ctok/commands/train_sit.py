"""``ctok train-sit``: flow-matching training of a SiT on a tokenizer's latents (see ctok.training.generator)."""
from __future__ import annotations

HELP = "train a SiT on a tokenizer's latents, from a latent cache or images encoded on the fly"


def add_arguments(parser) -> None:
    from ctok.training.config import add_config_arguments

    add_config_arguments(parser)


def run(args) -> int:
    from ctok.training.config import config_from_args
    from ctok.training.generator import SiTTrainConfig, train_generator

    train_generator("sit", config_from_args(SiTTrainConfig, args))
    return 0
