"""``ctok train-tokenizer``: train a SoftVQ-VAE or MAETok tokenizer (see ctok.training.tokenizer)."""
from __future__ import annotations

HELP = "train a SoftVQ-VAE or MAETok tokenizer on images (single process, or under torchrun)"


def add_arguments(parser) -> None:
    from ctok.training.config import add_config_arguments

    add_config_arguments(parser)


def run(args) -> int:
    from ctok.training.config import config_from_args
    from ctok.training.tokenizer import TokenizerTrainConfig, train_tokenizer

    train_tokenizer(config_from_args(TokenizerTrainConfig, args))
    return 0
