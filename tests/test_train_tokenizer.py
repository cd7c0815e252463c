"""Tokenizer training: configs, the mask, the discriminator objective, and whole runs on the CPU.

The slow tests train the packaged tiny configs on the real Fashion-MNIST files (CI installs them):
convergence, two processes against one, and a run killed with SIGKILL and resumed.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from scipy.stats import kstest, norm, truncnorm

from conftest import assert_identical
from ctok.cli import main
from ctok.losses import hinge_discriminator_loss
from ctok.model_card import read_card
from ctok.models.tokenizer import Tokenizer
from ctok.training.checkpoint import list_checkpoints, load_checkpoint
from ctok.training.config import load_config, packaged_config_names
from ctok.training.masking import MaskSchedule, random_patch_mask
from ctok.training.sharding import BatchRandom, BatchSplit
from ctok.training.tokenizer import DiscriminatorObjective, TokenizerTrainingModel
from ctok.training.tokenizer_config import TokenizerTrainConfig, tokenizer_config
from ctok.training.tokenizer_setup import build_mask_schedule, init_linear_xavier, skips_parameters

RECIPES = [n for n in packaged_config_names() if n.startswith(("softvq-", "maetok-"))]


def test_every_recipe_is_packaged_and_valid():
    expected = {f"softvq-{s}-{n}" for s in ("b", "bl", "l") for n in (32, 64)} | {
        "maetok-b-128", "maetok-b-128-512", "softvq-bl-64-512", "softvq-l-32-512",
        "maetok-b-128-decoder", "maetok-b-128-512-decoder"}
    assert expected <= set(RECIPES)
    for name in RECIPES + ["tiny-maetok", "tiny-softvq"]:
        cfg = load_config(TokenizerTrainConfig, name)
        tokenizer_config(cfg.model)


def test_recipes_encode_the_published_numbers():
    mae = load_config(TokenizerTrainConfig, "maetok-b-128")
    assert (mae.data.batch_size, mae.run.max_steps, mae.optim.lr, mae.optim.scale_lr) == (512, 500000, 1e-4, True)
    assert (mae.optim.betas, mae.optim.weight_decay, mae.optim.warmup_steps, mae.optim.grad_clip) == \
        ((0.9, 0.95), 1e-4, 10000, 1.0)
    assert (mae.gan.weight, mae.gan.adaptive_weight, mae.gan.start_step, mae.gan.lecam_weight,
            mae.gan.consistency_weight, mae.gan.discriminator, mae.loss.perceptual_warmup) == \
        (0.4, True, 30000, 0.001, 4.0, "dino", 10000)
    assert (mae.auxiliary.width, mae.auxiliary.depth, mae.auxiliary.num_heads) == (192, 3, 3)
    # The details of the original code (REFERENCE.md): SigLIP fed ImageNet statistics, the DINO
    # discriminator shown a random 224 crop of 256-px images half of the time.
    assert (mae.teachers.siglip_normalization, mae.gan.dino_input_size, mae.gan.dino_crop_prob) == \
        ("imagenet", 224, 0.5)
    assert Tokenizer.split_config(tokenizer_config(mae.model))[0].enc_token_drop == 0.4 and mae.ema.decay == 0.9999
    stage2 = load_config(TokenizerTrainConfig, "maetok-b-128-decoder")
    assert stage2.init.freeze_encoder and not stage2.auxiliary.enabled and stage2.init.tokenizer
    assert (stage2.masking.schedule, stage2.masking.anneal_from, stage2.masking.anneal_steps) == ("anneal", 0.6, 50000)
    soft = load_config(TokenizerTrainConfig, "softvq-l-64")
    assert (soft.data.batch_size, soft.gan.weight, soft.gan.start_step, soft.alignment.weight) == (256, 0.2, 20000, 0.1)
    assert soft.init.encoder == "vit_large_patch14_dinov2.lvd142m"
    assert Tokenizer.split_config(tokenizer_config(soft.model))[0].entropy_loss_ratio == 0.01


def test_unknown_keys_are_rejected(capsys):
    assert main(["train-tokenizer", "--config", "tiny-maetok", "model.codebok_size=4"]) == 2
    assert "unknown config key(s) ['model.codebok_size']" in capsys.readouterr().err
    assert main(["train-tokenizer", "--config", "tiny-maetok", "gan.wieght=1"]) == 2
    assert "'gan.wieght'" in capsys.readouterr().err


def test_missing_pretrained_weights_fail_at_start_naming_each_file(tmp_path, monkeypatch, capsys):
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    images = tmp_path / "images"
    images.mkdir()
    from PIL import Image

    Image.new("RGB", (300, 280), (10, 20, 30)).save(images / "a.png")
    code = main(["train-tokenizer", "--config", "maetok-b-128", f"data.images={images}",
                 f"run.out_dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err
    assert code == 2
    for name in ("vgg16-397923af.pth", "timm/vit_small_patch16_224.dino", "timm/vit_large_patch14_dinov2.lvd142m",
                 "timm/vit_so400m_patch14_siglip_224.webli", "teachers.siglip_file", "4 pretrained network(s)"):
        assert name in err
    assert not (tmp_path / "run").exists()  # nothing was started


def test_options_that_cannot_work_together_are_named(tmp_path, capsys):
    base = ["train-tokenizer", "--config", "tiny-softvq", f"run.out_dir={tmp_path}"]
    assert main(base + ["auxiliary.enabled=true"]) == 2
    assert "need a tokenizer with model.enc_token_drop > 0" in capsys.readouterr().err
    assert main(base + ["data.images=null"]) == 2
    assert "set data.images" in capsys.readouterr().err


# -- the mask ----------------------------------------------------------------------------------
def test_published_mask_ratios_stay_in_bounds_with_the_published_mean():
    schedule = MaskSchedule(0.4, 0.6)
    ratios = torch.tensor([schedule.ratio(0, (i + 0.5) / 2000) for i in range(2000)])
    assert ratios.min() >= 0.4 and ratios.max() <= 0.6
    # Mean of N(0.6, 0.25^2) truncated to [0.4, 0.6]: loc + scale (phi(a) - phi(b)) / (Phi(b) - Phi(a)).
    a, b = (0.4 - 0.6) / 0.25, 0.0
    mean = 0.6 + 0.25 * (norm.pdf(a) - norm.pdf(b)) / (norm.cdf(b) - norm.cdf(a))
    assert ratios.mean().item() == pytest.approx(mean, abs=1e-4)
    assert mean == pytest.approx(0.5052, abs=1e-4)
    # The mode is the upper bound: the upper half of the range is the likelier.
    assert (ratios > 0.5).float().mean() > 0.5


def test_drawn_mask_ratios_follow_the_published_distribution():
    """The ratios a run draws, one per step from a generator seeded by (seed, step)."""
    schedule = MaskSchedule(0.4, 0.6)
    ratios = [schedule.step_ratio(7, step) for step in range(4000)]
    assert 0.4 <= min(ratios) and max(ratios) <= 0.6
    published = truncnorm((0.4 - 0.6) / 0.25, 0.0, loc=0.6, scale=0.25)
    assert abs(sum(ratios) / len(ratios) - published.mean()) < 0.003
    assert kstest(ratios, published.cdf).statistic < 1.63 / math.sqrt(len(ratios))  # not rejected at 1%
    # A pure function of (seed, step): every process, and a resumed run, draws the same ratio.
    assert schedule.step_ratio(7, 123) == ratios[123] and schedule.step_ratio(8, 123) != ratios[123]


def test_annealed_mask_ratio():
    schedule = MaskSchedule(0.4, 0.6, schedule="anneal", start=0.6, steps=100)
    assert [schedule.ratio(s, 0.9) for s in (0, 50, 100, 150)] == pytest.approx([0.6, 0.3, 0.0, 0.0])


def test_patch_mask_masks_the_rounded_share_per_sample():
    uniform = torch.rand(5, 16)
    mask = random_patch_mask(uniform, 0.45)
    assert mask.shape == (5, 16) and mask.sum(1).tolist() == [7] * 5
    # The mask of a sample depends on its own draws only: splitting the batch changes nothing.
    assert torch.equal(torch.cat([random_patch_mask(uniform[:2], 0.45), random_patch_mask(uniform[2:], 0.45)]), mask)
    assert random_patch_mask(uniform, 0.01) is None


def test_ddp_is_told_when_a_step_can_leave_the_mask_token_out():
    """A ratio that rounds to no patch leaves the trainable mask token out of the loss: an annealed one,
    or a published lowest ratio under half a patch; a frozen encoder has nothing to leave out."""
    tokenizer = _tiny_maetok()  # 16 patches, lowest published ratio 0.4
    patches = tokenizer.num_patches

    def schedule(*overrides: str) -> MaskSchedule:
        return build_mask_schedule(load_config(TokenizerTrainConfig, "tiny-maetok", list(overrides)), tokenizer)

    assert not skips_parameters(tokenizer, schedule())
    assert skips_parameters(tokenizer, schedule("masking.schedule=anneal"))
    for low, unmasked in ((0.03, True), (0.035, False)):  # 0.48 and 0.56 of a patch
        assert MaskSchedule(low, 0.6).may_mask_nothing(patches) == unmasked
        assert (random_patch_mask(torch.rand(2, patches), low) is None) == unmasked
    assert not skips_parameters(tokenizer, None)
    tokenizer.encoder.requires_grad_(False)  # decoder fine-tuning
    assert not skips_parameters(tokenizer, schedule("masking.schedule=anneal"))


def _tiny_maetok() -> Tokenizer:
    config = load_config(TokenizerTrainConfig, "tiny-maetok", []).model
    return Tokenizer.from_config(tokenizer_config(config))


def test_a_step_without_mask_is_unmasked_also_in_train_mode():
    """Regression: once an annealed ratio reached 0 the tokenizer drew published 40-60% masks itself."""
    torch.manual_seed(0)
    tokenizer = _tiny_maetok()
    assert tokenizer.masks_tokens
    init_linear_xavier(tokenizer)  # with zero-initialised MoVQ modulations the latents would not reach the pixels
    model = TokenizerTrainingModel(tokenizer, None, None).train()
    x = torch.rand(2, 3, tokenizer.image_size, tokenizer.image_size) * 2 - 1
    with torch.no_grad():
        unmasked = model(x, None, {}).rec
        masked = model(x, torch.ones(2, tokenizer.num_patches, dtype=torch.bool), {}).rec
        assert torch.equal(unmasked, tokenizer.eval()(x))
    assert not torch.allclose(unmasked, masked)


def test_xavier_init_reaches_every_trainable_linear_layer():
    tokenizer = _tiny_maetok()
    init_linear_xavier(tokenizer)
    for name, layer in tokenizer.named_modules():
        if isinstance(layer, nn.Linear) and layer.weight.requires_grad:
            bound = math.sqrt(6 / (layer.in_features + layer.out_features))
            # xavier-uniform spans its bound; the default std-0.02 init stays far inside it
            assert layer.weight.abs().max() > 0.9 * bound, name
            assert not layer.bias.any(), name


# -- the discriminator objective ----------------------------------------------------------------
class MeanCritic(nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(2.0))

    def forward(self, x):
        return self.scale * x.mean(dim=(1, 2, 3))


def test_discriminator_objective_formula():
    real, fake = torch.rand(4, 3, 8, 8), torch.rand(4, 3, 8, 8) - 0.5
    objective = DiscriminatorObjective(MeanCritic(), loss="hinge", lecam_weight=0.5, consistency_weight=0.0,
                                       diffaugment=False)
    loss, logs = objective(real, fake, rand=None, gan_weight=0.4)
    lr, lf = 2 * real.mean((1, 2, 3)), 2 * fake.mean((1, 2, 3))
    anchor_real, anchor_fake = 0.001 * lr.mean(), 0.001 * lf.mean()
    lecam = torch.relu(lr - anchor_fake).square().mean() + torch.relu(anchor_real - lf).square().mean()
    expected = 0.4 * (hinge_discriminator_loss(lr, lf) + 0.5 * lecam)
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(logs["disc/lecam"], lecam)


def test_consistency_term_is_added_unscaled():
    real, fake = torch.rand(4, 3, 8, 8), torch.rand(4, 3, 8, 8)
    torch.manual_seed(0)
    loss, logs = DiscriminatorObjective(MeanCritic(), loss="hinge", lecam_weight=0.0, consistency_weight=4.0,
                                        diffaugment=False)(real, fake, rand=None, gan_weight=0.5)
    lr, lf = 2 * real.mean((1, 2, 3)), 2 * fake.mean((1, 2, 3))
    torch.testing.assert_close(loss, 0.5 * hinge_discriminator_loss(lr, lf) + 4.0 * logs["disc/consistency"])
    assert logs["disc/consistency"] > 0


def _dino_views(objective: DiscriminatorObjective, real, fake, split: BatchSplit, micro: int, step: int):
    """Every image the DINO backbone read in one L_D (real, fake, and the consistency term's two
    passes), and the crop-or-resize draws of each pass."""
    rng = BatchRandom(seed=7, step=step, split=split, micro_step=micro, device="cpu")
    seen, draws = [], []

    def shared_rand(*shape):
        draws.append(rng.shared_rand(*shape))
        return draws[-1]

    hook = objective.discriminator.backbone.patch_embed.register_forward_pre_hook(lambda _, a: seen.append(a[0]))
    try:
        objective(real, fake, rng.rand, 0.5, shared_rand)
    finally:
        hook.remove()
    return seen, draws


def test_discriminator_crop_windows_do_not_depend_on_the_batch_split():
    """Each pass of L_D draws its own window from the step's shared stream: two processes, or two
    accumulation steps, crop exactly as one process with the whole batch does."""
    import timm

    from ctok.models.discriminators import DinoDiscriminator

    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", img_size=64, depth=1, num_classes=0)
    objective = DiscriminatorObjective(DinoDiscriminator(vit, input_size=64, key_blocks=(0,)), loss="hinge",
                                       lecam_weight=0.0, consistency_weight=4.0, diffaugment=True)
    real, fake = torch.rand(4, 3, 96, 96) * 2 - 1, torch.rand(4, 3, 96, 96) * 2 - 1
    branches = set()
    for step in range(6):
        one, draws = _dino_views(objective, real, fake, BatchSplit(4, 1, 1, 0), 0, step)
        assert len(one) == len(draws) == 4  # real, fake, and both consistency passes: one draw each
        assert len({tuple(d.tolist()) for d in draws}) == 4
        branches |= {bool(d[0] < 0.5) for d in draws}
        for halves in ([(BatchSplit(4, 1, 2, 0), 0), (BatchSplit(4, 1, 2, 1), 0)],  # two processes
                       [(BatchSplit(4, 2, 1, 0), 0), (BatchSplit(4, 2, 1, 0), 1)]):  # two accumulation steps
            halves = [_dino_views(objective, real[2 * i:2 * i + 2], fake[2 * i:2 * i + 2], split, micro, step)
                      for i, (split, micro) in enumerate(halves)]
            for k in range(4):
                torch.testing.assert_close(torch.cat([halves[0][0][k], halves[1][0][k]]), one[k], rtol=0, atol=0)
                assert torch.equal(halves[0][1][k], draws[k]) and torch.equal(halves[1][1][k], draws[k])
    assert branches == {True, False}  # both the crop and the resize were exercised


# -- whole runs (slow) ----------------------------------------------------------------------------
FAST = ["data.batch_size=4", "samples.num_images=2", "loss.perceptual_weight=0", "gan.start_step=1",
        "run.log_every=1"]


def _train(args: list[str], *, torchrun: int = 0, env: dict | None = None, wait: bool = True):
    command = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}",
                "-m", "ctok"] if torchrun else [sys.executable, "-m", "ctok"]) + ["train-tokenizer", *args]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    if not wait:
        return subprocess.Popen(command, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    result = subprocess.run(command, env=full_env, capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def _log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.parametrize("config", ["tiny-maetok", "tiny-softvq"])
def test_tiny_config_learns_to_reconstruct(config, synthetic_fashion_mnist, tmp_path):
    """A few hundred steps with everything on (masking + auxiliary decoders, or alignment + entropy;
    LPIPS; the GAN from step 100) bring the reconstruction error well below its start."""
    from ctok.loading import load_tokenizer

    run = tmp_path / "run"
    _train(["--config", config, f"data.images={synthetic_fashion_mnist}", f"run.out_dir={run}", "run.max_steps=200",
            "run.log_every=10", "run.ckpt_every=200", "data.batch_size=8", "gan.start_step=100"])
    log = _log(run)
    first, last = log[0]["rec"], sum(r["rec"] for r in log[-3:]) / 3
    assert last < 0.5 * first, f"reconstruction MSE went from {first:.4f} to {last:.4f}"
    assert {"loss/discriminator", "disc/consistency", "disc/lecam", "gan/adaptive_weight"} <= set(log[-1])
    assert ({"aux/hog", "aux/dinov2", "aux/siglip", "mask_ratio"} if config == "tiny-maetok"
            else {"align", "entropy", "codebook_usage"}) <= set(log[-1])
    tokenizer = load_tokenizer(run / "final")
    assert (run / "samples" / "step-00000200.png").is_file() and (run / "config.yaml").is_file()
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    assert tokenizer.decode(tokenizer.encode(images)).shape == (2, 3, 32, 32)


@pytest.mark.slow
def test_image_folder_with_an_unreadable_file_and_patchgan(tmp_path):
    """ImageNet-layout folder, random ADM crops, one corrupt file: it is skipped and counted, the run goes on."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(7):
        folder = tmp_path / "images" / f"class{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (40 + i, 48, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    (tmp_path / "images" / "class1" / "broken.png").write_bytes(b"not a png at all")
    run = tmp_path / "run"
    _train(["--config", "tiny-softvq", *FAST, f"data.images={tmp_path / 'images'}", "data.crop=random",
            "gan.discriminator=patchgan", "gan.patchgan_width=8", "run.max_steps=2", "run.ckpt_every=2",
            f"run.out_dir={run}"])
    log = _log(run)
    assert sum(r["skipped_files"] for r in log) == 1
    assert "loss/discriminator" in log[-1] and (run / "final" / "model.safetensors").is_file()
    card = read_card(run / "final")["ctok"]  # the model card names the resolved config by its sha256
    assert card["training_config"]["sha256"] == hashlib.sha256((run / "config.yaml").read_bytes()).hexdigest()


_RANK_DUMP = """
import sys, torch
from ctok.training import runner as R
save = R.Runner._save_checkpoint
def dump(self, step, sampler):
    torch.save({n: m.module.state_dict() for n, m in self.members.items()},
               f"{self.run_dir}/rank{self.ctx.rank}-step{step}.pt")
    save(self, step, sampler)
R.Runner._save_checkpoint = dump
from ctok.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
@pytest.mark.parametrize("config", [["tiny-maetok"], ["tiny-softvq", "model.entropy_loss_ratio=0.5"]])
def test_two_processes_train_like_one(config, synthetic_fashion_mnist, tmp_path):
    """torchrun with 2 CPU processes: replicas stay identical, and equal a 1-process run of the same global batch.

    For SoftVQ the average code assignment of the entropy loss, and the code-usage history (a
    buffer of the checkpoint), must span both processes; the entropy weight is raised from 0.01 so
    that a per-process average would show within three steps."""
    _train_one_and_two(["--config", *config, *FAST, f"data.images={synthetic_fashion_mnist}", "run.max_steps=3",
                        "run.ckpt_every=3"], tmp_path, step=3)


def _train_one_and_two(args: list[str], tmp_path: Path, step: int) -> None:
    """Train in tmp_path/one (1 process) and tmp_path/two (torchrun, 2 processes); at ``step`` the two
    replicas hold the same modules, buffers included, and equal the single process's."""
    script = tmp_path / "dump_ranks.py"
    script.write_text(_RANK_DUMP)
    for name, procs in (("one", 1), ("two", 2)):
        command = [sys.executable] + (["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}"]
                                      if procs > 1 else []) + [str(script), "train-tokenizer", *args,
                                                                f"run.out_dir={tmp_path / name}"]
        result = subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                                timeout=1800)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    one = torch.load(tmp_path / "one" / f"rank0-step{step}.pt", weights_only=True)
    ranks = [torch.load(tmp_path / "two" / f"rank{r}-step{step}.pt", weights_only=True) for r in range(2)]
    for module in ("model", "discriminator"):
        for key, value in one[module].items():
            assert torch.equal(ranks[0][module][key], ranks[1][module][key]), f"replicas differ at {module}.{key}"
            torch.testing.assert_close(ranks[0][module][key], value, rtol=1e-4, atol=1e-5,
                                       msg=lambda m: f"{module}.{key}: {m}")


def _noise_folder(root: Path, count: int) -> Path:
    """``count`` noise images larger than 32 px, for random crops to move in (Fashion-MNIST is used whole)."""
    import numpy as np
    from PIL import Image

    root.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (40 + i % 3, 46 - i % 4, 3), dtype=np.uint8)).save(root / f"{i:02d}.png")
    return root


@pytest.mark.slow
def test_the_anneal_recipe_under_torchrun_trains_to_the_end_like_one_process(synthetic_fashion_mnist, tmp_path):
    """masking.schedule=anneal with a trainable encoder: from the third step no patch is masked, so the
    encoder's mask token takes no part in the loss, and the discriminator joins at the fourth step.

    Two processes go on to the end (DDP is told to expect the unused parameter; without that the
    step after the first unmasked one failed) and equal one process, AdamW's state included: the
    mask token gets no gradient on either side (None, not zero), so AdamW stops counting its steps."""
    _train_one_and_two(["--config", "tiny-maetok", *FAST, f"data.images={synthetic_fashion_mnist}",
                        "masking.schedule=anneal", "masking.anneal_steps=2", "gan.start_step=3", "run.max_steps=6",
                        "run.ckpt_every=3"], tmp_path, step=6)
    log = _log(tmp_path / "two")
    assert [r["mask_ratio"] for r in log if "mask_ratio" in r] == pytest.approx([0.6, 0.3, 0, 0, 0, 0])
    assert ["loss/discriminator" in r for r in log if "loss" in r] == [False] * 3 + [True] * 3
    assert (tmp_path / "two" / "final" / "model.safetensors").is_file()
    one, two = (load_checkpoint(tmp_path / run / "checkpoints" / "step-00000006.pt")["optimizers"]
                for run in ("one", "two"))
    for name in ("model", "discriminator"):
        assert one[name]["state"].keys() == two[name]["state"].keys(), name
        for index, state in one[name]["state"].items():
            assert state["step"] == two[name]["state"][index]["step"], f"{name} parameter {index}"
            for key in ("exp_avg", "exp_avg_sq"):
                torch.testing.assert_close(two[name]["state"][index][key], state[key], rtol=1e-4, atol=1e-5)
    steps = sorted(float(s["step"]) for s in one["model"]["state"].values())
    assert steps[0] == 2 and steps[1:] == [6] * (len(steps) - 1)  # the mask token, then every other parameter
    assert {float(s["step"]) for s in one["discriminator"]["state"].values()} == {3}


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["plain", "dashboard", "random-crops", "drop-path"])
def test_killed_run_resumes_exactly(variant, synthetic_fashion_mnist, tmp_path):
    """Also with the latent dashboard on: it evaluates before each checkpoint, and a killed run redoes
    the evaluations past its last checkpoint once. And with random crops read by 2 DataLoader workers
    over two epochs: the resumed workers start new generators, the crops come from each sample's seed."""
    images = synthetic_fashion_mnist if variant != "random-crops" else _noise_folder(tmp_path / "images", 16)
    extra = {"plain": [], "dashboard": ["eval.every=2", "eval.images=100"],
             "random-crops": ["data.crop=random", "data.num_workers=2"],
             # drop path draws from the global generator, which the resumed DataLoader must leave alone
             "drop-path": ["model.enc_drop_path_rate=0.3", "model.dec_drop_path_rate=0.3",
                           "data.num_workers=2"]}[variant]
    args = ["--config", "tiny-maetok", *FAST, f"data.images={images}", "run.max_steps=6",
            "run.ckpt_every=2", "run.keep_last=2", *extra]
    _train(args + [f"run.out_dir={tmp_path / 'straight'}"])

    killed = tmp_path / "killed"
    process = _train(args + [f"run.out_dir={killed}"], wait=False)
    deadline = time.time() + 1200
    while not (killed / "checkpoints" / "step-00000004.pt").exists():
        assert process.poll() is None, process.stdout.read().decode()[-3000:]
        assert time.time() < deadline
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (killed / "checkpoints" / "step-00000006.pt").exists(), "the run ended before it was killed"
    for step, path in list_checkpoints(killed / "checkpoints"):
        assert load_checkpoint(path)["step"] == step  # every checkpoint left behind is whole
    _train(args + [f"run.out_dir={killed}"])

    ours = load_checkpoint(killed / "checkpoints" / "step-00000006.pt")
    reference = load_checkpoint(tmp_path / "straight" / "checkpoints" / "step-00000006.pt")
    for part in ("modules", "ema", "optimizers"):
        assert_identical(ours[part], reference[part], part)
    log = _log(killed)
    # The lines past the last checkpoint were redone once.
    assert [r["step"] for r in log if "loss" in r] == list(range(1, 7))
    assert [r["step"] for r in log if "eval/psnr_db" in r] == ([2, 4, 6] if variant == "dashboard" else [])
    last_loss = [r["loss"] for r in log if "loss" in r][-1]
    assert math.isclose(last_loss, [r["loss"] for r in _log(tmp_path / "straight") if "loss" in r][-1], rel_tol=1e-5)
