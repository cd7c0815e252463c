"""Model cards (README.md in every checkpoint folder) and publishing to the hub, tested offline up to the upload."""
from __future__ import annotations

import hashlib
import json
import shutil

import pytest
import torch
import yaml

from benchmarks.tiny_tokenizer import TINY_TOKENIZER
from ctok.cli import main
from ctok.loading import load_any, load_sit
from ctok.models.diffusion_transformer import DiT, LatentStats, SiT, TokenizerRecord
from ctok.models.tokenizer import Tokenizer
from ctok.protocol import ProtocolCard

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = {**TINY_TOKENIZER, "num_codebooks": 2, "vq_mean": 0.25, "vq_std": 1.5}
GENERATOR = dict(input_size=8, in_channels=4, hidden_size=64, depth=2, num_heads=2, num_classes=10)
STATS = LatentStats(0.125, 2.5, "latent cache test")


def tiny_model(kind: str):
    torch.manual_seed(0)
    if kind in ("softvq", "maetok"):
        return Tokenizer.from_config({**TINY, "variant": kind})
    return (SiT if kind == "sit" else DiT).from_config(GENERATOR)


def front(folder):
    """The parsed YAML front matter and the body of folder/README.md."""
    text = (folder / "README.md").read_text()
    assert text.startswith("---\n")
    head, body = text[4:].split("\n---\n", 1)
    return yaml.safe_load(head), body


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def run_config(tmp_path):
    path = tmp_path / "run" / "config.yaml"
    path.parent.mkdir()
    path.write_text("run:\n  max_steps: 10\n  seed: 3\noptim:\n  lr: 0.0001\n")
    return path


@pytest.mark.parametrize("kind", ["softvq", "maetok", "sit", "dit"])
def test_every_kind_gets_a_card_with_its_figures_that_does_not_change_what_loads(kind, tmp_path, run_config):
    model = tiny_model(kind)
    folder = model.save_pretrained(tmp_path / "export", training_config=run_config)
    meta, body = front(folder)
    facts = meta["ctok"]
    parameters = sum(p.numel() for p in model.parameters())
    assert (meta["license"], meta["library_name"], meta["tags"][0]) == ("apache-2.0", "ctok", "ctok")
    assert facts["kind"] == model.kind and facts["parameters"] == parameters and f"{parameters:,}" in body
    assert facts["latent_shape"] == [8, 4] and "8 tokens x 4 channels" in body
    assert facts["training_config"] == {"sha256": sha256(run_config), "source": str(run_config.resolve())}
    assert sha256(run_config) in body
    assert facts["config_sha256"] == sha256(folder / "config.json")
    assert facts["weights_sha256"] == sha256(folder / "model.safetensors")
    assert facts["evaluation"] == [] and "Not evaluated." in body
    assert facts["ctok_version"] == __import__("ctok").__version__
    if model.kind == "tokenizer":
        assert meta["pipeline_tag"] == "image-feature-extraction" and facts["variant"] == kind
        assert facts["image_size"] == 32 and facts["identity"] == model.identity()
        assert facts["latent_stats"]["mean"] == 0.25 and facts["latent_stats"]["std"] == 1.5
        assert facts["codebooks"] == ([2, 64] if kind == "softvq" else None)
        assert 'ctok.load_tokenizer("path/to/this-folder")' in body
    else:
        assert "pipeline_tag" not in meta and facts["num_classes"] == 10
        assert facts["tokenizer"] is None and facts["latent_stats"] is None and "not recorded" in body
    again, report = load_any(folder)
    assert report.unused_config_keys == []
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))


def test_a_generator_card_names_the_tokenizer_it_expects_and_its_latent_statistics(tmp_path):
    tokenizer = tiny_model("maetok")
    sit = tiny_model("sit")
    sit.config.latent_stats = STATS
    sit.config.tokenizer = TokenizerRecord(tokenizer.identity(), "owner/tiny-maetok")
    meta, body = front(sit.save_pretrained(tmp_path / "sit"))
    assert meta["ctok"]["tokenizer"] == {"identity": tokenizer.identity(), "source": "owner/tiny-maetok"}
    assert meta["ctok"]["latent_stats"] == {"mean": 0.125, "std": 2.5, "source": "latent cache test"}
    assert meta["ctok"]["path_type"] == "linear"
    assert tokenizer.identity() in body and "mean 0.125, std 2.5 (latent cache test)" in body
    assert 'ctok.load_pipeline("owner/tiny-maetok", "path/to/this-folder")' in body


def reconstruction_result(tokenizer, rfid: float = 12.5) -> dict:
    """What ``ctok reconstruct`` writes to metrics.json, reduced to what a card reads."""
    card = ProtocolCard.here("cpu", feature_network="random-test-network", num_samples=20, num_reference=20,
                             lpips="vgg", ssim="standard", quantisation="round-half-up")
    return {"rfid": rfid, "psnr": 21.25, "ssim": 0.5, "lpips": None, "unavailable": {"lpips": "no weights here"},
            "tokenizer": {"source": "x", "identity": tokenizer.identity()}, "protocol": card.to_dict()}


def test_evaluations_are_shown_with_their_protocol_card(tmp_path):
    tokenizer = tiny_model("softvq")
    result = tmp_path / "metrics.json"
    result.write_text(json.dumps(reconstruction_result(tokenizer)))
    meta, body = front(tokenizer.save_pretrained(tmp_path / "tok", evaluation=result))
    (record,) = meta["ctok"]["evaluation"]
    assert record["metrics"] == {"rfid": 12.5, "psnr": 21.25, "ssim": 0.5, "lpips": None}
    assert record["protocol"]["feature_network"] == "random-test-network" and record["source"] == str(result)
    assert "| rFID | 12.5000 |" in body and "| LPIPS | n/a (no weights here) |" in body
    assert "- feature_network: random-test-network" in body and "Not evaluated" not in body


def test_evaluations_that_cannot_be_this_models_or_lack_a_protocol_are_refused(tmp_path):
    tokenizer, other = tiny_model("softvq"), tiny_model("maetok")
    folder = other.save_pretrained(tmp_path / "a")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    with pytest.raises(ValueError, match="has no valid protocol card"):
        tokenizer.save_pretrained(folder, evaluation={"fid": 3.0})
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before  # refused before anything was written
    with pytest.raises(ValueError, match=f"made with tokenizer {other.identity()}, but this model's is"):
        tokenizer.save_pretrained(tmp_path / "b", evaluation=reconstruction_result(other))
    with pytest.raises(ValueError, match="holds none of the metrics"):
        tokenizer.save_pretrained(tmp_path / "c", evaluation={"protocol": ProtocolCard().to_dict()})


def test_the_card_is_written_again_on_every_save_and_keeps_only_what_still_holds(tmp_path, run_config):
    sit = tiny_model("sit")
    folder = sit.save_pretrained(tmp_path / "sit", training_config=run_config)
    # The same config and weights, loaded back and saved with an evaluation: the training record stays.
    result = {"fid": 40.0, "protocol": ProtocolCard.here("cpu", num_samples=16).to_dict()}
    load_sit(folder).save_pretrained(folder, evaluation=result)
    meta, body = front(folder)
    assert meta["ctok"]["training_config"]["sha256"] == sha256(run_config)
    assert [e["metrics"] for e in meta["ctok"]["evaluation"]] == [{"fid": 40.0}]
    # Other weights: neither the training config nor the evaluation describes them any more.
    (folder / "README.md").write_text("stale notes")
    with torch.no_grad():
        sit.final_layer.linear.bias.add_(1.0)
    sit.save_pretrained(folder)
    meta, body = front(folder)
    assert "stale notes" not in body
    assert meta["ctok"]["training_config"] is None and meta["ctok"]["evaluation"] == []
    assert "The training config was not recorded." in body and "Not evaluated." in body
    assert meta["ctok"]["weights_sha256"] == sha256(folder / "model.safetensors")


# -- publishing ----------------------------------------------------------------------------------
@pytest.fixture
def hub_calls(monkeypatch):
    """HfApi's network methods replaced by recorders; online, logged in."""
    from huggingface_hub import HfApi

    calls = []

    class Commit:
        commit_url = "https://huggingface.co/me/tiny/commit/abc"

    def recorder(name, result=None):
        def method(self, *args, **kwargs):
            calls.append((name, args, kwargs))
            return result
        return method

    for name, result in (("whoami", {"name": "me"}), ("create_repo", "https://huggingface.co/me/tiny"),
                         ("create_branch", None), ("upload_folder", Commit())):
        monkeypatch.setattr(HfApi, name, recorder(name, result))
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    return calls


def uploaded_files(folder, calls) -> list[str]:
    """The files of ``folder`` that the recorded upload_folder call selects, as huggingface_hub selects them."""
    from huggingface_hub.utils import filter_repo_objects

    (kwargs,) = [k for name, _, k in calls if name == "upload_folder"]
    assert kwargs["folder_path"] == folder
    names = [p.name for p in folder.iterdir()]
    return sorted(filter_repo_objects(names, allow_patterns=kwargs["allow_patterns"]))


def test_save_pretrained_pushes_the_export_and_only_it(tmp_path, hub_calls):
    folder = tmp_path / "sit"
    folder.mkdir()
    (folder / "notes.txt").write_text("not part of the export")
    tiny_model("sit").save_pretrained(folder, push_to_hub="me/tiny", private=True)
    assert [name for name, _, _ in hub_calls] == ["whoami", "create_repo", "upload_folder"]
    assert hub_calls[1][1:] == (("me/tiny",), {"private": True, "exist_ok": True})
    assert uploaded_files(folder, hub_calls) == ["README.md", "config.json", "model.safetensors"]
    assert 'load_pipeline("TOKENIZER", "me/tiny")' in front(folder)[1]


def test_ctok_push_writes_a_missing_card_and_commits_to_the_branch(conformance_dir, tmp_path, hub_calls, capsys):
    folder = shutil.copytree(conformance_dir / "sit_small", tmp_path / "released")
    assert main(["push", str(folder), "me/tiny", "--revision", "v1"]) == 0
    assert [name for name, _, _ in hub_calls] == ["whoami", "create_repo", "create_branch", "upload_folder"]
    assert hub_calls[2][2] == {"branch": "v1", "exist_ok": True} and hub_calls[3][2]["revision"] == "v1"
    assert uploaded_files(folder, hub_calls) == ["README.md", "config.json", "model.safetensors"]
    assert front(folder)[0]["ctok"]["parameters"] == sum(p.numel() for p in load_sit(folder).parameters())
    out = capsys.readouterr().out
    assert f"wrote the model card {folder / 'README.md'}" in out
    assert "uploaded README.md, config.json, model.safetensors to me/tiny (branch v1)" in out


@pytest.mark.parametrize("kind", ["maetok", "sit"])
def test_push_names_the_repo_in_a_trainers_card_and_keeps_the_rest(kind, tmp_path, hub_calls, capsys):
    """A trainer's export has a card written without a hub id: uploaded as it was, it would tell hub
    users to load "path/to/this-folder". push puts the repo id there and changes nothing else."""
    folder = tiny_model(kind).save_pretrained(tmp_path / kind)
    before = (folder / "README.md").read_text()
    assert "path/to/this-folder" in before
    (folder / "README.md").write_text(before + "\nA note by the owner.\n")
    assert main(["push", str(folder), "me/tiny"]) == 0
    after = (folder / "README.md").read_text()
    assert "path/to/this-folder" not in after and "A note by the owner." in after
    expected = before.replace('"path/to/this-folder"', '"me/tiny"')
    expected = expected.replace("inspect path/to/this-folder", "inspect me/tiny").replace(
        "--model path/to/this-folder", "--model me/tiny")
    assert after == expected + "\nA note by the owner.\n"
    snippet = 'load_tokenizer("me/tiny")' if kind == "maetok" else 'load_pipeline("TOKENIZER", "me/tiny")'
    assert snippet in after
    assert f"wrote the model card {folder / 'README.md'} (its loading snippet names me/tiny)" in capsys.readouterr().out
    assert main(["push", str(folder), "me/tiny"]) == 0  # named already: uploaded as it is
    assert "wrote the model card" not in capsys.readouterr().out


def push_error(args, capsys) -> str:
    assert main(["push", *map(str, args)]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    return line


def test_push_refuses_offline_unlogged_unreachable_and_non_exports_before_uploading(tmp_path, hub_calls,
                                                                                    monkeypatch, capsys):
    folder = tiny_model("dit").save_pretrained(tmp_path / "dit")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert push_error([folder, "me/tiny"], capsys) == (
        f"ctok push: error: not uploading {folder} to me/tiny: HF_HUB_OFFLINE is set; on a machine with network, "
        "unset it and push again")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr("huggingface_hub.get_token", lambda: None)
    assert "not logged in to the Hugging Face hub; run `hf auth login`" in push_error([folder, "me/tiny"], capsys)
    monkeypatch.setattr("huggingface_hub.get_token", lambda: "hf_test_token")

    def no_network(self, *args, **kwargs):
        raise ConnectionError("[Errno -2] Name or service not known")

    monkeypatch.setattr("huggingface_hub.HfApi.whoami", no_network)
    assert "cannot reach the Hugging Face hub (ConnectionError: [Errno -2] Name or service not known)" in push_error(
        [folder, "me/tiny"], capsys)
    (folder / "model.safetensors").unlink()
    assert f"{folder} has no model.safetensors" in push_error([folder, "me/tiny"], capsys)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text('{"lr": 0.1}')
    assert "is not a ctok checkpoint folder" in push_error([tmp_path / "run", "me/tiny"], capsys)
    assert "is not a hub repo id" in push_error([tiny_model("sit").save_pretrained(tmp_path / "s"), "a/b/c"], capsys)
    assert hub_calls == []  # nothing reached the hub's write methods
