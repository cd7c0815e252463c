"""The demo, stage by stage: every stage is a call of the library the ctok commands run, and every stage resumes.

    1. data        Fashion-MNIST (32 x 32, 3 channels); the test split saved as the FID reference
    2. tokenizer   train_tokenizer, as ctok train-tokenizer (a small MAETok, mask modelling on, no downloaded teachers)
    3. reconstruct the test split through the tokenizer: PSNR, SSIM, reconstruction FID
    4. latents     build_latent_cache on the train split, as ctok cache-latents
    5. generator   train_generator, as ctok train-sit, on the cached latents (class-conditional, label dropout)
    6. generate    generate_to_folder, as ctok generate, class-balanced, with and without guidance
    7. evaluate    generation FID and class accuracy with the packaged Fashion-MNIST classifier
    8. report      report.html, metrics.json, PNGs

``--ablation`` adds :mod:`ctok.demo.ablation` (the same stages for a plain autoencoder, then the
comparison) as a section of the same report.

A stage whose outputs exist is skipped; the trainers and ``generate`` continue an interrupted run
from their own checkpoints, so running the demo again after an interruption picks up where it was.
"""
from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ctok.atomic_files import save_png, write_json
from ctok.locking import folder_lock
from ctok.settings_check import check_same_settings
from ctok.uint8 import DEFAULT_QUANTISATION, to_uint8_hwc


@dataclass(frozen=True)
class DemoSettings:
    tokenizer_steps: int
    tokenizer_batch: int
    generator_steps: int
    generator_batch: int
    num_images: int  # generated, class-balanced
    sampling_steps: int
    cfg_scale: float
    reference_images: int  # test images used for the FID reference and the reconstruction metrics
    train_images: int  # training images cached for the SiT
    seed: int = 0


DEFAULT = DemoSettings(tokenizer_steps=2000, tokenizer_batch=64, generator_steps=2000, generator_batch=128,
                       num_images=1000, sampling_steps=20, cfg_scale=3.0, reference_images=10000, train_images=60000)
QUICK = DemoSettings(tokenizer_steps=40, tokenizer_batch=32, generator_steps=60, generator_batch=64,
                     num_images=100, sampling_steps=8, cfg_scale=3.0, reference_images=500, train_images=2000)

TARGETS = {
    "test_psnr_db": ">= 22 dB",
    "class_accuracy": ">= 75% with guidance",
    "gfid": "clearly below random_latent_fid",
}


def say(message: str) -> None:
    tqdm.write(f"\n== {message}")


class Demo:
    """The demo's stages in folder ``out``; ``tokenizer_overrides`` (``key=value``) change the
    demo-maetok recipe (the ablation's plain autoencoder), ``title`` names that tokenizer in the log."""

    def __init__(self, out: Path, data: str | None, settings: DemoSettings, *, title: str = "a small MAETok",
                 tokenizer_overrides: tuple[str, ...] = ()):
        self.out = Path(out)
        self.settings = settings
        self.data_arg = data
        self.title = title
        self.tokenizer_overrides = tokenizer_overrides
        self.metrics_path = self.out / "metrics.json"
        self.metrics: dict = json.loads(self.metrics_path.read_text()) if self.metrics_path.exists() else {}

    # -- bookkeeping ---------------------------------------------------------------------------
    def record(self, **values) -> None:
        self.metrics.update(values)
        write_json(self.metrics_path, self.metrics)

    def record_protocol(self, metric: str, card: dict) -> None:
        """Keep the protocol card ``metric`` was computed under, in metrics.json's ``protocol`` entry."""
        self.record(protocol={**self.metrics.get("protocol", {}), metric: card})

    def check_settings(self) -> None:
        """A rerun in the same folder continues only with the settings it started with."""
        check_same_settings(self.out / "settings.json", asdict(self.settings), f"{self.out} holds a demo run")

    # -- stages --------------------------------------------------------------------------------
    def data(self) -> None:
        from ctok.data.fashion_mnist import find_fashion_mnist, load_fashion_mnist_raw
        from ctok.metrics.sample_npz import write_npz_images

        self.fmnist = find_fashion_mnist(self.data_arg)
        say(f"Stage 1/8 data: Fashion-MNIST from {self.fmnist}")
        self.reference = self.out / "data" / "test_reference.npz"
        if not self.reference.exists():
            raw, labels = load_fashion_mnist_raw("test", self.fmnist)
            n = self.settings.reference_images
            images = np.pad(raw[:n].numpy(), ((0, 0), (2, 2), (2, 2)))[..., None].repeat(3, axis=-1)
            self.reference.parent.mkdir(parents=True, exist_ok=True)
            write_npz_images(self.reference, [images], len(images))
            np.save(self.out / "data" / "test_labels.npy", labels[:n].numpy())
            tqdm.write(f"   wrote the first {n} test images (padded to 32 x 32) as the FID reference")

    def train(self, kind: str, config: str, run: str, steps: int, batch: int, *overrides: str) -> Path:
        """Train a ``kind`` ("tokenizer" or "sit") from the packaged ``config`` with ``key=value``
        ``overrides`` into runs/<run>, unless its final weights exist; returns that folder."""
        from ctok.training.config import load_config
        from ctok.training.generator import SiTTrainConfig, train_generator
        from ctok.training.tokenizer import TokenizerTrainConfig, train_tokenizer

        final = self.out / "runs" / run / "final"
        if final.joinpath("model.safetensors").exists():
            tqdm.write(f"   done before: {final}")
            return final
        overrides = (f"run.out_dir={final.parent}", f"run.max_steps={steps}", f"data.batch_size={batch}",
                     f"run.seed={self.settings.seed}", *overrides)
        if kind == "tokenizer":
            train_tokenizer(load_config(TokenizerTrainConfig, config, overrides))
        else:
            train_generator(kind, load_config(SiTTrainConfig, config, overrides))
        return final

    def tokenizer(self) -> None:
        s = self.settings
        detail = ("with " + ", ".join(self.tokenizer_overrides) if self.tokenizer_overrides
                  else "mask modelling on, its ratio annealed from 60% to 0 over the first half")
        say(f"Stage 2/8 tokenizer: training {self.title} for {s.tokenizer_steps} steps ({detail})")
        self.tokenizer_dir = self.train("tokenizer", "demo-maetok", "tokenizer", s.tokenizer_steps,
                                        s.tokenizer_batch, f"data.images={self.fmnist}",
                                        f"masking.anneal_steps={max(1, s.tokenizer_steps // 2)}",
                                        f"eval.every={max(1, s.tokenizer_steps // 8)}",
                                        *self.tokenizer_overrides)

    def reconstruct(self) -> None:
        from ctok.loading import load_tokenizer
        from ctok.metrics import psnr, ssim
        from ctok.metrics.evaluator import evaluate
        from ctok.metrics.sample_npz import NpzImages, write_npz_images

        say("Stage 3/8 reconstruct: the test images through the tokenizer (PSNR, SSIM, reconstruction FID)")
        if "test_psnr_db" in self.metrics:
            tqdm.write("   done before")
            return
        tok = load_tokenizer(self.tokenizer_dir)
        originals = NpzImages(self.reference)
        recs, psnrs, ssims = [], [], []
        for batch in tqdm(originals.batches(250), total=-(-len(originals) // 250), desc="reconstruct"):
            x = _nchw(batch)
            with torch.no_grad():
                rec = to_uint8_hwc(tok.decode(tok.encode(x.float() / 127.5 - 1)))
            recs.append(rec)
            # On the uint8 images, as the reconstructions are saved and as peers report them.
            psnrs.append(psnr(_nchw(rec), x).numpy())
            ssims.append(ssim(_nchw(rec), x).numpy())
        rec_path = self.out / "reconstruct" / "reconstructions.npz"
        rec_path.parent.mkdir(parents=True, exist_ok=True)
        write_npz_images(rec_path, recs, sum(len(r) for r in recs))
        _save_pairs(next(originals.batches(12)), recs[0][:12], self.out / "reconstructions.png")
        result = evaluate(rec_path, self.reference, self.classifier, progress=False, num_workers=0)
        rfid = result["fid"]
        self.record_protocol("rfid", {**result["protocol"], "quantisation": DEFAULT_QUANTISATION, "ssim": "standard"})
        self.record(test_psnr_db=float(np.concatenate(psnrs).mean()), test_ssim=float(np.concatenate(ssims).mean()),
                    rfid=rfid)
        tqdm.write(f"   PSNR {self.metrics['test_psnr_db']:.2f} dB, SSIM {self.metrics['test_ssim']:.3f}, "
                   f"rFID {rfid:.2f}")

    def random_latent_fid(self) -> None:
        """The FID of decoding random latents: the score of a generator that learned nothing.

        N(0, 1) in the normalised space the SiT works in, decoded by the same pipeline object as
        ``ctok generate`` decodes its samples with (so with the normalisation the SiT was trained with).
        """
        from ctok.metrics.evaluator import evaluate
        from ctok.metrics.sample_npz import write_npz_images
        from ctok.pipeline import load_pipeline

        pipe = load_pipeline(self.tokenizer_dir, self.generator_dir)
        g = torch.Generator().manual_seed(self.settings.seed)
        z = torch.randn(self.settings.num_images, pipe.tokenizer.num_tokens, pipe.tokenizer.latent_dim, generator=g)
        images = to_uint8_hwc(pipe.decode(z))
        path = self.out / "reconstruct" / "random_latents.npz"
        write_npz_images(path, [images], len(images))
        result = evaluate(path, self.reference, self.classifier, progress=False, num_workers=0)
        self.record_protocol("random_latent_fid", {**result["protocol"], "quantisation": DEFAULT_QUANTISATION,
                                                   "seed": self.settings.seed})
        self.record(random_latent_fid=result["fid"])

    def latents(self) -> None:
        from ctok.data import open_images
        from ctok.latent_cache import INDEX_NAME, build_latent_cache
        from ctok.loading import load_tokenizer

        say("Stage 4/8 latents: encoding the train split once (as ctok cache-latents)")
        self.latent_dir = self.out / "latents"
        if (self.latent_dir / INDEX_NAME).exists():  # written last, when every shard is complete
            tqdm.write("   done before: " + str(self.latent_dir))
            return
        tokenizer = load_tokenizer(self.tokenizer_dir)
        build_latent_cache(tokenizer, open_images(self.fmnist, tokenizer.image_size), self.latent_dir,
                           tokenizer_source=self.tokenizer_dir, batch_size=500, num_workers=0,
                           dataset_source=str(self.fmnist), limit=self.settings.train_images)

    def generator(self) -> None:
        s = self.settings
        say(f"Stage 5/8 generator: training a class-conditional SiT for {s.generator_steps} steps on the latents")
        self.generator_dir = self.train("sit", "demo-sit", "sit", s.generator_steps, s.generator_batch,
                                        f"data.latents={self.latent_dir}")

    def generate(self) -> None:
        from ctok.generation import generate_to_folder
        from ctok.pipeline import load_pipeline

        s = self.settings
        say(f"Stage 6/8 generate: {s.num_images} class-balanced images, {s.sampling_steps} Heun steps, "
            f"guidance {s.cfg_scale} and none")
        pipe = load_pipeline(self.tokenizer_dir, self.generator_dir, device="cpu")
        for name, scale in (("samples", s.cfg_scale), ("samples_no_guidance", 1.0)):
            generate_to_folder(pipe, self.out / name, num_images=s.num_images, batch_size=250, seed=s.seed,
                               num_steps=s.sampling_steps, solver="heun", cfg_scale=scale)

    def evaluate(self) -> None:
        from ctok.metrics.evaluator import evaluate
        from ctok.metrics.sample_npz import NpzImages

        say("Stage 7/8 evaluate: generation FID and class accuracy (packaged Fashion-MNIST classifier)")
        self.random_latent_fid()
        for name, suffix in (("samples", ""), ("samples_no_guidance", "_no_guidance")):
            npz = self.out / name / "samples.npz"
            result = evaluate(npz, self.reference, self.classifier, progress=False, num_workers=0)
            fid = result["fid"]
            # The evaluation's card, completed with how the samples were drawn (generate.json's card).
            drawn = json.loads((self.out / name / "generate.json").read_text())["protocol"]
            self.record_protocol(f"gfid{suffix}", {**result["protocol"], **{
                k: drawn[k] for k in ("sampler", "label_scheme", "quantisation", "seed")}})
            images = NpzImages(npz)
            predicted = []
            for batch in images.batches(500):
                x = _nchw(batch).float() / 127.5 - 1
                with torch.no_grad():
                    predicted.append(self.classifier(x)["logits"].argmax(-1))
            labels = torch.arange(len(images)) % 10  # generate's class-balanced default: image i has class i mod 10
            accuracy = float((torch.cat(predicted) == labels).float().mean())
            self.record(**{f"gfid{suffix}": fid, f"class_accuracy{suffix}": accuracy})
        tqdm.write(f"   FID {self.metrics['gfid']:.2f} (random latents: {self.metrics['random_latent_fid']:.2f}), "
                   f"class accuracy {self.metrics['class_accuracy']:.1%} with guidance, "
                   f"{self.metrics['class_accuracy_no_guidance']:.1%} without")

    def run_stages(self) -> None:
        """Stages 1-7 (all but the report), each skipped when its outputs exist."""
        for stage in (self.data, self.tokenizer, self.reconstruct, self.latents, self.generator, self.generate,
                      self.evaluate):
            stage()

    def report(self, extra_html: str = "") -> Path:
        """report.html with the figures; ``extra_html``: further sections (the ablation's)."""
        from ctok.demo.report import plot_losses, write_report

        say("Stage 8/8 report")
        _class_rows(self.out / "samples" / "samples.npz", self.out / "samples_by_class.png", per_class=10)
        curves = plot_losses({"tokenizer": self.out / "runs" / "tokenizer" / "log.jsonl",
                              "SiT": self.out / "runs" / "sit" / "log.jsonl"}, self.out / "loss_curves.png")
        figures = [
            ("Reconstructions", self.out / "reconstructions.png",
             "test images (odd columns) and their reconstructions"),
            ("Generated samples", self.out / "samples_by_class.png",
             f"one row per class (T-shirt ... ankle boot), guidance scale {self.settings.cfg_scale}"),
            ("Loss curves", curves, "training losses of the tokenizer and of the SiT (log scale)"),
            ("Latent dashboard", self.out / "runs" / "tokenizer" / "dashboard.png",
             "the EMA tokenizer on held-out test images during training: PSNR, rFID, GMM NLL per dimension "
             "at K components, linear-probe accuracy"),
        ]
        return write_report(self.out, {**self.metrics, "targets": TARGETS}, figures, asdict(self.settings),
                            extra_html=extra_html)


def _nchw(images: np.ndarray) -> torch.Tensor:
    """uint8 (B, H, W, 3) as saved -> uint8 tensor (B, 3, H, W)."""
    return torch.from_numpy(np.array(images)).permute(0, 3, 1, 2)  # a copy: npz batches are read-only


def _tile(images: np.ndarray, cells: list[tuple[int, int]], rows: int, cols: int) -> np.ndarray:
    """uint8 images (N, H, W, 3) on a white canvas of rows x cols cells, image k in cell ``cells[k]``.

    Each cell is followed by a 2 px white gap, so that neighbouring dark images stay apart.
    """
    _, h, w, _ = images.shape
    canvas = np.full((rows * (h + 2), cols * (w + 2), 3), 255, np.uint8)
    for image, (r, c) in zip(images, cells):
        canvas[r * (h + 2):r * (h + 2) + h, c * (w + 2):c * (w + 2) + w] = image
    return canvas


def _save_pairs(originals: np.ndarray, recs: np.ndarray, path: Path) -> None:
    """Each original followed by its reconstruction, 8 images per row, enlarged 3 times."""
    pairs = np.stack([originals, recs], axis=1).reshape(-1, *originals.shape[1:])  # o1 r1 o2 r2 ...
    cols = 8
    save_png(path, _tile(pairs, [divmod(i, cols) for i in range(len(pairs))], -(-len(pairs) // cols), cols), scale=3)


def _class_rows(npz: Path, path: Path, per_class: int) -> None:
    """A grid with one row per class from class-balanced samples (image i has class i mod 10)."""
    from ctok.metrics.sample_npz import NpzImages

    images = next(NpzImages(npz).batches(10 * per_class))
    save_png(path, _tile(images, [(i % 10, i // 10) for i in range(len(images))], 10, per_class), scale=3)


def run_demo(out: str | Path, data: str | None = None, quick: bool = False, ablation: bool = False) -> Path:
    """The demo in folder ``out``; ``ablation``: also the plain-autoencoder arm and the comparison
    (:mod:`ctok.demo.ablation`), as a section of the same report. Returns the report's path."""
    from ctok.models.fmnist_classifier import load_fmnist_classifier, packaged_record

    start = time.time()
    demo = Demo(Path(out), data, QUICK if quick else DEFAULT)
    with folder_lock(demo.out):
        demo.check_settings()
        demo.classifier = load_fmnist_classifier()
        demo.record(classifier_test_accuracy=packaged_record()["test_accuracy"])
        demo.run_stages()
        extra = ""
        if ablation:
            from ctok.demo.ablation import run_ablation

            extra = run_ablation(demo, quick)
        report = demo.report(extra)
        for name in ("tokenizer", "generator"):  # the trained models, where a user looks for them
            src = demo.tokenizer_dir if name == "tokenizer" else demo.generator_dir
            shutil.copytree(src, demo.out / name, dirs_exist_ok=True)
        demo.record(elapsed_s_this_run=round(time.time() - start, 1))
    say(f"done in {time.time() - start:.0f} s: open {report}")
    return report
