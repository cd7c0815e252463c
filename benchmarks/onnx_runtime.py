"""What an ONNX export costs or buys at inference: onnxruntime against PyTorch on the same CPU and inputs.

Each model is saved as a checkpoint and exported with ``ctok export``'s library function
(:func:`ctok.export.export_model`); then its graphs run through onnxruntime's CPU provider and
the PyTorch model through ctok's own API (``encode``, ``decode``, the generator's forward), in rounds
side by side in one process, both with the threads torch uses. ``ort_over_pytorch`` is the median
over rounds of onnxruntime's time / PyTorch's (below 1: onnxruntime is faster).

CPU only (the onnxruntime that ``ctok[onnx]`` installs is the CPU build). Full: a random-initialised
MAETok-B-128 at 256 px and SiT-B/1 on 128 x 32 latents, batch 4. Quick: the tiny tokenizer of
:mod:`benchmarks.tiny_tokenizer` and a 2-layer SiT, batch 2.
"""
from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.measure import paired_ratio, summary, timed_side_by_side
from benchmarks.tiny_tokenizer import TINY_TOKENIZER
from ctok.export import export_model, onnx_session, run_onnx
from ctok.models.diffusion_transformer import build_preset
from ctok.models.tokenizer import Tokenizer, build_tokenizer

CPU = torch.device("cpu")


def _models(quick: bool) -> list:
    """(name, model in eval mode) of the tokenizer and the generator measured."""
    if quick:
        tokenizer = ("tiny tokenizer (2-layer 64-wide ViTs, 32 px)", Tokenizer.from_config(TINY_TOKENIZER))
        sit = ("SiT 2-layer 64-wide", build_preset("SiT-S/1", input_size=8, in_channels=4, hidden_size=64,
                                                    depth=2, num_heads=4))
    else:
        tokenizer = ("maetok-b-128 256px", build_tokenizer("maetok-b-128"))
        sit = ("SiT-B/1 128x32", build_preset("SiT-B/1", input_size=128, in_channels=32))
    # adaLN-Zero starts a SiT as the identity; random weights give every layer real work.
    with torch.no_grad():
        for p in sit[1].parameters():
            p.normal_(0.0, 0.02)
    return [(name, model.eval()) for name, model in (tokenizer, sit)]


def _calls(model, batch: int) -> dict:
    """graph name -> (inputs, the PyTorch call on them) for ``model``."""
    g = torch.Generator().manual_seed(0)
    if isinstance(model, Tokenizer):
        s = model.image_size
        images = torch.rand(batch, 3, s, s, generator=g) * 2 - 1
        latents = model.encode(images)
        return {"encoder": ((images,), lambda: model.encode(images)),
                "decoder": ((latents,), lambda: model.decode(latents))}
    x = torch.randn(batch, model.num_tokens, model.in_channels, generator=g)
    t = torch.rand(batch, generator=g)
    y = torch.randint(0, model.num_classes, (batch,), generator=g)

    def forward():
        with torch.no_grad():
            return model(x, t, y)

    return {"forward": ((x, t, y), forward)}


def _measure(name: str, model, folder: Path, batch: int, repeats: int) -> dict:
    model.save_pretrained(folder / "checkpoint")
    start = time.perf_counter()
    manifest = export_model(folder / "checkpoint", folder / "onnx")
    result = {"export_s": time.perf_counter() - start, "opset": manifest["opset"]}
    for graph, (inputs, pytorch) in _calls(model, batch).items():
        session = onnx_session(folder / "onnx" / manifest["graphs"][graph]["file"], threads=torch.get_num_threads())
        diff = float((torch.from_numpy(run_onnx(session, inputs)[0]) - pytorch()).abs().max())
        t = timed_side_by_side({"pytorch": pytorch, "onnxruntime": lambda s=session, i=inputs: run_onnx(s, i)}, CPU,
                               repeats=repeats)
        result[graph] = {"pytorch_s": summary(t["pytorch"]), "onnxruntime_s": summary(t["onnxruntime"]),
                         "ort_over_pytorch": paired_ratio(t["onnxruntime"], t["pytorch"]), "max_abs_diff": diff}
    return {"model": name, **result}


def onnx_runtime(quick: bool = False) -> dict:
    """onnxruntime's time over PyTorch's for a tokenizer's encoder and decoder and a SiT forward (see the module)."""
    torch.manual_seed(0)
    batch, repeats = (2, 3) if quick else (4, 5)
    result = {"device": "cpu", "threads": torch.get_num_threads(), "batch": batch}
    with tempfile.TemporaryDirectory() as tmp:
        for kind, (name, model) in zip(("tokenizer", "sit"), _models(quick)):
            result[kind] = _measure(name, model, Path(tmp) / kind, batch, repeats)
    return result


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    print(json.dumps(onnx_runtime(parser.parse_args().quick), indent=2))
