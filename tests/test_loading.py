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


def test_missing_folder_and_missing_weights(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="no checkpoint folder"):
        ctok.load_sit(tmp_path / "nope" / "deeper")
    # "{}" is a SiT-XL (675M parameters): the weights file is looked for before anything is built.
    (tmp_path / "config.json").write_text("{}")
    monkeypatch.setattr(ctok.SiT, "from_config", lambda config: pytest.fail("built before the weights were found"))
    with pytest.raises(FileNotFoundError, match="has no model.safetensors"):
        ctok.load_sit(tmp_path)


def test_wrong_kind_of_config_is_named(conformance_dir):
    with pytest.raises(ValueError, match="unknown sit config keys.*encoder_model"):
        ctok.SiT.from_config(json.loads((conformance_dir / "softvq_small" / "config.json").read_text()))
    with pytest.raises(ValueError, match="softvq_small is a tokenizer checkpoint, not a SiT; load it with "
                                         r"ctok.load_tokenizer \(or Tokenizer.from_pretrained\)"):
        ctok.load_sit(conformance_dir / "softvq_small")


# What ``ctok inspect`` must print for each conformance case, read off its config.json.
INSPECTED = {
    "softvq_small": dict(kind="softvq", image_size=64, num_tokens=8, latent_dim=8,
                         encoder="vit_small_patch14_dinov2.lvd142m", decoder="vit_small_patch14_dinov2.lvd142m",
                         vq_mean=0.0, vq_std=1.0),
    "maetok_small": dict(kind="maetok", image_size=64, num_tokens=16, latent_dim=8,
                         encoder="vit_small_patch14_dinov2.lvd142m", decoder="vit_small_patch14_dinov2_movqv2",
                         vq_mean=0.0, vq_std=1.0),
    "sit_small": dict(kind="sit", num_tokens=16, latent_dim=8, num_classes=1000, null_class=True, depth=3,
                      hidden_size=96),
    "dit_small": dict(kind="dit", num_tokens=16, latent_dim=8, num_classes=1000, null_class=True, depth=3,
                      hidden_size=96),
}
MODEL_CLASSES = {"softvq": ctok.Tokenizer, "maetok": ctok.Tokenizer, "sit": ctok.SiT, "dit": ctok.DiT}


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
        "parameters": f"{n:,} ({n / 1e6:.1f}M)", "ignored_weights": "0 (training-only)"}
    assert json.loads(run_inspect(folder, "--json")) == {**head, **expected, "parameters": n, "ignored_weights": []}


def test_inspect_lists_ignored_training_only_weights(conformance_dir, tmp_path, run_inspect):
    extra = ["aux_hog_dec.head.weight", "projection.0.weight", "repa_model.blocks.0.attn.qkv.weight"]

    def add_training_weights(state):
        state.update({name: torch.zeros(4, 6) for name in extra})

    # base_image_size only matters to RoPE, which SoftVQ does not use; the resolution is image_size.
    folder = _copy_case(conformance_dir / "softvq_small", tmp_path / "ck", edit_state=add_training_weights,
                        edit_config=lambda c: c.update(base_image_size=256))
    n = _parameter_count(conformance_dir / "softvq_small", "softvq")
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
