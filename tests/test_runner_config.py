"""Run configs: schema checks with errors that name the key, overrides, packaged configs, the CLI."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import pytest

from ctok.cli import main
from ctok.training.config import (
    apply_overrides,
    build_config,
    config_to_dict,
    load_config,
    packaged_config_names,
    resolve_config_path,
)
from ctok.training.generator import DiTTrainConfig, SiTTrainConfig, default_out_dir
from ctok.training.sections import OptimSection, RunSection


@dataclass
class Small:
    run: RunSection
    optim: OptimSection = field(default_factory=OptimSection)
    mode: Literal["a", "b"] = "a"


BASE = {"run": {"out_dir": "x", "max_steps": 10}}


def test_a_misspelt_key_names_itself_and_the_valid_keys():
    with pytest.raises(ValueError) as err:
        build_config(Small, {**BASE, "optim": {"lrr": 1.0}})
    message = str(err.value)
    assert "unknown config key 'optim.lrr'" in message
    assert "valid keys of 'optim'" in message and "'lr'" in message and "'grad_clip'" in message
    with pytest.raises(ValueError, match=r"unknown config key 'trainer'; valid keys: \['mode', 'optim', 'run'\]"):
        build_config(Small, {**BASE, "trainer": {}})


@pytest.mark.parametrize("tree, message", [
    ({"run": {"out_dir": "x"}}, "config key 'run.max_steps' is required"),
    ({"run": {"out_dir": "x", "max_steps": "ten"}}, "'run.max_steps' must be an integer, got 'ten'"),
    ({"run": {"out_dir": "x", "max_steps": 1.5}}, "'run.max_steps' must be an integer"),
    ({**BASE, "optim": {"betas": [0.9]}}, "'optim.betas' must have 2 entries, got 1"),
    ({**BASE, "optim": {"scale_lr": "yes"}}, "'optim.scale_lr' must be true or false"),
    ({**BASE, "optim": {"schedule": "step"}}, "'optim.schedule' must be one of \\['constant', 'cosine'\\]"),
    ({**BASE, "optim": "fast"}, "section 'optim' must be a mapping"),
])
def test_wrong_values_name_the_key(tree, message):
    with pytest.raises(ValueError, match=message):
        build_config(Small, tree)


def test_values_are_parsed_and_typed():
    cfg = build_config(Small, {**BASE, "optim": {"lr": "1e-4", "betas": [0.9, 0.95], "grad_clip": None}})
    assert cfg.optim.lr == 1e-4 and cfg.optim.betas == (0.9, 0.95) and cfg.optim.grad_clip is None
    assert cfg.optim.weight_decay == 0.0 and cfg.run.resume is True  # defaults
    config = build_config(Small, {"run": {**BASE["run"], "resume": "a/step-00000010.pt"}})
    assert config.run.resume == "a/step-00000010.pt"
    assert config_to_dict(cfg)["optim"]["betas"] == [0.9, 0.95]


def test_overrides_use_dotted_keys_and_yaml_scalars():
    tree = apply_overrides({"optim": {"lr": 1.0}}, ["optim.lr=3e-4", "run.max_steps=5", "optim.grad_clip=null",
                                                   "optim.betas=[0.9, 0.95]", "run.report_to=[tensorboard, wandb]"])
    assert tree == {"optim": {"lr": "3e-4", "grad_clip": None, "betas": [0.9, 0.95]},
                    "run": {"max_steps": 5, "report_to": ["tensorboard", "wandb"]}}
    with pytest.raises(ValueError, match="must look like key=value"):
        apply_overrides({}, ["optim.lr"])
    with pytest.raises(ValueError, match="'optim.lr' is a value, not a section"):
        apply_overrides({"optim": {"lr": 1.0}}, ["optim.lr.x=1"])


def test_packaged_configs_all_load_against_their_schema():
    names = [n for n in packaged_config_names() if n.startswith(("sit-", "dit-", "tiny-sit", "tiny-dit"))]
    assert sorted(names) == ["dit-xl", "sit-xl", "tiny-dit", "tiny-sit"]  # one recipe per family and size
    for name in names:
        schema = SiTTrainConfig if name.startswith(("sit-", "tiny-sit")) else DiTTrainConfig
        cfg = load_config(schema, name)
        assert cfg.model.preset.startswith("SiT-" if schema is SiTTrainConfig else "DiT-"), name
    sit = load_config(SiTTrainConfig, "sit-xl", ["tokenizer=MAETok/maetok-b-128"])
    # the published SiT recipe
    assert (sit.optim.lr, sit.optim.schedule, sit.data.batch_size, sit.ema.decay) == (1e-4, "constant", 256, 0.9999)
    assert (sit.flow.path_type, sit.flow.prediction, sit.flow.time_sampling) == ("linear", "v", "lognormal")
    assert sit.model.class_dropout_prob == 0.1 and sit.tokenizer == "MAETok/maetok-b-128"
    assert sit.run.out_dir is None  # derived from the tokenizer when training starts
    dit = load_config(DiTTrainConfig, "dit-xl", ["tokenizer=SoftVQVAE/softvq-l-64"])
    assert (dit.diffusion.schedule, dit.diffusion.learn_sigma, dit.model.preset) == ("cosine", True, "DiT-XL/1")


def test_generator_run_folders_are_named_like_the_released_checkpoints():
    assert default_out_dir("SiT-XL/1", "MAETok/maetok-b-128") == "runs/sit-xl_maetok-b-128"
    assert default_out_dir("DiT-XL/1", "SoftVQVAE/softvq-l-64-512") == "runs/dit-xl_softvq-l-64-512"
    assert default_out_dir("SiT-B/1", "/data/tokenizers/mine/") == "runs/sit-b_mine"


def test_config_source_is_a_path_or_a_packaged_name(tmp_path):
    own = tmp_path / "mine.yaml"
    own.write_text("run: {out_dir: o, max_steps: 3}\nmode: b\n")
    assert load_config(Small, own, ["run.max_steps=4"]).run.max_steps == 4
    assert resolve_config_path("tiny-sit").name == "tiny-sit.yaml"
    with pytest.raises(FileNotFoundError, match="packaged configs: .*'tiny-sit'"):
        resolve_config_path("tiny-sitt")


def test_cli_reports_config_errors_in_one_line(capsys):
    code = main(["train-sit", "--config", "tiny-sit", "optim.lrr=1"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("ctok train-sit: error: unknown config key 'optim.lrr'")
    assert len(err.strip().splitlines()) == 1


def test_the_old_flow_path_key_names_its_new_name(capsys):
    with pytest.raises(ValueError, match=r"config key 'flow.path' is now called 'flow.path_type': rename it"):
        load_config(SiTTrainConfig, "tiny-sit", ["flow.path=cosine"])
    assert load_config(SiTTrainConfig, "tiny-sit", ["flow.path_type=cosine"]).flow.path_type == "cosine"
    assert main(["train-sit", "--config", "tiny-sit", "flow.path=linear"]) == 2
    assert "'flow.path' is now called 'flow.path_type'" in capsys.readouterr().err
