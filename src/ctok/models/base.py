"""The base of every ctok model (Tokenizer, SiT, DiT): its config, and its checkpoint folder.

A model class names its ``kind`` ("tokenizer", "sit" or "dit") and its ``config_class``, a
dataclass of the fields that define the computation. One policy holds for every model's
config.json:

* fields of ``config_class`` build the model;
* every other key is kept, in the model's ``extra_config``, and written back unchanged by
  :meth:`~PretrainedModel.to_config`: a released config keeps the keys only its original training
  script read, and a key a later ctok adds survives a round trip through this one;
* a key whose value would make the checkpoint compute something ctok does not implement is refused
  by the class's :meth:`~PretrainedModel.check_config` (the tokenizer's ``dec_type="cnn"``, a
  transformer's ``patch_size=2``), as is a config of another kind;
* kept keys that the class does not itself read or write (``handled_keys``) are "unused":
  ``ctok inspect`` lists them, so a typo in a config is visible rather than silently ignored.

Loading (:meth:`~PretrainedModel.from_pretrained`) builds the model on the meta device and assigns
the checkpoint's tensors to it, so it pays neither for allocating nor for randomly initialising
weights that are overwritten at once; the file mechanics are in :mod:`ctok.models.files`. Saving
(:meth:`~PretrainedModel.save_pretrained`) also writes the model card, ``README.md``
(:mod:`ctok.model_card`), and may upload the folder to the hub (:func:`ctok.hub.push_folder`).

Import direction: this module imports :mod:`ctok.hub` (source resolution, pushing and the kind
registry) and :mod:`ctok.model_card`, which import no model; each subclass registers itself in the hub
when it is defined (``__init_subclass__``). No model module imports anything above it.
"""
from __future__ import annotations

import dataclasses
import os
import typing
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn as nn

from ctok.config_types import check_value, is_plain
from ctok.hub import BUILDERS, KIND_NAMES, LOADERS, other_kind, push_folder, register, resolve
from ctok.model_card import card_facts, write_card
from ctok.models.files import (
    CONFIG_NAME,
    LoadReport,
    load_weights,
    read_config,
    read_weights,
    weights_file,
    write_checkpoint,
)
from ctok.validation import parse_device


class PretrainedModel(nn.Module):
    """A model with a config.json: ``from_config`` / ``to_config``, ``from_pretrained`` / ``save_pretrained``.

    Subclasses set ``kind`` and ``config_class``, call ``super().__init__(config)`` first, and may
    override :meth:`check_config` (values ctok refuses), :meth:`config_entries` (what ``to_config``
    writes besides the kept keys) and ``handled_keys`` (non-field keys they read or write themselves).
    """

    kind: ClassVar[str]
    config_class: ClassVar[type]
    handled_keys: ClassVar[frozenset[str]] = frozenset()

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "kind" in cls.__dict__:  # a class that serves a kind, not an intermediate base or a user's subclass
            register(cls)

    def __init__(self, config):
        super().__init__()
        if not isinstance(config, self.config_class):
            raise TypeError(f"config must be a {self.config_class.__name__} ({type(self).__name__}.from_config "
                            f"takes a dict), got {type(config).__name__}")
        self.config = config
        # The config.json keys that are not fields of the config; from_config fills it.
        self.extra_config: dict = {}

    # -- config.json ------------------------------------------------------------------------------
    @classmethod
    def check_config(cls, config: dict) -> dict:
        """Raise ValueError for a config ctok refuses to build; returns the config to build from.

        The base refuses nothing; subclasses refuse values that would change the computation, and
        may return a copy with keys renamed (never the caller's dict changed).
        """
        return config

    @classmethod
    def split_config(cls, config: dict) -> tuple:
        """``(config_class instance, kept keys)`` of a config.json dict, after :meth:`check_config`."""
        if not isinstance(config, dict):
            raise TypeError(f"config must be a dict (a parsed config.json), got {type(config).__name__}")
        found = other_kind(config, cls.kind)
        if found is not None:
            raise ValueError(f"config is a {KIND_NAMES[found]}'s, not a {KIND_NAMES[cls.kind]}'s: "
                             f"build it with {BUILDERS[found]}")
        config = cls.check_config(config)
        names = {f.name for f in dataclasses.fields(cls.config_class)}
        hints = typing.get_type_hints(cls.config_class)
        for key in sorted(names & config.keys()):
            if is_plain(hints[key]):  # records such as latent_stats check themselves
                check_value(key, config[key], hints[key])
        fields = cls.config_class(**{k: v for k, v in config.items() if k in names})
        return fields, {k: v for k, v in config.items() if k not in names}

    @classmethod
    def from_config(cls, config: dict):
        """Build (random weights, train mode) from a config.json dict, released or ctok's."""
        fields, kept = cls.split_config(config)
        model = cls(fields)
        model.extra_config = kept
        return model

    def config_entries(self) -> dict:
        """What :meth:`to_config` writes over the kept keys: by default every field of the config."""
        return dataclasses.asdict(self.config)

    def to_config(self) -> dict:
        """The config.json written next to the weights: the kept keys, then :meth:`config_entries`."""
        return dict(sorted({**self.extra_config, **self.config_entries()}.items()))

    @property
    def unused_config_keys(self) -> list[str]:
        """Kept config keys this model neither reads nor writes (``ctok inspect`` lists them)."""
        return sorted(k for k in self.extra_config if k not in self.handled_keys)

    # -- checkpoint folders -----------------------------------------------------------------------
    def save_pretrained(self, folder: str | os.PathLike, *, training_config: str | os.PathLike | None = None,
                        evaluation=(), push_to_hub: str | None = None, private: bool = False,
                        revision: str | None = None) -> Path:
        """Write ``config.json``, ``model.safetensors`` and the model card ``README.md`` to ``folder``.

        Each file appears whole or not at all. The card (:mod:`ctok.model_card`) records
        ``training_config`` (the resolved config file the model was trained with) by its sha256 and
        ``evaluation`` (results JSONs of ``ctok evaluate`` / ``ctok reconstruct``, with their
        protocol cards) when given. ``push_to_hub``: a hub repo id (``owner/name``) to upload the
        folder to afterwards (created if missing, ``private`` then; on branch ``revision``), as
        ``ctok push`` does; offline or not logged in, the folder is written and the upload refused.
        """
        # The card's inputs are checked first: a refused evaluation must not leave new weights under an old card.
        facts = card_facts(self, training_config=training_config, evaluation=evaluation)
        folder = write_checkpoint(folder, self.to_config(), self.state_dict())
        write_card(folder, facts, repo_id=push_to_hub)
        if push_to_hub is not None:
            push_folder(folder, push_to_hub, private=private, revision=revision)
        return folder

    @classmethod
    def from_pretrained(cls, src: str | os.PathLike, device: str | torch.device = "cpu"):
        """A checkpoint folder or hub id, loaded in eval mode on ``device`` (see :meth:`load_checkpoint`)."""
        return cls.load_checkpoint(src, device)[0]

    @classmethod
    def load_checkpoint(cls, src: str | os.PathLike, device: str | torch.device = "cpu") -> tuple:
        """``(model in eval mode, LoadReport)`` of a checkpoint folder or hub id.

        ``device`` is ``"auto"`` (the GPU if there is one), ``"cpu"``, ``"cuda"``, ``"cuda:1"`` ...
        A checkpoint of another kind is refused, naming the loader to use, before anything is built.
        """
        device = parse_device(device)
        folder = resolve(src)
        config = read_config(folder)
        found = other_kind(config, cls.kind)
        if found is not None:
            raise ValueError(f"{src} is a {KIND_NAMES[found]} checkpoint, not a {KIND_NAMES[cls.kind]}; "
                             f"load it with {LOADERS[found]}")
        weights_file(folder)  # checked before building: a missing file should not cost a model's worth of time
        try:
            with torch.device("meta"):
                model = cls.from_config(config)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{folder / CONFIG_NAME}: {err}") from None
        try:
            ignored = load_weights(model, read_weights(folder), str(src), assign=True)
        except ValueError as err:
            # A misspelt or missing field builds the default instead: name the suspects.
            unused = model.unused_config_keys
            defaulted = sorted(f.name for f in dataclasses.fields(cls.config_class)
                               if f.name not in config and f.default is not None)  # None: an optional record
            raise ValueError(f"{err}" + (f" (config keys ctok does not use: {unused})" if unused else "")
                             + (f" (fields config.json does not set, built with ctok's defaults: {defaulted})"
                                if defaulted else "")) from None
        return model.to(device).eval(), LoadReport(str(src), folder, ignored, model.unused_config_keys)
