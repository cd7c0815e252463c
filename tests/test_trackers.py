"""Experiment trackers (run.report_to): TensorBoard's event files and W&B's offline run hold the
numbers of log.jsonl at its steps, after a resume too; the config is checked before anything runs."""
from __future__ import annotations

import io
import json
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

from ctok.cli import main
from ctok.training.checkpoint import checkpoint_path, list_checkpoints
from ctok.training.config import build_config
from ctok.training.run_log import RunLog, read_log
from ctok.training.trackers import TensorBoardTracker, _wandb_mode
from test_runner import Crash, Regression, ToyConfig, toy_config, toy_data, train
from test_train_generator import ENV, small_cache, tokenizer, train_args  # noqa: F401 (fixtures, used by name)

TOY_RUN = {"out_dir": "unused", "max_steps": 12}


def tensorboard_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar TensorBoard shows for the run in ``folder``: {tag: [(step, value), ...]}."""
    events = EventAccumulator(str(folder))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def logged_scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """log.jsonl's records by key, rounded to float32 as TensorBoard stores a scalar."""
    scalars: dict[str, list[tuple[int, float]]] = {}
    for record in read_log(run_dir / "log.jsonl"):
        for key, value in record.items():
            if key != "step":
                scalars.setdefault(key, []).append((record["step"], float(np.float32(value))))
    return scalars


def tensorboard_hparams(folder: Path) -> dict:
    events = EventAccumulator(str(folder))
    events.Reload()
    content = events.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    hparams = HParamsPluginData.FromString(content).session_start_info.hparams
    return {key: getattr(value, value.WhichOneof("kind")) for key, value in hparams.items()}


def wait_for_the_next_second() -> None:
    """W&B's offline folders are named by the second they were opened in: a run that this process
    resumes within the same second could sort before the run it continues."""
    start = int(time.time())
    while int(time.time()) == start:
        time.sleep(0.01)


# -- the config -----------------------------------------------------------------------------
@pytest.mark.parametrize("run, message", [
    ({"tensorboard": True}, r"config key 'run.tensorboard' is now run.report_to: \[tensorboard\]"),
    ({"wandb": "my-project"}, r"config key 'run.wandb' is now run.report_to: \[wandb\] with run.wandb_project: NAME"),
    ({"report_to": ["mlflow"]}, r"'run.report_to\[0\]' must be one of \['tensorboard', 'wandb'\], got 'mlflow'"),
    ({"report_to": "tensorboard"}, r"'run.report_to' must be a list, got 'tensorboard'"),
    ({"report_to": ["wandb", "wandb"]}, r"run.report_to names a tracker twice: \['wandb', 'wandb'\]"),
    ({"wandb_mode": "cloud"}, r"'run.wandb_mode' must be one of \['auto', 'online', 'offline'\]"),
])
def test_bad_tracker_settings_and_the_replaced_keys_are_named(run, message):
    with pytest.raises(ValueError, match=message):
        build_config(ToyConfig, {"run": {**TOY_RUN, **run}})


def test_tracker_defaults_are_none_and_a_list_parses():
    assert build_config(ToyConfig, {"run": TOY_RUN}).run.report_to == []
    run = build_config(ToyConfig, {"run": {**TOY_RUN, "report_to": ["tensorboard", "wandb"]}}).run
    assert (run.report_to, run.wandb_project, run.wandb_entity, run.wandb_mode) == (
        ["tensorboard", "wandb"], "ctok", None, "auto")


@pytest.mark.parametrize("package", ["tensorboard", "wandb"])
def test_a_missing_package_is_named_with_its_pip_command_before_anything_runs(package, monkeypatch, tmp_path,
                                                                               capsys):
    monkeypatch.setitem(sys.modules, package, None)  # what an environment without the package shows
    out = tmp_path / "run"
    assert main(["train-sit", "--config", "tiny-sit", f"run.out_dir={out}", f"run.report_to=[{package}]"]) == 2
    err = capsys.readouterr().err
    assert f"run.report_to has {package} but the {package} package is not installed: pip install 'ctok[track]'" in err
    assert not out.exists()


def test_the_old_keys_fail_at_the_command_line_too(capsys):
    assert main(["train-sit", "--config", "tiny-sit", "run.tensorboard=true"]) == 2
    assert "config key 'run.tensorboard' is now run.report_to: [tensorboard]" in capsys.readouterr().err


# -- TensorBoard ----------------------------------------------------------------------------
def test_tensorboard_holds_every_logged_scalar_at_its_step_and_the_config(tmp_path):
    train(toy_config(tmp_path, report_to=["tensorboard"]), toy_data())
    logged = logged_scalars(tmp_path)
    assert set(logged) == {"loss", "lr", "grad_norm", "samples_per_s"} and len(logged["loss"]) == 4
    assert tensorboard_scalars(tmp_path / "tensorboard") == logged
    hparams = tensorboard_hparams(tmp_path / "tensorboard")
    assert hparams["optim.lr"] == 0.5 and hparams["optim.schedule"] == "cosine" and hparams["run.max_steps"] == 12
    assert hparams["optim.betas"] == "[0.9, 0.999]" and "run.compile" in hparams


def test_a_resumed_run_leaves_no_ghost_steps_in_tensorboard(tmp_path):
    """The crashed run logged step 6 past its step-4 checkpoint; the resumed run logs step 6 again
    (a different mean: steps 5-6 only). TensorBoard shows the resumed value once, like log.jsonl."""
    data = toy_data()
    with pytest.raises(Crash):
        train(toy_config(tmp_path, report_to=["tensorboard"]), data, crash_at=6)
    crashed = logged_scalars(tmp_path)
    assert [step for step, _ in crashed["loss"]] == [3, 6]
    train(toy_config(tmp_path, report_to=["tensorboard"]), data)
    logged = logged_scalars(tmp_path)
    assert [step for step, _ in logged["loss"]] == [3, 6, 9, 12]
    assert logged["loss"][1] != crashed["loss"][1]
    assert len(list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))) == 2
    assert tensorboard_scalars(tmp_path / "tensorboard") == logged


def test_a_run_resumed_in_the_same_second_by_another_process_sorts_after_the_run_it_continues(tmp_path):
    """The killed run's event file is named by this very second and a process id that sorts after ours
    (as a restart loop's new process may): the resumed run's file must still be read last."""
    folder = tmp_path / "tensorboard"
    killed = TensorBoardTracker(folder, 0, None)
    killed.scalars(1, {"loss": 1.0})
    killed.scalars(2, {"loss": 2.0})
    killed.scalars(3, {"loss": 3.0})  # past the step-2 checkpoint: the resumed run logs it again
    killed.close()
    (written,) = folder.glob("events.out.tfevents.*")
    _, _, _, _, host, _, uid = written.name.split(".", 6)
    written.rename(folder / f"events.out.tfevents.{int(time.time()):010d}.{host}.99999999.{uid}")
    resumed = TensorBoardTracker(folder, 2, None)
    resumed.scalars(3, {"loss": 30.0})
    resumed.close()
    assert tensorboard_scalars(folder) == {"loss": [(1, 1.0), (2, 2.0), (3, 30.0)]}


def test_a_run_killed_before_its_first_checkpoint_starts_over_in_the_log_and_in_tensorboard(tmp_path):
    data = toy_data()
    with pytest.raises(Crash):  # logged step 3, died before the step-4 checkpoint
        train(toy_config(tmp_path, report_to=["tensorboard"]), data, crash_at=3)
    assert [step for step, _ in logged_scalars(tmp_path)["loss"]] == [3]
    train(toy_config(tmp_path, report_to=["tensorboard"]), data)
    logged = logged_scalars(tmp_path)
    assert [step for step, _ in logged["loss"]] == [3, 6, 9, 12]
    assert tensorboard_scalars(tmp_path / "tensorboard") == logged


def test_a_run_resumed_from_an_earlier_checkpoint_drops_the_later_steps(tmp_path):
    """Run to step 12 logging every 4 steps, then continue from the step-8 checkpoint: step 8 (logged
    before that checkpoint) stays, step 12 is shown once, from the rerun."""
    data = toy_data()
    train(toy_config(tmp_path, report_to=["tensorboard"], log_every=4), data)
    first = logged_scalars(tmp_path)
    rerun = toy_config(tmp_path, report_to=["tensorboard"], log_every=4,
                       resume=str(checkpoint_path(tmp_path / "checkpoints", 8)))
    train(rerun, data)
    logged = logged_scalars(tmp_path)
    assert [step for step, _ in logged["loss"]] == [4, 8, 12]
    assert logged["samples_per_s"][:2] == first["samples_per_s"][:2]
    assert logged["samples_per_s"][2] != first["samples_per_s"][2]  # the rerun's own timing
    assert tensorboard_scalars(tmp_path / "tensorboard") == logged


def test_a_checkpoint_written_with_the_old_keys_resumes(tmp_path):
    data = toy_data()
    train(toy_config(tmp_path, max_steps=4), data)
    path = list_checkpoints(tmp_path / "checkpoints")[-1][1]
    state = torch.load(path, weights_only=True)
    run = state["config"]["run"]
    for key in ("report_to", "wandb_project", "wandb_entity", "wandb_mode"):
        del run[key]
    run.update(tensorboard=True, wandb="old-project")
    torch.save(state, path)
    train(toy_config(tmp_path, max_steps=8, report_to=["tensorboard"]), data)
    assert list_checkpoints(tmp_path / "checkpoints")[-1][0] == 8
    assert [step for step, _ in tensorboard_scalars(tmp_path / "tensorboard")["loss"]] == [6, 8]


def test_a_picture_reaches_tensorboard_as_an_image(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, (12, 20, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "grid.png")
    log = RunLog(tmp_path, enabled=True, report_to=["tensorboard"])
    log.add_image_file(5, "samples", tmp_path / "grid.png")
    log.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    (image,) = events.Images("samples")
    assert (image.step, image.width, image.height) == (5, 20, 12)
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(image.encoded_image_string))), pixels)


def test_a_process_other_than_the_main_one_opens_no_tracker(tmp_path):
    log = RunLog(tmp_path, enabled=False, report_to=["tensorboard", "wandb"], config={"a": 1})
    log.log(3, {"loss": 1.0})
    log.close()
    assert log.trackers == [] and list(tmp_path.iterdir()) == []


# -- W&B ------------------------------------------------------------------------------------
@pytest.fixture
def wandb_env(monkeypatch, tmp_path):
    """W&B with no account and nothing outside tmp_path: no API key, an empty netrc, no console capture."""
    import wandb

    for name in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_ENTITY", "WANDB_PROJECT"):
        monkeypatch.delenv(name, raising=False)
    (tmp_path / "netrc").write_text("")
    for name in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb-home"))
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    for name in ("WANDB_SILENT", "WANDB_DISABLE_GIT", "WANDB_X_DISABLE_STATS", "WANDB_X_DISABLE_MACHINE_INFO"):
        monkeypatch.setenv(name, "true")
    monkeypatch.setenv("WANDB_CONSOLE", "off")
    monkeypatch.setenv("WANDB_SAVE_CODE", "false")
    wandb.teardown()  # W&B keeps settings and credentials per process: start from these
    yield
    wandb.teardown()


def test_wandb_mode_auto_goes_offline_without_an_api_key(wandb_env, tmp_path, monkeypatch, capsys):
    assert _wandb_mode("auto", tmp_path) == "offline"
    assert "W&B: no API key is configured, logging offline" in capsys.readouterr().out
    assert _wandb_mode("offline", tmp_path) == "offline"
    with pytest.raises(ValueError, match="run.wandb_mode is online but no W&B API key is configured: run `wandb"):
        _wandb_mode("online", tmp_path)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert _wandb_mode("auto", tmp_path) is None  # W&B follows WANDB_MODE itself
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.setenv("WANDB_API_KEY", "0" * 40)
    assert _wandb_mode("auto", tmp_path) == "online"


def wandb_history(run_folder: Path) -> tuple[dict[str, list[tuple[int, float]]], dict]:
    """The logged values and the config in an offline W&B run's ``run-ID.wandb`` file (an image as
    its fields: ``samples.path``, ``samples.width``, ...): W&B's protobuf records in the block format
    of LevelDB's log (a 7-byte header, then per record a checksum, length and kind; a record may span
    blocks of 32 KiB)."""
    from wandb.proto.wandb_internal_pb2 import Record

    (path,) = run_folder.glob("run-*.wandb")
    data, position, pending = path.read_bytes(), 7, b""
    scalars: dict[str, list[tuple[int, float]]] = {}
    config = {}
    while position + 7 <= len(data):
        if 32768 - position % 32768 < 7:  # a block's tail too short for a record header is padding
            position += 32768 - position % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[position:position + 7])
        pending += data[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # a whole record, or the last part of one
            record, pending = Record.FromString(pending), b""
            if record.WhichOneof("record_type") == "history":
                for item in record.history.item:
                    key = item.key or ".".join(item.nested_key)  # W&B writes either
                    if not key.startswith("_"):
                        scalars.setdefault(key, []).append((record.history.step.num, json.loads(item.value_json)))
            elif record.WhichOneof("record_type") == "run":
                config = {item.key: json.loads(item.value_json) for item in record.run.config.update}
    return scalars, config


@pytest.mark.slow
def test_an_offline_wandb_run_holds_every_logged_scalar_and_a_resume_continues_its_id(wandb_env, tmp_path):
    import wandb

    out = tmp_path / "run"
    data = toy_data()
    with pytest.raises(Crash):
        train(toy_config(out, report_to=["wandb"], wandb_project="tests"), data, crash_at=6)
    run_id = (out / "wandb" / "ctok-run-id").read_text().strip()
    wait_for_the_next_second()
    train(toy_config(out, report_to=["wandb"], wandb_project="tests"), data)
    assert (out / "wandb" / "ctok-run-id").read_text().strip() == run_id
    wandb.teardown()  # W&B's service process writes the run files; it has written all of them once it is gone
    first, resumed = sorted((out / "wandb").glob(f"offline-run-*-{run_id}"))  # one folder per process, one id
    logged = {key: [(step, float(value)) for step, value in values] for key, values in
              _by_key(read_log(out / "log.jsonl")).items()}
    scalars, config = wandb_history(resumed)
    assert scalars == {key: [(s, v) for s, v in values if s > 4] for key, values in logged.items()}
    assert config["optim"]["lr"] == 0.5 and config["run"]["report_to"] == ["wandb"]
    earlier, _ = wandb_history(first)  # the crashed run's steps 3 and 6; W&B cannot take step 6 back
    assert [step for step, _ in earlier["loss"]] == [3, 6] and earlier["loss"][0] == logged["loss"][0]


class PicturingRegression(Regression):
    """The toy regression with a sample grid of four noise pictures drawn from the step, so that the
    grids of two steps differ."""

    def sample_images(self, step):
        return torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(step)) * 2 - 1


@pytest.mark.slow
def test_an_offline_wandb_run_holds_each_sample_grid_at_its_step(wandb_env, tmp_path):
    import wandb

    out = tmp_path / "run"
    train(toy_config(out, report_to=["wandb"], wandb_project="tests", sample_every=6), toy_data(),
          task=PicturingRegression)
    wandb.teardown()  # the service process has written every file once it is gone
    (run_folder,) = (out / "wandb").glob("offline-run-*")
    logged, _ = wandb_history(run_folder)
    grids = {int(path.stem.removeprefix("step-")): path for path in (out / "samples").glob("step-*.png")}
    assert sorted(grids) == [6, 12]
    # W&B's history row of a step holds log.jsonl's record of that step and the grid's fields
    records = {record["step"]: record for record in read_log(out / "log.jsonl")}
    assert [(step, value) for step, value in logged["loss"] if step in grids] == [(6, records[6]["loss"]),
                                                                                  (12, records[12]["loss"])]
    assert logged["samples._type"] == [(6, "image-file"), (12, "image-file")]
    for (step, path), (_, width), (_, height) in zip(logged["samples.path"], logged["samples.width"],
                                                      logged["samples.height"], strict=True):
        assert path.startswith("media/images/")
        with Image.open(run_folder / "files" / path) as stored, Image.open(grids[step]) as grid:
            assert stored.size == grid.size == (width, height)
            np.testing.assert_array_equal(np.asarray(stored), np.asarray(grid))
    with Image.open(grids[6]) as first, Image.open(grids[12]) as last:
        assert not np.array_equal(np.asarray(first), np.asarray(last))


def _by_key(records: list[dict]) -> dict[str, list[tuple[int, float]]]:
    by_key: dict[str, list[tuple[int, float]]] = {}
    for record in records:
        for key, value in record.items():
            if key != "step":
                by_key.setdefault(key, []).append((record["step"], value))
    return by_key


# -- whole runs -----------------------------------------------------------------------------
@pytest.mark.slow
def test_a_tokenizer_run_with_its_dashboard_reaches_tensorboard(synthetic_fashion_mnist, tmp_path):
    run = tmp_path / "run"
    assert main(["train-tokenizer", "--config", "tiny-maetok", "data.batch_size=4", "samples.num_images=2",
                 "loss.perceptual_weight=0", "gan.start_step=2", "run.max_steps=6", "run.log_every=2",
                 "run.ckpt_every=6", "run.sample_every=3", "eval.every=3", "eval.images=100",
                 f"data.images={synthetic_fashion_mnist}", f"run.out_dir={run}", "run.report_to=[tensorboard]"]) == 0
    logged = logged_scalars(run)
    assert {"loss", "loss/discriminator", "eval/psnr_db", "eval/gmm_nll_k1"} <= set(logged)
    assert [step for step, _ in logged["eval/psnr_db"]] == [3, 6]
    assert tensorboard_scalars(run / "tensorboard") == logged
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    assert [image.step for image in events.Images("samples")] == [3, 6]
    with Image.open(run / "samples" / "step-00000006.png") as grid:
        assert (events.Images("samples")[-1].width, events.Images("samples")[-1].height) == grid.size
    assert tensorboard_hparams(run / "tensorboard")["model.num_latent_tokens"] > 0


@pytest.mark.slow
def test_two_processes_report_once_and_a_kill_9_resume_leaves_tensorboard_equal_to_the_log(
        small_cache, tmp_path):  # noqa: F811
    """SiT under torchrun with 2 processes: rank 0 alone writes events. Then a single-process run is
    killed past a checkpoint and resumed: TensorBoard shows exactly log.jsonl's records."""
    settings = ["data.batch_size=8", "run.log_every=2", "run.report_to=[tensorboard]", "samples.steps=2",
                "samples.num_images=4"]
    two = tmp_path / "two"
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "ctok",
                    *train_args("train-sit", "tiny-sit", small_cache, two, *settings, "run.max_steps=6")],
                   check=True, env=ENV, capture_output=True)
    assert len(list((two / "tensorboard").glob("events.out.tfevents.*"))) == 1
    assert tensorboard_scalars(two / "tensorboard") == logged_scalars(two)
    assert [step for step, _ in logged_scalars(two)["loss"]] == [2, 4, 6]

    killed = tmp_path / "killed"
    args = train_args("train-sit", "tiny-sit", small_cache, killed, *settings, "run.max_steps=100",
                      "run.ckpt_every=20", "run.sample_every=0")
    process = subprocess.Popen([sys.executable, "-m", "ctok", *args], env=ENV, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not any(r["step"] > 24 for r in read_log(killed / "log.jsonl")):  # logged past the step-20 checkpoint
        assert process.poll() is None, "training ended before it could be killed"
        assert time.monotonic() < deadline, "no log line past step 24 within 300 s"
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert main(args) == 0
    logged = logged_scalars(killed)
    assert [step for step, _ in logged["loss"]] == list(range(2, 101, 2))
    assert tensorboard_scalars(killed / "tensorboard") == logged
