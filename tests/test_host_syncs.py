"""Training steps and solver steps that never make the host wait for the device.

A GPU runs ahead of Python only while nothing reads a device value back (``.item()``, ``float(t)``,
``bool(t)``, a shape that depends on values such as ``torch.unique``'s) and nothing copies a Python
number to the device (``torch.tensor(x, device=...)``). Each such call drains the queue: dozens of
them per step leave the GPU idle between them. :class:`SyncCounter` counts these calls where ctok's
own code makes them; on the CPU they cost nothing, but the same code makes them on a GPU.
"""
from __future__ import annotations

import collections
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils.data import TensorDataset

import ctok
from benchmarks.tiny_tokenizer import TINY_TOKENIZER
from conftest import write_fashion_like
from ctok.latent_cache import build_latent_cache
from ctok.models.diffusion_transformer import LatentStats, build_preset
from ctok.models.discriminators import GlobalBatchNorm
from ctok.models.quantizers import SoftVectorQuantizer
from ctok.models.tokenizer import Tokenizer
from ctok.sampling import sample_dit, sample_sit
from ctok.training.distributed import init_distributed
from ctok.training.generator import DiffusionSection, DiffusionTask, FlowMatchingTask, FlowSection, SamplesSection
from ctok.training.generator_data import EncodedImages
from ctok.training.sharding import BatchRandom, BatchSplit
from ctok.training.task import TrainedModule
from ctok.validation import check_labels, check_tensor

pytestmark = pytest.mark.usefixtures("one_thread")

SRC = str(Path(ctok.__file__).parent)
# Read a value, or a shape that depends on values, back from the tensor's device.
HOST_READS = {"item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__", "unique",
              "unique_consecutive", "nonzero", "masked_select"}
# Wrappers through which torch hands a call to the mode: the caller is the frame outside them.
TORCH_PLUMBING = tuple(str(Path(torch.__file__).parent / name)
                       for name in ("overrides.py", "_tensor.py", "functional.py", "_jit_internal.py"))


class SyncCounter(TorchFunctionMode):
    """Counts host-device synchronisations that code under ``src/ctok`` asks for, by file and line.

    Counted: the reads of :data:`HOST_READS`, indexing with a bool mask, and tensors made from Python
    numbers on a given device (``torch.tensor`` / ``as_tensor`` with ``device=``, ``new_tensor``).
    Calls made by other libraries (AdamW reads its step counters, which stay on the CPU by design)
    or while :meth:`paused` (the data loader, which works on the host) are not counted.
    """

    def __init__(self):
        super().__init__()
        self.calls: collections.Counter[str] = collections.Counter()
        self._paused = False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        uploads = (name in ("tensor", "as_tensor") and kwargs.get("device") is not None) or name == "new_tensor"
        masked = name == "__getitem__" and len(args) > 1 and getattr(args[1], "dtype", None) == torch.bool
        if (name in HOST_READS or uploads or masked) and not self._paused:
            caller = sys._getframe(1)
            while caller.f_code.co_filename.startswith(TORCH_PLUMBING):
                caller = caller.f_back
            if caller.f_code.co_filename.startswith(SRC):
                where = caller.f_code.co_filename[len(SRC) - len("ctok"):]
                self.calls[f"{name} at {where}:{caller.f_lineno}"] += 1
        return func(*args, **kwargs)

    @property
    def total(self) -> int:
        return sum(self.calls.values())

    @contextmanager
    def paused(self):
        self._paused = True
        try:
            yield
        finally:
            self._paused = False


def test_the_counter_sees_the_reads_ctok_code_makes():
    """The counter is live: ctok's label check reads min and max back, its finite check one bool;
    a read made here, outside ctok, is not counted, nor one made while paused."""
    with SyncCounter() as counter:
        check_labels("y", torch.tensor([0, 3]), 2, 4)
        check_tensor("x", torch.ones(2, 3), (2, 3))
        float(torch.ones(()))
        with counter.paused():
            check_tensor("x", torch.ones(2, 3), (2, 3))
    assert counter.total == 3, counter.calls
    assert {call.split(" at ")[0] for call in counter.calls} == {"__int__", "__bool__"}


def test_global_batch_norm_and_softvq_train_without_syncs():
    """The two training-time layers that kept statistics with Python numbers: batch norm's element
    count (a tensor built on the device from it) and SoftVQ's code-usage history (torch.unique per
    codebook and the figure as a Python float), forward and backward."""
    torch.manual_seed(0)
    norm = GlobalBatchNorm(6)
    quantizer = SoftVectorQuantizer(32, 4, num_codebooks=2, entropy_loss_ratio=0.01).train()
    x, z = torch.randn(3, 6, 5, requires_grad=True), torch.randn(3, 8, 4, requires_grad=True)
    with SyncCounter() as counter:
        out = quantizer(z)
        loss = norm(x).square().mean() + out.z_q.square().mean() + out.entropy_loss
        loss.backward()
    assert counter.total == 0, counter.calls
    assert 0 < float(out.codebook_usage) < 1  # the figure is there, read when logged


def _tiny_generator(family: str):
    torch.manual_seed(0)
    return build_preset(f"{family}-S/1", input_size=4, in_channels=4, num_classes=3, depth=1, hidden_size=32,
                        num_heads=2, class_dropout_prob=0.1).eval()


@pytest.mark.parametrize("family, sample, settings", [
    ("SiT", sample_sit, dict(solver="euler-maruyama")),
    ("SiT", sample_sit, dict(solver="heun", guidance_interval=(0.0, 0.5))),
    ("DiT", sample_dit, dict(solver="ddpm")),
    ("DiT", sample_dit, dict(solver="ddim", eta=0.5)),
], ids=lambda v: v.get("solver") if isinstance(v, dict) else None)
def test_solver_steps_do_not_wait_for_the_device(family, sample, settings):
    """Guided sampling with per-sample generators: the inputs are checked once per call (the noise's
    finite test, the labels' range), and a solver step adds no sync (4 per model evaluation before)."""
    model = _tiny_generator(family)
    noise = torch.randn(2, 4, 4)
    counts = []
    for num_steps in (2, 5):
        generators = [torch.Generator().manual_seed(i) for i in range(2)]
        with SyncCounter() as counter:
            sample(model, noise, [0, 3], num_steps=num_steps, cfg_scale=1.5, generator=generators, **settings)
        counts.append(counter)
    assert counts[1].calls == counts[0].calls, f"per step: {counts[1].calls - counts[0].calls}"
    # Once per call: the noise's finite test, the labels' range (min and max), the label list's
    # upload and, for SiT, the time grid made on the CPU by design.
    assert counts[0].total <= 5, counts[0].calls


@pytest.mark.parametrize("kind", ["sit", "dit"])
def test_generator_training_steps_do_not_wait_for_the_device(kind):
    """A SiT / DiT training step (label dropout, time and noise draws, the loss, its backward) reads
    nothing back: the labels were checked when the data was opened, so the model skips its own
    label-range and finite-time reads (2-3 per step before)."""
    model = _tiny_generator("SiT" if kind == "sit" else "DiT").train()
    x0, labels = torch.randn(4, 4, 4), torch.tensor([0, 1, 2, 0])
    common = dict(net=TrainedModule(model, model, model), latents=lambda batch, rng: (x0, labels), tokenizer=None,
                  stats=LatentStats(0.0, 1.0, "test"), samples=SamplesSection())
    task = FlowMatchingTask(**common, flow=FlowSection()) if kind == "sit" else DiffusionTask(
        **common, diffusion=DiffusionSection())
    def step(i):
        task.training_step(None, i, BatchRandom(0, i, BatchSplit(4, 1, 1, 0), 0, torch.device("cpu"))).model.backward()

    step(0)  # DiT copies its schedule's tables to the device once
    with SyncCounter() as counter:
        step(1)
        step(2)
    assert counter.total == 0, counter.calls


@pytest.mark.slow
def test_tokenizer_training_steps_do_not_wait_for_the_device(tmp_path, monkeypatch):
    """Runner steps of a SoftVQ tokenizer with the GAN on from the start (the DINO discriminator, whose
    heads use GlobalBatchNorm) and two micro-batches per step: no step makes a counted call. Before,
    each made 46 here (40 batch-norm counts, 2 entropy-loss row counts, 4 torch.unique: per codebook
    and micro-batch). The logged figures are read back by the runner, outside the steps."""
    from ctok.training import runner
    from ctok.training.config import load_config
    from ctok.training.tokenizer import train_tokenizer
    from ctok.training.tokenizer_config import TokenizerTrainConfig

    data = write_fashion_like(tmp_path / "data", {"train": 16, "test": 4})
    cfg = load_config(TokenizerTrainConfig, "tiny-softvq", [
        f"data.images={data}", f"run.out_dir={tmp_path / 'run'}", "run.max_steps=3", "run.log_every=2",
        "run.ckpt_every=100", "data.batch_size=4", "run.grad_accum=2", "gan.start_step=0",
        "loss.perceptual_weight=0", "samples.num_images=2", "model.encoder_size=[32,1,2]",
        "model.decoder_size=[32,1,2]", "gan.dino_key_blocks=[0]"])
    step_calls = []
    train_step = runner.Runner._train_step

    def counted_step(self, task, batches, step):
        counter = SyncCounter()

        def host_batches():  # the data loader reads and indexes on the host
            while True:
                with counter.paused():
                    batch = next(batches)
                yield batch

        with counter:
            metrics = train_step(self, task, host_batches(), step)
        step_calls.append(counter.calls)
        return metrics

    monkeypatch.setattr(runner.Runner, "_train_step", counted_step)
    train_tokenizer(cfg)
    assert step_calls == [{}] * 3
    log = [line for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert len(log) == 2 and all('"loss/discriminator"' in line and '"codebook_usage"' in line for line in log)


def _tiny_tokenizer() -> Tokenizer:
    torch.manual_seed(0)
    return Tokenizer.from_config(TINY_TOKENIZER).eval()


def test_on_the_fly_latents_check_the_range_of_the_first_batch_only():
    """Generator training on images (data.images) encodes every step: after the first batch, whose
    value range is read back and checked, a step reads nothing back (one wait per step before)."""
    encoded = EncodedImages(_tiny_tokenizer(), LatentStats(0.0, 1.0, "test"), flip=True, precision="bf16")
    images, labels = torch.rand(4, 3, 32, 32) * 2 - 1, torch.tensor([0, 1, 2, 0])

    def rng(step):
        return BatchRandom(0, step, BatchSplit(4, 1, 1, 0), 0, torch.device("cpu"))

    with SyncCounter() as first:
        encoded((images, labels), rng(0))
    with SyncCounter() as later:
        encoded((images, labels), rng(1))
        encoded((images, labels), rng(2))
    assert first.total == 1 and later.total == 0, (first.calls, later.calls)
    fresh = EncodedImages(_tiny_tokenizer(), LatentStats(0.0, 1.0, "test"), flip=False, precision="fp32")
    with pytest.raises(ValueError, match=r"images must lie in \[-1, 1\], got values in \[0.*, 255\]"):
        fresh(((images + 1) * 127.5, labels), rng(0))  # [0, 255] pixels: the first batch is still checked


@pytest.mark.parametrize("flip", [False, True])
def test_a_latent_cache_waits_per_shard_not_per_batch(flip, tmp_path):
    """Encoding 16 images in one shard reads back as often in 8 batches of 2 as in 2 batches of 8:
    only the build's first batch has its range checked, and the shard is written once."""
    tokenizer = _tiny_tokenizer()
    images = TensorDataset(torch.rand(16, 3, 32, 32) * 2 - 1, torch.arange(16) % 3)
    counts = {}
    for batch_size in (2, 8):
        with SyncCounter() as counter:
            build_latent_cache(tokenizer, images, tmp_path / f"b{batch_size}", tokenizer_source="tiny",
                               ctx=init_distributed("cpu"), batch_size=batch_size, shard_size=16, num_workers=0,
                               flip=flip)
        counts[batch_size] = counter.calls
    assert counts[2] == counts[8]
    with pytest.raises(ValueError, match=r"images must lie in \[-1, 1\]"):
        build_latent_cache(tokenizer, TensorDataset(torch.rand(4, 3, 32, 32) * 255, torch.zeros(4)),
                           tmp_path / "pixels", tokenizer_source="tiny", ctx=init_distributed("cpu"), num_workers=0)
