"""Loading and saving checkpoints: errors that say what is wrong, training-only weights ignored."""
import json
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

import ctok
from ctok.loading import load_any


def _copy_case(src, dst, edit_state=None, edit_config=None):
    dst.mkdir()
    config = json.loads((src / "config.json").read_text())
    state = load_file(str(src / "model.safetensors"))
    if edit_config:
        edit_config(config)
    if edit_state:
        edit_state(state)
    (dst / "config.json").write_text(json.dumps(config))
    save_file(state, str(dst / "model.safetensors"))
    return dst


def test_training_only_weights_are_ignored(conformance_dir, tmp_path):
    def add_teacher(state):
        state["repa_model.blocks.0.attn.qkv.weight"] = torch.zeros(3, 3)
        state["projection.0.weight"] = torch.zeros(4, 8)

    folder = _copy_case(conformance_dir / "softvq_small", tmp_path / "ck", edit_state=add_teacher)
    _, report = load_any(folder)
    assert report.ignored == ["projection.0.weight", "repa_model.blocks.0.attn.qkv.weight"]


def test_missing_and_misshaped_weights_are_listed_in_one_error(conformance_dir, tmp_path):
    def damage(state):
        del state["encoder.latent_tokens"]
        del state["decoder.mask_token"]
        state["quant_conv.weight"] = torch.zeros(3, 3)

    folder = _copy_case(conformance_dir / "softvq_small", tmp_path / "ck", edit_state=damage)
    with pytest.raises(ValueError) as err:
        ctok.load_tokenizer(folder)
    msg = str(err.value)
    assert "missing 2" in msg and "decoder.mask_token" in msg and "encoder.latent_tokens" in msg
    assert "quant_conv.weight (3, 3) (config expects (8, 384))" in msg


@pytest.mark.parametrize("case", ["maetok_small", "sit_small", "dit_small"])
def test_unknown_config_keys_are_tolerated_kept_and_written_back(conformance_dir, tmp_path, case):
    """One policy for every model: a key ctok does not know is kept, saved again and reported as unused."""
    folder = _copy_case(conformance_dir / case, tmp_path / "ck",
                        edit_config=lambda c: c.update(some_future_field=[1, 2]))
    model, report = load_any(folder)
    assert model.to_config()["some_future_field"] == [1, 2] and model.extra_config["some_future_field"] == [1, 2]
    assert "some_future_field" in report.unused_config_keys
    again, report = load_any(model.save_pretrained(tmp_path / "saved"))
    assert again.to_config() == model.to_config() and "some_future_field" in report.unused_config_keys


def test_a_typo_in_a_ctok_written_config_is_visible(conformance_dir, tmp_path, run_inspect):
    sit = ctok.load_sit(conformance_dir / "sit_small")

    def misspell(key, value):
        def edit(config):
            del config[key]
            config[value] = getattr(sit.config, key)
        return edit

    # A misspelt field that changes the shapes: the load error names the suspect.
    saved = sit.save_pretrained(tmp_path / "saved")
    folder = _copy_case(saved, tmp_path / "depth", edit_config=misspell("depth", "deph"))
    with pytest.raises(ValueError, match=r"do not fit its config.json: .* \(config keys ctok does not use: "
                                         r"\['deph'\]\) \(fields config.json does not set, built with ctok's "
                                         r"defaults: \['depth'\]\)$"):
        ctok.load_sit(folder)
    # One whose value is the default: the model loads, and ctok inspect lists the key.
    folder = _copy_case(saved, tmp_path / "qk", edit_config=misspell("qk_norm", "qk_nrom"))
    assert _printed_fields(run_inspect(folder))["unused_config_keys"] == "1 (kept, unused): qk_nrom"


@pytest.mark.parametrize("edit, message", [
    (dict(vae_1d=False), "vae_1d=false: ctok only runs models on 1-D latent tokens"),
    (dict(patch_size=2), "on 1-D latents uses patch_size 1, got 2"),
    (dict(decoder_hidden_size=64), "decoder_hidden_size 64 must equal hidden_size 96"),
])
def test_transformer_flags_that_change_the_computation_are_refused(conformance_dir, edit, message):
    config = json.loads((conformance_dir / "sit_small" / "config.json").read_text())
    with pytest.raises(ValueError, match=message):
        ctok.SiT.from_config({**config, **edit})


def test_a_config_written_by_ctok_0_1_reads_its_tokenizer_kind_as_the_variant(conformance_dir, tmp_path):
    """ctok 0.1 wrote the variant under the key tokenizer_kind; the identity it computed does not move."""
    old = _copy_case(conformance_dir / "softvq_small", tmp_path / "old",
                     edit_config=lambda c: c.update(tokenizer_kind="softvq"))
    tok = ctok.load_tokenizer(old)
    assert tok.variant == "softvq" and "tokenizer_kind" not in tok.extra_config
    assert tok.identity() == "softvq-8x8-15742e560211739c"  # what ctok 0.1 printed for this checkpoint
    written = json.loads((tok.save_pretrained(tmp_path / "new") / "config.json").read_text())
    assert written["variant"] == "softvq" and "tokenizer_kind" not in written
    assert ctok.load_tokenizer(tmp_path / "new").identity() == tok.identity()
    config = json.loads((old / "config.json").read_text())
    with pytest.raises(ValueError, match="variant='maetok' and tokenizer_kind='softvq' .*keep one"):
        ctok.Tokenizer.from_config({**config, "variant": "maetok"})


def test_pytorch_bin_loads_through_weights_only(conformance_dir, tmp_path):
    folder = tmp_path / "bin"
    folder.mkdir()
    (folder / "config.json").write_text((conformance_dir / "sit_small" / "config.json").read_text())
    torch.save(load_file(str(conformance_dir / "sit_small" / "model.safetensors")), folder / "pytorch_model.bin")
    sit = ctok.load_sit(folder)
    reference = ctok.load_sit(conformance_dir / "sit_small")
    assert torch.equal(sit.blocks[0].attn.qkv.weight, reference.blocks[0].attn.qkv.weight)


def test_offline_hub_id_says_what_to_download(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(FileNotFoundError) as err:
        ctok.load_tokenizer("MAETok/maetok-b-128")
    msg = str(err.value)
    assert "huggingface-cli download MAETok/maetok-b-128" in msg and str(tmp_path) in msg


def test_missing_folder_and_missing_weights(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="no checkpoint folder"):
        ctok.load_sit(tmp_path / "nope" / "deeper")
    # "{}" is a SiT-XL (675M parameters): the weights file is looked for before anything is built.
    (tmp_path / "config.json").write_text("{}")
    monkeypatch.setattr(ctok.SiT, "from_config", lambda config: pytest.fail("built before the weights were found"))
    with pytest.raises(FileNotFoundError, match="has no model.safetensors"):
        ctok.load_sit(tmp_path)


def test_wrong_kind_of_config_is_named(conformance_dir):
    with pytest.raises(ValueError, match=r"config is a tokenizer's, not a SiT's: build it with Tokenizer.from_config"):
        ctok.SiT.from_config(json.loads((conformance_dir / "softvq_small" / "config.json").read_text()))
    with pytest.raises(ValueError, match=r"config is a DiT's, not a SiT's: build it with DiT.from_config"):
        ctok.SiT.from_config(json.loads((conformance_dir / "dit_small" / "config.json").read_text()))
    with pytest.raises(ValueError, match=r"config is a SiT's, not a tokenizer's: build it with SiT.from_config"):
        ctok.Tokenizer.from_config(json.loads((conformance_dir / "sit_small" / "config.json").read_text()))
    with pytest.raises(ValueError, match="softvq_small is a tokenizer checkpoint, not a SiT; load it with "
                                         r"ctok.load_tokenizer \(or Tokenizer.from_pretrained\)"):
        ctok.load_sit(conformance_dir / "softvq_small")


# What ``ctok inspect`` must print for each conformance case, read off its config.json.
INSPECTED = {
    "softvq_small": dict(kind="tokenizer", variant="softvq", image_size=64, num_tokens=8, latent_dim=8,
                         encoder="vit_small_patch14_dinov2.lvd142m", decoder="vit_small_patch14_dinov2.lvd142m",
                         vq_mean=0.0, vq_std=1.0),
    "maetok_small": dict(kind="tokenizer", variant="maetok", image_size=64, num_tokens=16, latent_dim=8,
                         encoder="vit_small_patch14_dinov2.lvd142m", decoder="vit_small_patch14_dinov2_movqv2",
                         vq_mean=0.0, vq_std=1.0),
    "sit_small": dict(kind="sit", num_tokens=16, latent_dim=8, num_classes=1000, null_class=True, depth=3,
                      hidden_size=96),
    "dit_small": dict(kind="dit", num_tokens=16, latent_dim=8, num_classes=1000, null_class=True, depth=3,
                      hidden_size=96),
}
MODEL_CLASSES = {"tokenizer": ctok.Tokenizer, "sit": ctok.SiT, "dit": ctok.DiT}
# The keys of the released configs that only the original training script read: kept, unused.
_RELEASED_TRAINING_KEYS = ["codebook_show_usage", "commit_loss_beta", "dec_pretrained", "decoder_ch_mult", "dropout_p",
                           "enc_pretrained", "encoder_ch_mult", "kl_loss_weight", "repa", "repa_align",
                           "repa_loss_weight", "repa_model", "repa_patch_size", "repa_proj_dim", "vq_loss_ratio",
                           "z_channels"]
UNUSED = {"softvq_small": _RELEASED_TRAINING_KEYS,
          "maetok_small": sorted(_RELEASED_TRAINING_KEYS + ["aux_clip_dec", "aux_dec_cls_token", "aux_dec_model",
                                                            "aux_dino_dec", "aux_hog_dec", "aux_loss_mask",
                                                            "aux_supcls_dec"]),
          # Hub metadata and the 1-D flags are read or written by ctok: nothing is left over.
          "sit_small": [], "dit_small": []}


def _printed_unused(keys: list[str]) -> str:
    return f"{len(keys)} (kept, unused)" + (": " + ", ".join(keys) if keys else "")


def _parameter_count(folder, kind: str) -> int:
    """Sizes of the checkpoint's tensors that are parameters of the model: buffers (SoftVQ's usage
    history, RoPE positions, SiT's position table) and training-only weights are not counted."""
    state = load_file(str(folder / "model.safetensors"))
    with torch.device("meta"):
        model = MODEL_CLASSES[kind].from_config(json.loads((folder / "config.json").read_text()))
    return sum(state[name].numel() for name, _ in model.named_parameters())


@pytest.fixture
def run_inspect(capsys):
    """``run_inspect(folder, *flags)``: the command's stdout."""
    from ctok.cli import main

    def run(folder, *flags) -> str:
        assert main(["inspect", str(folder), *flags]) == 0
        return capsys.readouterr().out

    return run


def _printed_fields(text: str) -> dict[str, str]:
    return dict(line.strip().split(": ", 1) for line in text.splitlines())


@pytest.mark.parametrize("case", INSPECTED)
def test_inspect_prints_what_the_checkpoint_is(conformance_dir, run_inspect, case):
    folder = conformance_dir / case
    expected = INSPECTED[case]
    n = _parameter_count(folder, expected["kind"])
    assert n > 100_000  # the count covers the networks, not a few tensors
    head = {"source": str(folder), "folder": str(folder)}
    assert _printed_fields(run_inspect(folder)) == {
        **head, **{k: str(v) for k, v in expected.items()},
        "parameters": f"{n:,} ({n / 1e6:.1f}M)", "ignored_weights": "0 (training-only)",
        "unused_config_keys": _printed_unused(UNUSED[case])}
    assert json.loads(run_inspect(folder, "--json")) == {**head, **expected, "parameters": n, "ignored_weights": [],
                                                         "unused_config_keys": UNUSED[case]}


def test_inspect_lists_ignored_training_only_weights(conformance_dir, tmp_path, run_inspect):
    extra = ["aux_hog_dec.head.weight", "projection.0.weight", "repa_model.blocks.0.attn.qkv.weight"]

    def add_training_weights(state):
        state.update({name: torch.zeros(4, 6) for name in extra})

    # base_image_size only matters to RoPE, which SoftVQ does not use; the resolution is image_size.
    folder = _copy_case(conformance_dir / "softvq_small", tmp_path / "ck", edit_state=add_training_weights,
                        edit_config=lambda c: c.update(base_image_size=256))
    n = _parameter_count(conformance_dir / "softvq_small", "tokenizer")
    printed = _printed_fields(run_inspect(folder))
    assert printed["ignored_weights"] == "3 (training-only): " + ", ".join(extra)
    assert printed["parameters"] == f"{n:,} ({n / 1e6:.1f}M)"  # what the model has, not what the file holds
    assert printed["image_size"] == "64"
    info = json.loads(run_inspect(folder, "--json"))
    assert info["ignored_weights"] == extra and info["parameters"] == n and info["image_size"] == 64


def test_inspect_names_a_missing_folder(conformance_dir, capsys):
    from ctok.cli import main

    assert main(["inspect", str(conformance_dir / "nowhere")]) == 2
    assert "no checkpoint folder" in capsys.readouterr().err


def test_each_kind_is_served_by_the_class_that_registered_it():
    from ctok import hub
    from ctok.models.base import PretrainedModel

    assert {kind: hub.model_class(kind) for kind in hub.KINDS} == {"tokenizer": ctok.Tokenizer, "sit": ctok.SiT,
                                                                   "dit": ctok.DiT}

    class TracedSiT(ctok.SiT):  # a user's subclass serves no kind of its own
        pass

    assert hub.model_class("sit") is ctok.SiT and TracedSiT.kind == "sit"
    with pytest.raises(ValueError, match=r"Vae.kind must be one of \('tokenizer', 'sit', 'dit'\), got 'vae'"):
        type("Vae", (PretrainedModel,), {"kind": "vae"})
    with pytest.raises(ValueError, match="kind 'sit' is already served by ctok.models.diffusion_transformer.SiT"):
        type("OtherSiT", (PretrainedModel,), {"kind": "sit"})


# -- files validated at the door ---------------------------------------------------------------
def test_a_truncated_weights_file_is_named_as_such(conformance_dir, tmp_path):
    import shutil

    folder = tmp_path / "tok"
    shutil.copytree(conformance_dir / "maetok_small", folder)
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"model\.safetensors \([\d,]+ bytes\) is not a safetensors file that can be "
                                         r"read, probably truncated"):
        ctok.load_tokenizer(folder)


@pytest.mark.parametrize("key, value, words", [
    ("image_size", "thirty-two", "config key 'image_size' must be an integer, got 'thirty-two'"),
    ("use_rope", "yes", "config key 'use_rope' must be true or false, got 'yes'"),
    ("tau", "0.07", "config key 'tau' must be a number, got '0.07'"),
])
def test_config_values_are_checked_against_their_types(conformance_dir, tmp_path, key, value, words):
    import shutil

    folder = tmp_path / "tok"
    shutil.copytree(conformance_dir / "maetok_small", folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, key: value}))
    with pytest.raises(ValueError, match=re.escape(words)):
        ctok.load_tokenizer(folder)


def test_weights_that_do_not_fit_name_the_fields_config_json_left_to_defaults(conformance_dir, tmp_path):
    import shutil

    folder = tmp_path / "tok"
    shutil.copytree(conformance_dir / "maetok_small", folder)
    config = json.loads((folder / "config.json").read_text())
    del config["codebook_embed_dim"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"do not fit .*does not set, built with ctok's defaults: "
                                         r"\['codebook_embed_dim'"):
        ctok.load_tokenizer(folder)
