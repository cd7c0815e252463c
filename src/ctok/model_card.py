"""The model card of a checkpoint folder: ``README.md``, Hugging Face metadata and what the model is.

Every folder :meth:`~ctok.models.base.PretrainedModel.save_pretrained` writes (so every trainer's
``final`` export too) gets a card: YAML front matter the hub reads (licence, library, tags, pipeline
tag) with ctok's facts under the key ``ctok``, then prose and tables rendered from the same facts:
the kind and its figures (parameters, tokens, latent shape, image size), the training config's
sha256, the tokenizer a generator expects and the latent normalisation it applies, evaluation
figures with their protocol cards, the licence, the ctok version and how to load the model.

A card states only what is known. What a model cannot tell about itself (the config it was trained
with, the evaluations of it) is passed in; where nothing was, the card says "not recorded" or "not
evaluated". Re-saving into the same folder writes the card again; the passed-in facts of the
previous card carry over only when ``config.json`` and the weights are byte-identical to those it
described, so no claim outlives the model it was made about.

The loaders read ``config.json`` and the weights only, so the card never changes what loads. This
module imports no model (it reads the one it is given), so :mod:`ctok.models.base` can call it.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import yaml

from ctok.atomic_files import atomic_write, file_sha256
from ctok.hub import KIND_NAMES
from ctok.models.files import CARD_NAME, CONFIG_NAME, weights_file
from ctok.protocol import ProtocolCard

DEFAULT_LICENSE = "apache-2.0"  # ctok's own; a config.json that records a licence keeps its own
VARIANT_NAMES = {"softvq": "SoftVQ-VAE", "maetok": "MAETok"}
# The result keys ``ctok evaluate`` (generation) and ``ctok reconstruct`` (reconstruction) write.
METRIC_NAMES = {"fid": "FID", "sfid": "sFID", "inception_score": "Inception Score", "precision": "Precision",
                "recall": "Recall", "rfid": "rFID", "psnr": "PSNR", "ssim": "SSIM", "lpips": "LPIPS"}
# Facts that were passed in rather than read off the model: what a re-save may carry over.
_PASSED_IN = ("training_config", "evaluation")
FOLDER_PLACEHOLDER = "path/to/this-folder"  # what the loading snippet names without a hub id


def card_facts(model, *, training_config: str | os.PathLike | None = None, evaluation=()) -> dict:
    """What the card of ``model`` states, the passed-in facts checked: called before anything is written.

    ``training_config``: the resolved config the model was trained with (a run's ``config.yaml``);
    the card records its sha256 and path. ``evaluation``: result JSONs of ``ctok evaluate`` or
    ``ctok reconstruct`` (paths or parsed dicts), each with its protocol card.
    """
    facts = model_facts(model)
    facts["training_config"] = training_record(training_config) if training_config is not None else None
    facts["evaluation"] = [evaluation_record(result, facts) for result in _as_list(evaluation)]
    return facts


def write_card(folder: str | os.PathLike, facts: dict, *, repo_id: str | None = None) -> Path:
    """Write ``folder/README.md`` from :func:`card_facts`, once config.json and the weights are in ``folder``.

    The passed-in facts of the card it replaces are kept when that card described the same files.
    ``repo_id``: the hub id the loading snippet names (else a placeholder). Returns the card's path.
    """
    folder = Path(folder)
    facts = {**facts, "config_sha256": file_sha256(folder / CONFIG_NAME),
             "weights_sha256": file_sha256(weights_file(folder))}
    previous = _carried_over(folder, facts)
    facts["training_config"] = facts["training_config"] or previous.get("training_config")
    kept = previous.get("evaluation", [])
    facts["evaluation"] = kept + [e for e in facts["evaluation"] if e not in kept]
    path = folder / CARD_NAME
    with atomic_write(path, "w") as f:
        f.write(render_card(facts, repo_id))
    return path


def name_repo_in_card(folder: str | os.PathLike, repo_id: str) -> bool:
    """Put ``repo_id`` where ``folder``'s card names this folder by the placeholder a card written
    without a hub id gets (its loading snippet), leaving the rest of the card as it is; returns whether
    anything changed. Uploaded as it was, the card would tell hub users to load "path/to/this-folder"."""
    path = Path(folder) / CARD_NAME
    text = path.read_text(encoding="utf-8")
    named = text.replace(f'"{FOLDER_PLACEHOLDER}"', f'"{repo_id}"')  # in the Python snippet
    for command in ("ctok inspect ", "--model "):  # and in the command line that follows it
        named = named.replace(f"{command}{FOLDER_PLACEHOLDER}", f"{command}{repo_id}")
    if named == text:
        return False
    with atomic_write(path, "w") as f:
        f.write(named)
    return True


def read_card(folder: str | os.PathLike) -> dict | None:
    """The front matter of ``folder/README.md`` as a dict; None when there is none or it does not parse."""
    path = Path(folder) / CARD_NAME
    if not path.is_file():
        return None
    text = path.read_text(encoding="utf-8")
    head, sep, _ = text.removeprefix("---\n").partition("\n---\n")
    if not text.startswith("---\n") or not sep:
        return None
    try:
        front = yaml.safe_load(head)
    except yaml.YAMLError:
        return None
    return front if isinstance(front, dict) else None


def _carried_over(folder: Path, facts: dict) -> dict:
    """The passed-in facts of the previous card, when it described this very config.json and these weights."""
    front = read_card(folder) or {}
    previous = front.get("ctok")
    if not isinstance(previous, dict) or any(previous.get(k) != facts[k] for k in ("config_sha256", "weights_sha256")):
        return {}
    return {k: previous[k] for k in _PASSED_IN if previous.get(k)}


def _as_list(evaluation) -> list:
    if evaluation is None:
        return []
    return [evaluation] if isinstance(evaluation, (str, os.PathLike, dict)) else list(evaluation)


# -- the facts -----------------------------------------------------------------------------------
def model_facts(model) -> dict:
    """What the card states of ``model`` itself (a Tokenizer, SiT or DiT): kind, figures and records."""
    from ctok import __version__

    facts = {"ctok_version": __version__, "kind": model.kind,
             "license": model.extra_config.get("license", DEFAULT_LICENSE),
             "parameters": sum(p.numel() for p in model.parameters())}
    return {**facts, **(_tokenizer_facts(model) if model.kind == "tokenizer" else _generator_facts(model))}


def _tokenizer_facts(tokenizer) -> dict:
    c = tokenizer.config
    return {
        "variant": tokenizer.variant, "image_size": c.image_size,
        "latent_shape": [tokenizer.num_tokens, tokenizer.latent_dim],
        "encoder": c.encoder_model, "decoder": c.decoder_model, "patch_size": [c.enc_patch_size, c.dec_patch_size],
        # SoftVQ soft-quantizes over grouped codebooks; MAETok's latents are left continuous.
        "codebooks": [c.num_codebooks, c.codebook_size] if tokenizer.variant == "softvq" else None,
        "identity": tokenizer.identity(),
        "latent_stats": {"mean": float(c.vq_mean), "std": float(c.vq_std), "source": "config.json (vq_mean, vq_std)"},
    }


def _generator_facts(generator) -> dict:
    c = generator.config
    facts = {
        "latent_shape": [generator.num_tokens, generator.in_channels],
        "hidden_size": c.hidden_size, "depth": c.depth, "num_heads": c.num_heads,
        "num_classes": c.num_classes, "null_class": generator.has_null_class,
        "tokenizer": {"identity": c.tokenizer.identity, "source": c.tokenizer.source} if c.tokenizer else None,
        "latent_stats": c.latent_stats.to_dict() if c.latent_stats else None,
    }
    if generator.kind == "sit":
        return {**facts, "path_type": c.path_type}
    return {**facts, "learn_sigma": c.learn_sigma, "noise_schedule": c.noise_schedule}


def training_record(config_path: str | os.PathLike) -> dict:
    """``{"sha256", "source"}`` of the resolved training config file (a run folder's ``config.yaml``)."""
    path = Path(config_path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"training config {config_path} does not exist (a run folder's config.yaml)")
    return {"sha256": file_sha256(path), "source": str(path.resolve())}


def evaluation_record(result, facts: dict) -> dict:
    """One evaluation as the card keeps it: its metrics, what was unavailable, its protocol card and source.

    ``result`` is a results JSON (path or dict) of ``ctok evaluate`` or ``ctok reconstruct``. One
    without a protocol card, without any metric, or made with another tokenizer than the model's
    is refused: its numbers could not be compared with anything, or are not this model's.
    """
    source = "passed in"
    if isinstance(result, (str, os.PathLike)):
        source = str(result)
        try:
            result = json.loads(Path(result).expanduser().read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"evaluation {source} is not valid JSON: {err}") from None
    if not isinstance(result, dict):
        raise ValueError(f"evaluation {source} must be a JSON object of results, got {type(result).__name__}")
    protocol = result.get("protocol")
    try:
        ProtocolCard(**protocol)  # the fields of a protocol card and no others
    except TypeError:
        raise ValueError(f"evaluation {source} has no valid protocol card ('protocol': the fields of "
                         "ctok.protocol.ProtocolCard); write it with ctok evaluate or ctok reconstruct") from None
    metrics = {k: result[k] for k in METRIC_NAMES if k in result}
    if not metrics:
        raise ValueError(f"evaluation {source} holds none of the metrics {sorted(METRIC_NAMES)}")
    _check_tokenizer(result, facts, source)
    unavailable = {k: v for k, v in (result.get("unavailable") or {}).items() if k in metrics}
    # Through JSON: a dict passed in may hold str or float subclasses (torch's version string) that
    # YAML would refuse, and the card must not share the caller's objects.
    return json.loads(json.dumps({"source": source, "metrics": metrics, "unavailable": unavailable,
                                  "protocol": protocol}))


def _check_tokenizer(result: dict, facts: dict, source: str) -> None:
    """Refuse a result that names another tokenizer than the one this model is, or expects."""
    recorded = result.get("tokenizer")  # ctok reconstruct's {"source", "identity"}
    made_with = recorded.get("identity") if isinstance(recorded, dict) else None
    ours = facts.get("identity") or (facts.get("tokenizer") or {}).get("identity")
    if made_with is not None and ours is not None and made_with != ours:
        raise ValueError(f"evaluation {source} was made with tokenizer {made_with}, but this model's is {ours}")


# -- the card ------------------------------------------------------------------------------------
def front_matter(facts: dict) -> dict:
    """The YAML metadata the hub reads, with every fact under ``ctok``."""
    kind = facts["kind"]
    if kind == "tokenizer":
        tags = ["ctok", "image-tokenizer", "1d-tokenizer", facts["variant"]]
    else:
        tags = ["ctok", "class-conditional-image-generation", "latent-generation", KIND_NAMES[kind]]
    meta = {"license": facts["license"], "library_name": "ctok", "tags": tags}
    if kind == "tokenizer":
        # Its encoder maps an image to latent features; the hub has no task for class-conditional
        # generation from class ids, so a generator's card names none rather than a wrong one.
        meta["pipeline_tag"] = "image-feature-extraction"
    return {**meta, "ctok": facts}


def render_card(facts: dict, repo_id: str | None = None) -> str:
    """The whole README.md: front matter, then the card's sections."""
    head = yaml.safe_dump(front_matter(facts), sort_keys=False, allow_unicode=True)
    sections = [_title(facts), _figures(facts), _latents(facts), _training(facts), _evaluations(facts),
                _license(facts), _loading(facts, repo_id or FOLDER_PLACEHOLDER)]
    return f"---\n{head}---\n\n" + "\n\n".join(sections) + "\n"


def _title(f: dict) -> str:
    n, d = f["latent_shape"]
    if f["kind"] == "tokenizer":
        name = VARIANT_NAMES[f["variant"]]
        return (f"# {name} tokenizer, {n} tokens x {d} channels at {f['image_size']} px\n\n"
                f"A 1-D image tokenizer ({name}) saved by ctok {f['ctok_version']}: it encodes a "
                f"{f['image_size']} x {f['image_size']} image into {n} latent tokens of width {d} and decodes "
                "them back.")
    what = "flow matching, path " + f["path_type"] if f["kind"] == "sit" else "Gaussian diffusion"
    return (f"# {KIND_NAMES[f['kind']]} generator on {n} x {d} latents\n\n"
            f"A class-conditional {KIND_NAMES[f['kind']]} ({what}) saved by ctok {f['ctok_version']}: it generates "
            f"the {n} x {d} latents of a 1-D tokenizer for {f['num_classes']} classes, which the tokenizer decodes.")


def _figures(f: dict) -> str:
    rows = [("kind", KIND_NAMES[f["kind"]] + (f" ({VARIANT_NAMES[f['variant']]})" if "variant" in f else "")),
            ("parameters", f"{f['parameters']:,} ({f['parameters'] / 1e6:.1f}M)"),
            ("latent shape", f"{f['latent_shape'][0]} tokens x {f['latent_shape'][1]} channels")]
    if f["kind"] == "tokenizer":
        rows += [("image size", f"{f['image_size']} x {f['image_size']}"),
                 ("encoder / decoder", f"{f['encoder']} / {f['decoder']}"),
                 ("patch size (encoder / decoder)", "{} / {}".format(*f["patch_size"])),
                 ("quantizer", "soft VQ, {} codebooks of {} codes".format(*f["codebooks"]) if f["codebooks"]
                  else "none (continuous latents)"),
                 ("identity", f"`{f['identity']}` (what a generator trained on these latents records)")]
    else:
        null = ", plus the null class for classifier-free guidance" if f["null_class"] else ""
        rows += [("transformer", f"depth {f['depth']}, width {f['hidden_size']}, {f['num_heads']} heads"),
                 ("classes", f"{f['num_classes']}{null}")]
        if f["kind"] == "dit":
            rows += [("variance", "learned" if f["learn_sigma"] else "fixed"),
                     ("noise schedule", f["noise_schedule"] or "not recorded (sampling assumes cosine)")]
    rows += [("config.json sha256", f"`{f['config_sha256']}`"), ("weights sha256", f"`{f['weights_sha256']}`")]
    return "## Architecture\n\n| | |\n| --- | --- |\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)


def _latents(f: dict) -> str:
    stats = f["latent_stats"]
    if f["kind"] == "tokenizer":
        return ("## Latent statistics\n\nGenerators normalise these latents as (z - mean) / std. config.json "
                f"records mean {stats['mean']:.6g} and std {stats['std']:.6g} (vq_mean, vq_std), what a generator "
                "that records no statistics of its own applies.")
    tok = f["tokenizer"]
    expects = (f"tokenizer `{tok['identity']}`" + (f", loaded from `{tok['source']}` in training" if tok["source"]
                                                    else "")
               if tok else "not recorded: pair it with the tokenizer its publisher names")
    norm = (f"mean {stats['mean']:.6g}, std {stats['std']:.6g} ({stats['source'] or 'source not recorded'})"
            if stats else "not recorded: sampling applies the tokenizer's vq_mean / vq_std")
    return (f"## Tokenizer and latent statistics\n\n- decodes with: {expects}\n"
            f"- latent normalisation, (z - mean) / std: {norm}")


def _training(f: dict) -> str:
    record = f["training_config"]
    if not record:
        return "## Training\n\nThe training config was not recorded."
    return (f"## Training\n\nTrained with the resolved config `{record['source']}`, sha256 "
            f"`{record['sha256']}`.")


def _evaluations(f: dict) -> str:
    if not f["evaluation"]:
        return "## Evaluation\n\nNot evaluated."
    parts = ["## Evaluation"]
    for e in f["evaluation"]:
        rows = [f"| {METRIC_NAMES[k]} | " + (f"{v:.4f}" if isinstance(v, (int, float)) else
                                             f"n/a ({e['unavailable'].get(k, 'unavailable')})") + " |"
                for k, v in e["metrics"].items()]
        card = "\n".join(f"- {k}: {json.dumps(v) if isinstance(v, dict) else v}"
                         for k, v in e["protocol"].items() if v not in (None, "", {}))
        parts.append(f"From `{e['source']}`:\n\n| metric | value |\n| --- | --- |\n" + "\n".join(rows)
                     + f"\n\nProtocol card:\n\n{card}")
    return "\n\n".join(parts)


def _license(f: dict) -> str:
    return f"## Licence\n\n{f['license']}. ctok, which wrote this card, is licensed under Apache-2.0."


def _loading(f: dict, ref: str) -> str:
    if f["kind"] == "tokenizer":
        n, d = f["latent_shape"]
        size = f["image_size"]
        code = (f'import ctok\n\ntokenizer = ctok.load_tokenizer("{ref}")  # device="auto" for the GPU\n'
                f"z = tokenizer.encode(images)  # images (B, 3, {size}, {size}) in [-1, 1] -> z (B, {n}, {d})\n"
                "reconstructions = tokenizer.decode(z)")
        return f"## How to load\n\n```python\n{code}\n```\n\nOr `ctok inspect {ref}`."
    tok = (f["tokenizer"] or {}).get("source") or "TOKENIZER"
    code = (f'import ctok\n\npipe = ctok.load_pipeline("{tok}", "{ref}")  # device="auto" for the GPU\n'
            "images = pipe.generate([0, 1, 2, 3], seed=0)  # uint8 (4, H, W, 3), one per class id")
    return (f"## How to load\n\n```python\n{code}\n```\n\nOr from the command line: "
            f"`ctok generate --tokenizer {tok} --model {ref} --out samples --num-images 16`.")
