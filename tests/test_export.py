"""ctok export: ONNX graphs that compute what PyTorch computes (through onnxruntime, at batch sizes other
than the traced one), the manifest that describes them, and the errors a user can cause."""
from __future__ import annotations

import json
import sys

import onnx
import pytest
import torch

from conftest import assert_conforms, conformance_case, conformance_model
from ctok.atomic_files import weights_sha256
from ctok.cli import main
from ctok.export import EXAMPLE_BATCH, MANIFEST_NAME, export_model, onnx_session, run_onnx
from ctok.loading import load_tokenizer
from ctok.models.diffusion_transformer import DiT, SiT
from ctok.models.tokenizer import Tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

CASES = {"softvq_small": Tokenizer, "maetok_small": Tokenizer, "sit_small": SiT, "dit_small": DiT}
# Neither is the traced batch: the graphs must take any batch.
BATCHES = (1, 5)
assert EXAMPLE_BATCH not in BATCHES


# -- exporting the conformance models (each export takes 10-60 s on a busy CPU) ------------------------

@pytest.fixture(scope="module", params=list(CASES))
def exported(request, conformance_dir, tmp_path_factory):
    """(case name, ONNX output folder, manifest) of each conformance case, exported once."""
    name = request.param
    out = tmp_path_factory.mktemp("onnx") / name
    return name, out, export_model(conformance_dir / name, out)


def _inputs(name: str, model, batch: int, seed: int) -> dict:
    """Random inputs of each graph of ``model`` for ``batch`` rows, in graph input order."""
    g = torch.Generator().manual_seed(seed)
    if isinstance(model, Tokenizer):
        s = model.image_size
        return {"encoder": (torch.rand(batch, 3, s, s, generator=g) * 2 - 1,),
                "decoder": (torch.randn(batch, model.num_tokens, model.latent_dim, generator=g),)}
    x = torch.randn(batch, model.num_tokens, model.in_channels, generator=g)
    t = torch.rand(batch, generator=g) if name.startswith("sit") else torch.randint(0, 1000, (batch,), generator=g)
    y = torch.randint(0, model.num_classes + 1, (batch,), generator=g)  # the null class included
    return {"forward": (x, t, y)}


def _pytorch(model, graph: str, inputs: tuple) -> torch.Tensor:
    """What ctok's own API gives for one graph's inputs."""
    if graph == "encoder":
        return model.encode(*inputs)
    if graph == "decoder":
        return model.decode(*inputs)
    with torch.no_grad():
        return model(*inputs)


@pytest.mark.slow
def test_each_graph_matches_pytorch_at_two_batch_sizes(exported):
    name, out, manifest = exported
    model, _ = conformance_model(name, CASES[name])
    sessions = {graph: onnx_session(out / entry["file"]) for graph, entry in manifest["graphs"].items()}
    for batch in BATCHES:
        for graph, inputs in _inputs(name, model, batch, seed=batch).items():
            got = run_onnx(sessions[graph], inputs)[0]
            assert got.shape[0] == batch
            assert_conforms(torch.from_numpy(got), _pytorch(model, graph, inputs), f"{name} {graph}, batch {batch}")


@pytest.mark.slow
def test_each_graph_reproduces_the_original_implementations_outputs(exported):
    """The conformance fixtures' stored outputs, computed by the original code, through onnxruntime."""
    name, out, manifest = exported
    _, _, io = conformance_case(name)
    stored = {"encoder": (("x",), "z"), "decoder": (("z",), "rec_from_z"), "forward": (("x", "t", "y"), None)}
    for graph, (keys, reference) in stored.items():
        if graph not in manifest["graphs"]:
            continue
        reference = reference or ("v" if name.startswith("sit") else "out")
        got = run_onnx(onnx_session(out / manifest["graphs"][graph]["file"]), tuple(io[k] for k in keys))[0]
        assert_conforms(torch.from_numpy(got), io[reference], f"{name} {graph} against the stored reference")


@pytest.mark.slow
def test_the_manifest_describes_the_written_graphs_and_their_source(exported, conformance_dir):
    name, out, manifest = exported
    assert json.loads((out / MANIFEST_NAME).read_text()) == manifest
    model, _ = conformance_model(name, CASES[name])
    expected_graphs = ["decoder", "encoder"] if isinstance(model, Tokenizer) else ["forward"]
    assert sorted(manifest["graphs"]) == expected_graphs
    assert sorted(p.name for p in out.iterdir()) == sorted([MANIFEST_NAME] + [f"{g}.onnx" for g in expected_graphs])
    assert [p.name for p in out.parent.iterdir()] == [name]  # no staging folder left beside it
    for entry in manifest["graphs"].values():
        graph = onnx.load(str(out / entry["file"]))
        assert manifest["opset"] == next(o.version for o in graph.opset_import if o.domain == "") >= 18
        session = onnx_session(out / entry["file"])
        assert [i.name for i in session.get_inputs()] == list(entry["inputs"])
        assert [o.name for o in session.get_outputs()] == list(entry["outputs"])
        for tensor in (*entry["inputs"].values(), *entry["outputs"].values()):
            assert tensor["shape"][0] == "batch" and tensor["meaning"]
        assert 0 <= entry["max_abs_diff_vs_pytorch"] < 1e-4
    assert manifest["source"]["weights_sha256"] == weights_sha256(conformance_dir / name)
    if isinstance(model, Tokenizer):
        s, n, d = model.image_size, model.num_tokens, model.latent_dim
        encoder = manifest["graphs"]["encoder"]
        assert encoder["inputs"]["images"]["shape"] == ["batch", 3, s, s]
        assert encoder["inputs"]["images"]["dtype"] == "float32"
        assert "/ 127.5 - 1" in encoder["inputs"]["images"]["meaning"]
        assert encoder["outputs"]["latents"]["shape"] == ["batch", n, d]
        assert manifest["graphs"]["decoder"]["outputs"]["images"]["shape"] == ["batch", 3, s, s]
        assert manifest["source"]["identity"] == load_tokenizer(conformance_dir / name).identity()
    else:
        inputs = manifest["graphs"]["forward"]["inputs"]
        assert inputs["x"]["shape"] == ["batch", model.num_tokens, model.in_channels]
        assert inputs["t"]["dtype"] == ("float32" if name.startswith("sit") else "int64")
        assert inputs["y"]["dtype"] == "int64"
        assert manifest["graphs"]["forward"]["outputs"]["output"]["shape"][2] == model.config.out_channels


@pytest.mark.slow
def test_the_command_exports_into_an_empty_folder_and_says_what_it_wrote(conformance_dir, tmp_path, capsys):
    out = tmp_path / "dit"
    out.mkdir()  # an empty folder is replaced
    assert main(["export", str(conformance_dir / "dit_small"), "--format", "onnx", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "forward.onnx: x ('batch', 16, 8) float32" in printed and "-> output ('batch', 16, 16)" in printed
    assert str(out / MANIFEST_NAME) in printed
    assert json.loads((out / MANIFEST_NAME).read_text())["kind"] == "dit"


# -- errors: each refused before any work, with nothing written ---------------------------------------

def test_an_unknown_format_is_named_with_the_ones_there_are(conformance_dir, tmp_path, capsys):
    with pytest.raises(ValueError, match=r"unknown export format 'tflite'; ctok exports to: onnx"):
        export_model(conformance_dir / "sit_small", tmp_path / "out", format="tflite")
    assert main(["export", str(conformance_dir / "sit_small"), "--format", "tflite", "--out", str(tmp_path / "o")]) == 2
    assert "unknown export format 'tflite'" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_an_opset_the_exporter_cannot_write_is_refused(conformance_dir, tmp_path):
    with pytest.raises(ValueError, match="opset 17 is too old: torch.onnx's exporter writes opset 18 or later"):
        export_model(conformance_dir / "sit_small", tmp_path / "out", opset=17)
    assert list(tmp_path.iterdir()) == []


def test_a_folder_that_is_not_a_checkpoint_is_named(tmp_path, capsys):
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "readme.txt").write_text("not a model")
    with pytest.raises(FileNotFoundError, match=r"notes has no config.json; found: \['readme.txt'\]"):
        export_model(folder, tmp_path / "out")
    (folder / "config.json").write_text('{"layers": 3}')
    with pytest.raises(ValueError, match=r"notes is not a ctok checkpoint folder: config.json is neither a tokenizer"):
        export_model(folder, tmp_path / "out")
    assert main(["export", str(tmp_path / "missing"), "--out", str(tmp_path / "out")]) == 2
    assert "no checkpoint folder at" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_missing_onnx_packages_name_the_pip_command(conformance_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # what an environment without it gives import
    with pytest.raises(ValueError, match=r"\(missing: onnxscript\): pip install 'ctok\[onnx\]'"):
        export_model(conformance_dir / "sit_small", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_an_output_folder_with_files_is_refused_and_left_alone(conformance_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="already exists and is not an empty folder"):
        export_model(conformance_dir / "sit_small", out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_a_failed_export_leaves_no_folder_and_no_staging(conformance_dir, tmp_path, monkeypatch):
    import ctok.export

    def half_then_fail(folder, model, opset):
        (folder / "encoder.onnx").write_bytes(b"partial")
        raise RuntimeError("the exporter failed here")

    monkeypatch.setattr(ctok.export, "_export_into", half_then_fail)
    with pytest.raises(RuntimeError, match="the exporter failed here"):
        export_model(conformance_dir / "softvq_small", tmp_path / "out")
    assert list(tmp_path.iterdir()) == []
