"""Checkpoints: atomic under kill -9 and disk full, exact resume, refused resume, SIGTERM."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from sdxl_trainer.utils import checkpoint as ckpt

CHECKPOINT_FILES = ("unet.safetensors", "ema.safetensors", "state.safetensors", "rng-rank0.safetensors")


def _env(**extra) -> dict:
    # One thread: the fastest on a busy CPU, and the same float reductions in every run.
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **extra}


def _write_config(folder: Path, pipeline_dir: Path, data_dir: Path, cache_dir: Path) -> Path:
    config = {
        "model": {"pretrained": str(pipeline_dir)},
        "data": {"root": str(data_dir), "resolution": 64},
        "cache": {"dir": str(cache_dir), "num_workers": 0, "batch_size": 8},
        "train": {"max_steps": 6, "batch_size": 2, "learning_rate": 1e-3, "log_every": 1, "checkpoint_every": 2, "keep_last_n": 3},
        "sample": {"prompts": ["red"], "num_inference_steps": 1, "guidance_scale": 2.0},
    }
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _train(config: Path, output: Path, *overrides: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sdxl_trainer", "train", str(config), f"output.dir={output}", *overrides],
                          capture_output=True, text=True, timeout=timeout, env=env or _env())


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tiny_pipeline_dir, small_demo_dir):
    root = tmp_path_factory.mktemp("ckpt")
    return {"root": root, "config": _write_config(root, tiny_pipeline_dir, small_demo_dir, root / "cache")}


@pytest.fixture(scope="module")
def uninterrupted_run(workspace) -> Path:
    run = workspace["root"] / "uninterrupted"
    result = _train(workspace["config"], run)
    assert result.returncode == 0, result.stderr[-3000:]
    return run


def _assert_same_state(a: Path, b: Path) -> None:
    for name in CHECKPOINT_FILES:
        left, right = load_file(str(a / name)), load_file(str(b / name))
        assert left.keys() == right.keys(), name
        different = [k for k in left if not torch.equal(left[k], right[k])]
        assert not different, f"{name}: {different[:5]}"
    meta_a, meta_b = ckpt.read_checkpoint_meta(a), ckpt.read_checkpoint_meta(b)
    assert meta_a["objects"] == meta_b["objects"]  # optimizer param_groups, LR schedule, sampler, loss history
    assert meta_a["ema"] == meta_b["ema"] and meta_a["step"] == meta_b["step"]


@pytest.mark.slow
def test_kill_during_save_leaves_loadable_checkpoint_and_resume_is_bit_identical(workspace, uninterrupted_run):
    run = workspace["root"] / "killed"
    killed = _train(workspace["config"], run, env=_env(**{ckpt.KILL_HOOK_ENV: "after_files@4"}))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    checkpoints = run / "checkpoints"
    assert any(p.name.startswith(".tmp-step-000004") for p in checkpoints.iterdir())  # died mid-save
    latest = ckpt.latest_checkpoint(checkpoints)
    assert latest.name == "step-000002"
    assert ckpt.load_checkpoint(latest).step == 2

    resumed = _train(workspace["config"], run, "train.resume=latest")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr
    assert not [p for p in checkpoints.iterdir() if p.name.startswith(".tmp")]  # the dead save's folder is gone
    _assert_same_state(uninterrupted_run / "checkpoints" / "step-000006", checkpoints / "step-000006")
    assert json.loads((run / "summary.json").read_text())["steps"] == 6
    # keep_last_n=3 and the pointer names the newest
    assert sorted(p.name for p in checkpoints.glob("step-*")) == ["step-000002", "step-000004", "step-000006"]
    assert json.loads((checkpoints / "latest").read_text())["name"] == "step-000006"


def test_resume_with_changed_batch_size_is_refused(workspace, uninterrupted_run):
    before = (uninterrupted_run / "config.yaml").read_text()
    result = _train(workspace["config"], uninterrupted_run, "train.resume=latest", "train.batch_size=4", "train.max_steps=8")
    assert result.returncode == 2, result.stderr[-2000:]
    assert "train.batch_size: 2 -> 4" in result.stderr
    assert "train.resume_force=true" in result.stderr
    assert "train.max_steps" not in result.stderr  # training longer is allowed
    assert (uninterrupted_run / "config.yaml").read_text() == before  # refused before touching the run


def test_resume_without_checkpoint_is_a_clear_error(workspace, tmp_path):
    result = _train(workspace["config"], tmp_path / "fresh", "train.resume=latest")
    assert result.returncode == 2
    assert "no complete checkpoint" in result.stderr


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_resume_continues(workspace):
    run = workspace["root"] / "terminated"
    command = [sys.executable, "-m", "sdxl_trainer", "train", str(workspace["config"]), f"output.dir={run}",
               "train.max_steps=500", "train.checkpoint_every=0"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    deadline = time.monotonic() + 240
    log_file = run / "train.log"
    while not (log_file.is_file() and "step 2/500" in log_file.read_text()):
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "training did not reach step 2"
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    match = [line for line in stderr.splitlines() if line.startswith("interrupted at step")]
    assert match and "resume with train.resume=latest" in match[0], stderr[-2000:]
    step = int(match[0].split()[3].rstrip(";"))
    latest = ckpt.latest_checkpoint(run / "checkpoints")
    assert latest.name == f"step-{step:06d}" and step >= 2
    assert not (run / "final").exists()  # an interrupted run has no final pipeline yet

    resumed = _train(workspace["config"], run, "train.resume=latest", f"train.max_steps={step + 1}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {latest}" in resumed.stderr
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == step + 1
    history = ckpt.load_checkpoint(ckpt.latest_checkpoint(run / "checkpoints")).objects["loss_history"]["losses"]
    assert len(history) == step + 1  # the loss history went on from the checkpoint


# ---------------------------------------------------------------------------- in-process units
class _Counter:
    def __init__(self) -> None:
        self.value = 0

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = state["value"]


def _small_training(seed: int = 0):
    from sdxl_trainer.training.setup import build_ema

    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.GELU(), torch.nn.Linear(8, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.99))
    ema = build_ema(model, enabled=True, decay=0.9, warmup=True)
    generator = torch.Generator().manual_seed(seed)
    return model, optimizer, ema, generator


def _step(model, optimizer, ema, generator) -> None:
    x = torch.randn(3, 4, generator=generator)
    model(x).pow(2).mean().backward()
    optimizer.step()
    optimizer.zero_grad()
    ema.step(model.parameters())


def _request(step, model, optimizer, ema, generator, counter=None) -> ckpt.SaveRequest:
    return ckpt.SaveRequest(step=step, epoch=0, unet=model, ema=ema, objects={"optimizer": optimizer, "counter": counter or _Counter()},
                            rng_states=[ckpt.capture_rng_state(generator)], config_tree={"train": {"batch_size": 2}}, config_yaml="train: {}\n")


def test_round_trip_restores_every_piece_exactly(tmp_path):
    model, optimizer, ema, generator = _small_training()
    for _ in range(3):
        _step(model, optimizer, ema, generator)
    counter = _Counter()
    counter.value = 7
    folder = ckpt.save_checkpoint(tmp_path, _request(3, model, optimizer, ema, generator, counter))
    reference = [torch.randn(2, generator=generator)]
    for _ in range(2):
        _step(model, optimizer, ema, generator)

    model2, optimizer2, ema2, generator2 = _small_training(seed=1)
    counter2 = _Counter()
    ckpt.restore_training_state(ckpt.load_checkpoint(folder), unet=model2, ema=ema2, objects={"optimizer": optimizer2, "counter": counter2},
                                generator=generator2, rank=0)
    assert counter2.value == 7
    assert torch.equal(torch.randn(2, generator=generator2), reference[0])
    assert optimizer2.state_dict()["param_groups"][0]["betas"] == (0.9, 0.99)  # tuples survive JSON
    for _ in range(2):
        _step(model2, optimizer2, ema2, generator2)
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(ema.shadow_params, ema2.shadow_params):
        assert torch.equal(a, b)
    assert ema.optimization_step == ema2.optimization_step


def test_disk_full_keeps_previous_checkpoint(tmp_path, monkeypatch):
    model, optimizer, ema, generator = _small_training()
    _step(model, optimizer, ema, generator)
    ckpt.save_checkpoint(tmp_path, _request(1, model, optimizer, ema, generator))
    _step(model, optimizer, ema, generator)

    real_write = ckpt._write_safetensors
    calls = []

    def full_disk(path, tensors, metadata=None):
        calls.append(path)
        if len(calls) == 2:  # the UNet file is written, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real_write(path, tensors, metadata)

    monkeypatch.setattr(ckpt, "_write_safetensors", full_disk)
    with pytest.raises(ckpt.CheckpointError) as info:
        ckpt.save_checkpoint(tmp_path, _request(2, model, optimizer, ema, generator))
    message = str(info.value)
    assert f"disk full while saving checkpoint to {tmp_path / 'step-000002'}" in message
    assert "previous checkpoint step-000001 is intact" in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-000001"]  # temp folder removed
    assert ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path)).step == 1

    monkeypatch.setattr(ckpt, "_write_safetensors", real_write)  # space freed: the next save works
    assert ckpt.save_checkpoint(tmp_path, _request(2, model, optimizer, ema, generator)).name == "step-000002"


_SAVE_SCRIPT = """
import sys, torch
sys.path.insert(0, {tests!r})
from test_checkpoint import _request, _small_training, _step
from sdxl_trainer.utils import checkpoint as ckpt
model, optimizer, ema, generator = _small_training()
for step in (1, 2):
    _step(model, optimizer, ema, generator)
    ckpt.save_checkpoint({folder!r}, _request(step, model, optimizer, ema, generator), keep_last_n=1)
"""


@pytest.mark.parametrize("point, expected", [("mid_files", 1), ("after_rename", 1), ("after_pointer", 2)])  # after_files: the training test
def test_kill_at_any_point_of_a_save_leaves_a_loadable_checkpoint(tmp_path, point, expected):
    script = _SAVE_SCRIPT.format(tests=str(Path(__file__).parent), folder=str(tmp_path))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                            env=_env(**{ckpt.KILL_HOOK_ENV: f"{point}@2"}))
    assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]
    latest = ckpt.latest_checkpoint(tmp_path)
    assert latest is not None and ckpt.load_checkpoint(latest).step == expected


def test_prune_and_stale_pointer_fallback(tmp_path):
    model, optimizer, ema, generator = _small_training()
    for step in (1, 2, 3):
        _step(model, optimizer, ema, generator)
        ckpt.save_checkpoint(tmp_path, _request(step, model, optimizer, ema, generator), keep_last_n=2)
    assert sorted(p.name for p in tmp_path.glob("step-*")) == ["step-000002", "step-000003"]
    (tmp_path / "step-000003" / "state.safetensors").write_bytes(b"truncated")  # a damaged newest checkpoint
    assert ckpt.latest_checkpoint(tmp_path).name == "step-000002"
    with pytest.raises(ckpt.ResumeError, match="incomplete"):
        ckpt.find_checkpoint(str(tmp_path / "step-000003"), tmp_path)


def test_config_differences_split_critical_from_allowed():
    saved = {"train": {"batch_size": 2, "max_steps": 6, "learning_rate": 1e-3}, "objective": {"snr_gamma": 5.0}}
    now = {"train": {"batch_size": 2, "max_steps": 9, "learning_rate": 2e-3}, "objective": {"snr_gamma": 1.0}}
    critical, other = ckpt.config_differences(saved, now)
    assert critical == ["objective.snr_gamma: 5.0 -> 1.0"]
    assert other == ["train.learning_rate: 0.001 -> 0.002"]
