"""Smoke runs of the real `train` command on a tiny dataset and a random tiny SDXL."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml


def _write_config(tmp_path, pipeline_dir, data_dir, **extra) -> str:
    config = {
        "model": {"pretrained": str(pipeline_dir)},
        "data": {"root": str(data_dir), "resolution": 128},
        "cache": {"dir": str(tmp_path / "cache"), "num_workers": 0, "batch_size": 8},
        "train": {"max_steps": 4, "batch_size": 4, "learning_rate": 1e-4, "log_every": 2},
        "sample": {"prompts": ["red circle, blue background, large", "completely black"], "num_inference_steps": 3, "guidance_scale": 2.0},
        "output": {"dir": str(tmp_path / "run")},
    }
    for dotted, value in extra.items():
        section, key = dotted.split("__")
        config.setdefault(section, {})[key] = value
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def test_train_cli_writes_every_output(tmp_path, tiny_pipeline_dir, small_demo_dir):
    config = _write_config(tmp_path, tiny_pipeline_dir, small_demo_dir)
    result = subprocess.run([sys.executable, "-m", "sdxl_trainer", "train", config, "train.max_steps=5"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "run"
    for name in ("config.yaml", "train.log", "README.md", "summary.json", "final/model_index.json"):
        assert (run / name).exists(), name
    assert list((run / "samples").glob("*.png"))
    assert list((run / "logs").rglob("events.out.tfevents.*"))
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 5
    assert np.isfinite(summary["initial_loss"]) and np.isfinite(summary["final_loss"])
    assert summary["wall_seconds"] > 0
    resolved = yaml.safe_load((run / "config.yaml").read_text())
    assert resolved["train"]["max_steps"] == 5  # the override is in the resolved config
    assert json.loads((tmp_path / "cache" / "report.json").read_text())["cached"] == 24

    from diffusers import StableDiffusionXLPipeline

    pipeline = StableDiffusionXLPipeline.from_pretrained(run / "final", local_files_only=True)
    scheduler = pipeline.scheduler.config
    assert scheduler.prediction_type == "v_prediction"
    assert scheduler.rescale_betas_zero_snr is True
    assert scheduler.timestep_spacing == "trailing"
    image = pipeline("completely black", num_inference_steps=2, height=64, width=64, output_type="np",
                     generator=torch.Generator().manual_seed(0)).images[0]
    assert image.shape == (64, 64, 3) and np.isfinite(image).all()


def test_train_cli_bad_data_root_exits_2(tmp_path, tiny_pipeline_dir):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "broken.png").write_bytes(b"not a png")
    config = _write_config(tmp_path, tiny_pipeline_dir, empty)
    result = subprocess.run([sys.executable, "-m", "sdxl_trainer", "train", config], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "no usable images" in result.stderr
    assert "broken.png" in result.stderr or "not an image" in result.stderr
