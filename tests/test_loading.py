"""Loading and saving checkpoints: errors that say what is wrong, training-only weights ignored."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import ctok
from ctok.hub import load_any


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


def test_unknown_config_keys_are_tolerated_and_kept(conformance_dir, tmp_path):
    folder = _copy_case(conformance_dir / "maetok_small", tmp_path / "ck",
                        edit_config=lambda c: c.update(some_future_field=[1, 2]))
    tok = ctok.load_tokenizer(folder)
    assert tok.to_config()["some_future_field"] == [1, 2]


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


def test_missing_folder_and_missing_weights(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint folder"):
        ctok.load_sit(tmp_path / "nope" / "deeper")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="has no model.safetensors"):
        ctok.load_sit(tmp_path)


def test_wrong_kind_of_config_is_named(conformance_dir):
    with pytest.raises(ValueError, match="unknown sit config keys.*encoder_model"):
        ctok.load_sit(conformance_dir / "softvq_small")


def test_inspect_command(conformance_dir, capsys):
    from ctok.cli import main

    assert main(["inspect", str(conformance_dir / "maetok_small"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["kind"] == "maetok" and info["num_tokens"] == 16 and info["latent_dim"] == 8
    assert info["image_size"] == 64 and info["parameters"] > 0
    assert main(["inspect", str(conformance_dir / "nowhere")]) == 2
    assert "no checkpoint folder" in capsys.readouterr().err
