"""The memory options through the real `train` command on CPU (tiny model, a few steps)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import yaml
from safetensors import safe_open
from test_train_cli import _write_config

ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}


def _train(config: str, *overrides: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sdxl_trainer", "train", config, *overrides],
                          capture_output=True, text=True, timeout=timeout, env=ONE_THREAD)


def test_fp16_and_adamw8bit_on_cpu_exit_2_before_loading(tmp_path, tiny_pipeline_dir, small_demo_dir):
    config = _write_config(tmp_path, tiny_pipeline_dir, small_demo_dir)
    result = _train(config, "train.device=cpu", "train.mixed_precision=fp16", "train.optimizer=adamw8bit", timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "fp16 needs a GPU" in result.stderr and "adamw8bit needs a CUDA device" in result.stderr
    assert not (tmp_path / "cache").exists()  # refused before any model or cache work


@pytest.mark.slow
def test_preset_24gb_trains_on_cpu(tmp_path, tiny_pipeline_dir, small_demo_dir):
    config = _write_config(tmp_path, tiny_pipeline_dir, small_demo_dir, train__ema={"enabled": False})
    result = _train(config, "train.device=cpu", "train.preset=24gb", "train.max_steps=3")
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "run"
    resolved = yaml.safe_load((run / "config.yaml").read_text())
    assert resolved["train"]["optimizer"] == "adafactor" and resolved["train"]["fused_backward"] is True
    assert resolved["train"]["batch_size"] == 4  # the test config's explicit batch size wins over the preset's 1
    assert resolved["model"]["gradient_checkpointing"] is True and resolved["train"]["mixed_precision"] == "bf16"
    log = (run / "train.log").read_text()
    assert "AttnProcessor2_0 (PyTorch scaled_dot_product_attention)" in log
    assert "adafactor (fused into backward)" in log
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 3 and np.isfinite(summary["final_loss"])


@pytest.mark.slow
def test_full_bf16_trains_and_saves_bf16_weights_on_cpu(tmp_path, tiny_pipeline_dir, small_demo_dir):
    config = _write_config(tmp_path, tiny_pipeline_dir, small_demo_dir)
    result = _train(config, "train.device=cpu", "train.mixed_precision=bf16", "train.full_bf16=true", "train.max_steps=3")
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "run"
    summary = json.loads((run / "summary.json").read_text())
    assert np.isfinite(summary["initial_loss"]) and np.isfinite(summary["final_loss"])
    with safe_open(str(run / "final" / "unet" / "diffusion_pytorch_model.safetensors"), framework="pt") as weights:
        dtypes = {weights.get_slice(name).get_dtype() for name in weights.keys()}
    assert dtypes == {"BF16"}
    assert list((run / "samples").glob("*.png"))
