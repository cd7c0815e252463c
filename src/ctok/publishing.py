"""Publishing a checkpoint folder to the Hugging Face hub: what ``ctok push`` does.

:func:`publish` checks that the folder is a ctok checkpoint folder, gives it a model card when it has none
(saved by an older ctok, or a released checkpoint copied here), and uploads it with
:func:`ctok.hub.push_folder`. A card that is already there is uploaded as it is, since it may hold
what the trainer passed in (the training config) or edits of its owner, except that the repo id
replaces the folder placeholder of its loading snippet (a trainer's final folder has no hub id yet).
``model.save_pretrained(folder, push_to_hub=...)`` does the same for a model in memory, writing its
card first.

It sits above :mod:`ctok.loading`: writing a missing card needs the model loaded.
"""
from __future__ import annotations

import os
from pathlib import Path

from ctok.hub import Upload, checkpoint_files, push_folder
from ctok.loading import load_any
from ctok.model_card import card_facts, name_repo_in_card, write_card
from ctok.models.files import CARD_NAME


def publish(folder: str | os.PathLike, repo_id: str, *, private: bool = False,
            revision: str | None = None) -> tuple[Upload, Path | None]:
    """Upload the checkpoint ``folder`` to the hub repo ``repo_id``; returns the upload and the card written or
    changed for it (None when the folder's card went up as it was). See :func:`ctok.hub.push_folder` for
    ``private`` and ``revision``."""
    folder = Path(folder).expanduser()
    checkpoint_files(folder)  # a checkpoint folder at all, checked before a model is loaded for its card
    card = folder / CARD_NAME
    if not card.is_file():
        written = write_card(folder, card_facts(load_any(folder)[0]), repo_id=repo_id)
    else:
        written = card if name_repo_in_card(folder, repo_id) else None
    return push_folder(folder, repo_id, private=private, revision=revision), written
