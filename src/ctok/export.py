"""Portable export: a ctok checkpoint as ONNX graphs that run without ctok or PyTorch (``ctok export``).

A tokenizer becomes two graphs, ``encoder.onnx`` (images -> latents) and ``decoder.onnx``
(latents -> images); a SiT or DiT becomes ``forward.onnx`` (x, t, y -> its output). Each has a
dynamic batch axis, named ``batch``. ``manifest.json`` says what every input and output is: name,
shape, dtype (read back from the written graphs), what its numbers mean and which normalisation
the user must apply, the opset, and which checkpoint it came from (the weights' sha256; a
tokenizer's :meth:`~ctok.models.tokenizer.Tokenizer.identity`). It also records how far
onnxruntime's output was from PyTorch's on one batch of another size than the one traced.

The graphs are torch.onnx.export's (the dynamo exporter, torch's default), traced from the same
modules that ``Tokenizer.encode`` / ``decode`` and ``SiT`` / ``DiT.forward`` run, minus their input
checks, which depend on the values and so cannot be part of a graph. The output folder appears
whole or not at all (:func:`ctok.atomic_files.atomic_folder`).

onnx, onnxscript (which the exporter needs) and onnxruntime are optional: ``pip install 'ctok[onnx]'``.
"""
from __future__ import annotations

import contextlib
import importlib
import io
import os
import warnings
from pathlib import Path

import torch
import torch.nn as nn

from ctok import __version__
from ctok.atomic_files import atomic_folder, weights_sha256, write_json
from ctok.hub import checkpoint_files
from ctok.loading import load_any
from ctok.models.tokenizer import Tokenizer

FORMATS = ("onnx",)
MANIFEST_NAME = "manifest.json"
ONNX_PACKAGES = ("onnx", "onnxscript", "onnxruntime")
EXAMPLE_BATCH = 2  # the batch traced; a batch of 1 would let the exporter fix the axis at 1
CHECK_BATCH = 3  # the batch onnxruntime is checked on: another size, so the axis is shown to be dynamic
# The exporter writes opset 18 and later; below, onnx's version converter rewrites the graph, and
# onnxruntime refused the result (opset 17: a Split with an attribute that opset lacks).
MIN_OPSET = 18


class _Encoder(nn.Module):
    """images -> latents: what ``Tokenizer.encode`` computes, without its value checks."""

    def __init__(self, tokenizer: Tokenizer):
        super().__init__()
        self.tokenizer = tokenizer

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.tokenizer._encode(images, mask=None)[0]


class _Decoder(nn.Module):
    """latents -> images: what ``Tokenizer.decode`` computes, without its value checks."""

    def __init__(self, tokenizer: Tokenizer):
        super().__init__()
        self.tokenizer = tokenizer

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self.tokenizer.decoder(self.tokenizer.post_quant_conv(latents), latents)


class _Generator(nn.Module):
    """(x, t, y) -> output: a SiT's or DiT's ``backbone``, what its ``forward`` runs after the input checks."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.model.backbone(x, t, y)


def require_onnx() -> None:
    """Raise ValueError, naming the pip command, unless the packages the export needs are importable."""
    missing = []
    for name in ONNX_PACKAGES:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise ValueError(f"ONNX export needs {', '.join(ONNX_PACKAGES)} (missing: {', '.join(missing)}): "
                         "pip install 'ctok[onnx]'")


def export_model(src: str | os.PathLike, out: str | os.PathLike, *, format: str = "onnx",
                 opset: int | None = None) -> dict:
    """Export the checkpoint ``src`` (folder or hub id) to the new folder ``out``; returns the manifest.

    ``opset``: the ONNX opset to write, at least :data:`MIN_OPSET` (default: the exporter's own, 20 in torch
    2.14). ``out`` must not exist or be
    empty; it appears complete or not at all.
    """
    if format not in FORMATS:
        raise ValueError(f"unknown export format {format!r}; ctok exports to: {', '.join(FORMATS)}")
    if opset is not None and opset < MIN_OPSET:
        raise ValueError(f"opset {opset} is too old: torch.onnx's exporter writes opset {MIN_OPSET} or later")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out} already exists and is not an empty folder; export into a new folder")
    require_onnx()
    if Path(src).expanduser().is_dir():
        checkpoint_files(src)  # a local folder is checked, and a wrong one named, as ctok push does
    model, report = load_any(src, "cpu")
    with atomic_folder(out) as staging:
        manifest = _export_into(staging, model, opset)
        manifest["source"] = _source(model, report)
        write_json(staging / MANIFEST_NAME, manifest)
    return manifest


def _graphs(model: nn.Module) -> dict:
    """name -> (module, example inputs, input names, output names, what each tensor means) for ``model``."""
    g = torch.Generator().manual_seed(0)
    return _tokenizer_graphs(model, g) if isinstance(model, Tokenizer) else _generator_graphs(model, g)


def _tokenizer_graphs(tokenizer: Tokenizer, g: torch.Generator) -> dict:
    s, c = tokenizer.image_size, tokenizer.config
    images = torch.rand(EXAMPLE_BATCH, 3, s, s, generator=g) * 2 - 1
    pixels = f"RGB, {s} x {s} (centre-cropped), in [-1, 1]: uint8 pixels / 127.5 - 1"
    latents = (f"the tokenizer's latents, unnormalised; a SiT / DiT works on (z - {c.vq_mean}) / {c.vq_std} "
               "(vq_mean, vq_std of its config)")
    decoded = ("images in [-1, 1] (may overshoot a little); uint8 = clip(127.5 x + 128, 0, 255), truncated "
               "(ctok's round-half-up)")
    return {"encoder": (_Encoder(tokenizer), (images,), ["images"], ["latents"],
                        {"images": pixels, "latents": latents}),
            "decoder": (_Decoder(tokenizer), (tokenizer.encode(images),), ["latents"], ["images"],
                        {"latents": latents, "images": decoded})}


def _generator_graphs(model: nn.Module, g: torch.Generator) -> dict:
    b = EXAMPLE_BATCH
    x = torch.randn(b, model.num_tokens, model.in_channels, generator=g)
    y = torch.randint(0, model.num_classes, (b,), generator=g)
    if model.kind == "sit":
        t = torch.rand(b, generator=g)
        meanings = {"t": "time, float in [0, 1]; 1 is noise, 0 data", "output": "the velocity dx/dt"}
    else:
        t = torch.randint(0, 1000, (b,), generator=g)
        variance = ", then the learned-variance channels" if model.config.learn_sigma else ""
        meanings = {"t": "integer diffusion step in [0, 1000)", "output": "the predicted noise" + variance}
    stats = model.config.latent_stats
    meanings["x"] = "latents normalised as the generator was trained: " + (
        f"(z - {stats.mean}) / {stats.std}" if stats is not None else "(z - vq_mean) / vq_std of its tokenizer")
    null = f"; {model.num_classes} is the null class (classifier-free guidance)" if model.has_null_class else ""
    meanings["y"] = f"class label in [0, {model.num_classes}){null}"
    return {"forward": (_Generator(model), (x, t, y), ["x", "t", "y"], ["output"], meanings)}


def _export_into(folder: Path, model: nn.Module, opset: int | None) -> dict:
    """Write every graph of ``model`` into ``folder``; the manifest without its source."""
    manifest = {"format": "onnx", "exporter": f"torch.onnx.export (dynamo), torch {torch.__version__}",
                "ctok_version": __version__, "kind": model.kind, "graphs": {}}
    for name, (module, inputs, input_names, output_names, meanings) in _graphs(model).items():
        path = folder / f"{name}.onnx"
        _export_graph(module.eval(), inputs, input_names, output_names, path, opset)
        entry, graph_opset = _describe_graph(path, meanings)
        entry["max_abs_diff_vs_pytorch"] = _check(path, module, inputs)
        manifest["graphs"][name] = entry
        manifest["opset"] = graph_opset
    return manifest


def _export_graph(module: nn.Module, inputs: tuple, input_names: list, output_names: list, path: Path,
                 opset: int | None) -> None:
    """torch.onnx.export of ``module`` at ``inputs``, every input's first axis dynamic ("batch"), to ``path``."""
    batch = torch.export.Dim("batch", min=1)
    # The exporter prints its progress (the command prints its own summary), and warns that the
    # inputs' axes, one Dim shared by all, get one name: which is the point.
    with torch.no_grad(), contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*shares the same shape constraints with another axis")
        program = torch.onnx.export(module, inputs, dynamo=True, input_names=input_names, output_names=output_names,
                                    dynamic_shapes=tuple({0: batch} for _ in inputs), opset_version=opset)
        program.save(str(path))  # weights over 2 GB go to a .data file beside it


def _describe_graph(path: Path, meanings: dict) -> tuple[dict, int]:
    """``({"file", "inputs", "outputs"}, opset)`` of a written graph: each tensor's shape, dtype and meaning."""
    import onnx
    from onnx.helper import tensor_dtype_to_np_dtype

    graph_model = onnx.load(str(path), load_external_data=False)

    def tensors(values) -> dict:
        found = {}
        for value in values:
            kind = value.type.tensor_type
            shape = [d.dim_param or d.dim_value for d in kind.shape.dim]
            found[value.name] = {"shape": shape, "dtype": str(tensor_dtype_to_np_dtype(kind.elem_type)),
                                 "meaning": meanings[value.name]}
        return found

    opset = next(o.version for o in graph_model.opset_import if o.domain in ("", "ai.onnx"))
    return ({"file": path.name, "inputs": tensors(graph_model.graph.input),
             "outputs": tensors(graph_model.graph.output)}, opset)


def _check(path: Path, module: nn.Module, inputs: tuple) -> float:
    """max |onnxruntime - PyTorch| of the graph at ``path`` on :data:`CHECK_BATCH` rows of ``inputs``."""
    rows = tuple(torch.cat([x] * CHECK_BATCH)[:CHECK_BATCH] for x in inputs)
    with torch.no_grad():
        expected = module(*rows)
    got = run_onnx(onnx_session(path), rows)[0]
    return float((torch.from_numpy(got) - expected).abs().max())


def onnx_session(path: str | os.PathLike, threads: int | None = None):
    """An onnxruntime session of the graph at ``path``, on the CPU, with ``threads`` threads (default: its own)."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run_onnx(session, inputs: tuple) -> list:
    """The outputs (NumPy arrays) of an :func:`onnx_session` on ``inputs`` (tensors, in the graph's input order)."""
    return session.run(None, {arg.name: x.numpy() for arg, x in zip(session.get_inputs(), inputs)})


def _source(model: nn.Module, report) -> dict:
    """Which checkpoint the graphs came from: where it was loaded from and the fingerprint of its weights."""
    source = {"src": report.source, "kind": model.kind, "weights_sha256": weights_sha256(report.folder)}
    if isinstance(model, Tokenizer):
        source.update(variant=model.variant, identity=model.identity())
    elif model.config.tokenizer is not None:
        source["tokenizer_identity"] = model.config.tokenizer.identity
    return source
