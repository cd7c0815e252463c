"""Where a checkpoint comes from, and which kind of model it is.

Source resolution: ``src`` is a local folder or a Hugging Face hub id (``MAETok/maetok-b-128``).
Hub downloads go through huggingface_hub's cache; offline (``HF_HUB_OFFLINE=1``) or without
network, a missing checkpoint raises an error that says what to download and where to put it. A
preset name (``maetok-b-128``, ``SiT-XL/1``) is refused with what to call instead.

Publishing: :func:`push_folder` uploads a checkpoint folder (``config.json``, the weights and the model
card) to a hub model repo in one commit, after checking that the folder is a ctok checkpoint folder and that
the hub can be reached: offline (``HF_HUB_OFFLINE=1``), without a token or without network it says
so in one line before anything is created or uploaded.

The kind registry: every model is of one kind, ``"tokenizer"``, ``"sit"`` or ``"dit"``
(:data:`KINDS`). :func:`model_kind` tells them apart from a config dict alone, and each model class
registers itself under its kind when it is defined (:class:`ctok.models.base.PretrainedModel` calls
:func:`register`), so :func:`model_class` finds the class that serves a kind.

Import direction: this module imports no model, only the preset tables (plain data) and the
checkpoint file names; ``ctok.models.base`` imports it. That is why the classes register
themselves here rather than being imported, and why the ``load_*`` functions, which need the
classes, live in :mod:`ctok.loading`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ctok.downloads import offline
from ctok.models.files import CARD_NAME, CONFIG_NAME, LEGACY_WEIGHTS_NAME, WEIGHTS_NAME, read_config, weights_file
from ctok.models.presets import (
    GENERATOR_PRESET_NAMES,
    RELEASED_GENERATOR_EXAMPLES,
    RELEASED_TOKENIZERS,
    TOKENIZER_PRESET_NAMES,
)

# Each kind, its name in messages, and how a user loads and builds it.
KINDS = ("tokenizer", "sit", "dit")
KIND_NAMES = {"tokenizer": "tokenizer", "sit": "SiT", "dit": "DiT"}
LOADERS = {"tokenizer": "ctok.load_tokenizer (or Tokenizer.from_pretrained)",
           "sit": "ctok.load_sit (or SiT.from_pretrained)", "dit": "ctok.load_dit (or DiT.from_pretrained)"}
BUILDERS = {"tokenizer": "Tokenizer.from_config", "sit": "SiT.from_config", "dit": "DiT.from_config"}

_CLASSES: dict[str, type] = {}


def resolve(src: str | os.PathLike) -> Path:
    """A local checkpoint folder for ``src``: the folder itself, or the hub snapshot in the cache.

    ``src`` is read as a hub id only when it cannot be a local path: ``owner/name`` with one slash,
    not starting with ``.``, ``/`` or ``~``, and no local folder ``owner``. A preset name
    (``maetok-b-128``, ``SiT-XL/1``) is refused with what to call instead.
    """
    if not isinstance(src, (str, os.PathLike)):
        raise TypeError(f"src must be a checkpoint folder or hub id (str or path), got {type(src).__name__}")
    path = Path(src).expanduser()
    if path.is_dir():
        return path
    src = str(src)
    if path.exists():
        raise ValueError(f"{src} is a file; pass the checkpoint folder that holds {CONFIG_NAME} and {WEIGHTS_NAME}")
    _refuse_preset_name(src)
    if _is_local_path(src):
        parent = path.parent
        where = (f": {parent} exists, so {src} is read as a local path, but it holds no {path.name}"
                 if str(parent) != "." and parent.is_dir() else "")
        raise FileNotFoundError(
            f"no checkpoint folder at {src}{where} (hub ids look like 'MAETok/maetok-b-128')")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(src, allow_patterns=[CONFIG_NAME, "*.safetensors", LEGACY_WEIGHTS_NAME]))
    except Exception as err:  # offline, no network, unknown repo: all need the same advice
        cache = os.environ.get("HF_HUB_CACHE") or os.path.join(
            os.environ.get("HF_HOME", "~/.cache/huggingface"), "hub")
        raise FileNotFoundError(
            f"checkpoint {src!r} is not available here ({type(err).__name__}). On a machine with internet run "
            f"`huggingface-cli download {src} --local-dir DIR` (or huggingface_hub.snapshot_download), copy DIR "
            f"here and pass its path instead of the hub id, or put the snapshot in the hub cache ({cache})."
        ) from None


def _is_local_path(src: str) -> bool:
    """Whether ``src`` must be a local path rather than a hub id (see :func:`resolve`)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if (src.count("/") != 1 or src.startswith((".", "/", "~")) or (os.sep != "/" and os.sep in src)
            or Path(src).parent.is_dir()):
        return True
    try:
        validate_repo_id(src)
    except HFValidationError:
        return True
    return False


def _refuse_preset_name(src: str) -> None:
    """Raise ValueError when ``src`` names a preset: a config with random weights, not a checkpoint."""
    if src in TOKENIZER_PRESET_NAMES:
        released = (f"the released weights are the hub id {RELEASED_TOKENIZERS[src]}" if src in RELEASED_TOKENIZERS
                    else "no weights of this preset were released "
                         f"(those that were: {', '.join(RELEASED_TOKENIZERS.values())})")
        raise ValueError(f"{src!r} is a preset name, not a checkpoint: ctok.build_tokenizer({src!r}) builds it "
                         f"with random weights; {released}")
    if src in GENERATOR_PRESET_NAMES:
        family = src.partition("-")[0]
        released = (f"released weights have hub ids like {RELEASED_GENERATOR_EXAMPLES[src]} (one per tokenizer)"
                    if src in RELEASED_GENERATOR_EXAMPLES else "no weights of this size were released")
        raise ValueError(f"{src!r} is a preset name, not a checkpoint: ctok.build_{family.lower()}({src!r}, "
                         f"input_size=..., in_channels=...) builds it with random weights; {released}")


@dataclass(frozen=True)
class Upload:
    """What :func:`push_folder` uploaded: the repo, its branch, the files and the commit's address."""

    repo_id: str
    revision: str
    files: list[str]
    url: str


def checkpoint_files(folder: str | os.PathLike) -> list[str]:
    """The files of the ctok checkpoint ``folder`` that an upload sends: config.json, the weights, README.md.

    Raises unless ``folder`` is a checkpoint folder: a config.json of a tokenizer, SiT or DiT beside its weights.
    Nothing else in the folder (checkpoints, logs, samples) is ever sent.
    """
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"no checkpoint folder at {folder} (a folder with {CONFIG_NAME} and {WEIGHTS_NAME})")
    try:
        model_kind(read_config(folder))
    except ValueError as err:
        raise ValueError(f"{folder} is not a ctok checkpoint folder: {err}") from None
    names = [CONFIG_NAME, weights_file(folder).name]
    return sorted(names + [CARD_NAME] if (folder / CARD_NAME).is_file() else names)


def push_folder(folder: str | os.PathLike, repo_id: str, *, private: bool = False,
                revision: str | None = None) -> Upload:
    """Upload the checkpoint ``folder`` (:func:`checkpoint_files`) to the hub model repo ``repo_id`` in one commit.

    The repo is created when missing (private with ``private=True``; an existing repo keeps its
    visibility), and so is the branch ``revision`` (default: main). The folder, the offline switch,
    the login and the network are checked before anything is created.
    """
    from huggingface_hub import HfApi, get_token
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    folder = Path(folder).expanduser()
    files = checkpoint_files(folder)
    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise ValueError(f"{repo_id!r} is not a hub repo id (owner/name): {err}") from None
    refused = f"not uploading {folder} to {repo_id}"
    if offline():
        raise ConnectionError(f"{refused}: HF_HUB_OFFLINE is set; on a machine with network, unset it and push again")
    if get_token() is None:
        raise PermissionError(f"{refused}: not logged in to the Hugging Face hub; run `hf auth login` "
                              "(or set HF_TOKEN) with a token that may write to the repo")
    api = HfApi()
    try:
        api.whoami()  # the token and the network, before a repo is created
        api.create_repo(repo_id, private=private, exist_ok=True)
        if revision is not None:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        commit = api.upload_folder(repo_id=repo_id, folder_path=folder, revision=revision, allow_patterns=files,
                                   commit_message=f"Upload a ctok checkpoint folder ({', '.join(files)})")
    except Exception as err:
        raise _hub_error(err, refused) from None
    return Upload(repo_id, revision or "main", files, str(commit.commit_url))


def _hub_error(err: Exception, refused: str) -> Exception:
    """The one-line error for a failure of the hub or of the network; any other exception is a bug, kept as is."""
    status = getattr(getattr(err, "response", None), "status_code", None)
    detail = " ".join(str(err).split())
    if status in (401, 403):
        return PermissionError(f"{refused}: the hub refused the token (HTTP {status}: {detail}); check "
                               "`hf auth whoami` and that the token may write to this repo")
    if status is not None:
        return ValueError(f"{refused}: the hub answered HTTP {status}: {detail}")
    # huggingface_hub's transport (an httpx flavour) raises errors of its own module, not OSErrors.
    if isinstance(err, OSError) or type(err).__module__.split(".")[0].startswith(("httpx", "requests", "urllib3")):
        return ConnectionError(f"{refused}: cannot reach the Hugging Face hub ({type(err).__name__}: {detail}); "
                               "check the network")
    return err


def register(cls: type) -> None:
    """Make ``cls`` the class that serves ``cls.kind``; called once per model class, as it is defined."""
    if cls.kind not in KINDS:
        raise ValueError(f"{cls.__qualname__}.kind must be one of {KINDS}, got {cls.kind!r}")
    known = _CLASSES.get(cls.kind)
    # The same class defined again (a module reloaded) replaces itself; a second class may not take the kind.
    if known is not None and (known.__module__, known.__qualname__) != (cls.__module__, cls.__qualname__):
        raise ValueError(f"kind {cls.kind!r} is already served by {known.__module__}.{known.__qualname__}")
    _CLASSES[cls.kind] = cls


def model_class(kind: str) -> type:
    """The registered class of ``kind`` ('tokenizer', 'sit' or 'dit')."""
    if kind not in _CLASSES:
        raise LookupError(f"no model class is registered for kind {kind!r} (registered: {sorted(_CLASSES)}); "
                          "import ctok.loading, which imports every model")
    return _CLASSES[kind]


def _evident_kind(config: dict) -> str | None:
    """The kind a config says it is of, or None when nothing in it tells SiT from DiT (or it is no model's).

    Tokenizers have encoder_model (ctok writes ``variant`` too; ctok 0.1 wrote ``tokenizer_kind``);
    DiTs have learn_sigma or the DiT hub tag; SiTs have path_type or the SiT hub tag.
    """
    tags = config.get("tags", [])
    if any(key in config for key in ("encoder_model", "variant", "tokenizer_kind")):
        return "tokenizer"
    if "learn_sigma" in config or "DiT" in tags:
        return "dit"
    if "path_type" in config or "SiT" in tags:
        return "sit"
    return None


def model_kind(config: dict) -> str:
    """'tokenizer', 'sit' or 'dit', from a config dict alone; a transformer config that does not say is a SiT."""
    kind = _evident_kind(config)
    if kind is not None:
        return kind
    if "hidden_size" in config:
        return "sit"
    raise ValueError("config.json is neither a tokenizer's (encoder_model) nor a SiT/DiT's (hidden_size)")


def other_kind(config: dict, kind: str) -> str | None:
    """The kind ``config`` says it is of when that is not ``kind``; None when it fits or does not say."""
    found = _evident_kind(config)
    return found if found not in (None, kind) else None
