"""End to end: the real `demo` command on the shipped built-in base (short run)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from huggingface_hub import ModelCard


@pytest.mark.slow
def test_demo_command_end_to_end(tmp_path):
    out = tmp_path / "demo"
    result = subprocess.run(
        [sys.executable, "-m", "sdxl_trainer", "demo", "--output", str(out), "--steps", "12", "--images", "40",
         "sample.num_inference_steps=2", "sample.prompts=[completely black]"],
        capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "demo finished" in result.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 12 and summary["base_model"] == "builtin:tiny-base"
    assert summary["prediction_type"] == "v_prediction" and summary["zero_terminal_snr"] is True
    scheduler = json.loads((out / "final" / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["prediction_type"] == "v_prediction"
    assert scheduler["rescale_betas_zero_snr"] is True and scheduler["timestep_spacing"] == "trailing"
    card = ModelCard.load(out / "README.md")
    assert card.data.library_name == "diffusers"
    assert list((out / "samples").glob("step-*.png"))


def test_tag_weighting_in_training(tmp_path, tiny_pipeline_dir, small_demo_dir):
    import yaml

    config = {
        "model": {"pretrained": str(tiny_pipeline_dir)},
        "data": {"root": str(small_demo_dir), "resolution": 128},
        "cache": {"dir": str(tmp_path / "cache"), "num_workers": 0},
        "train": {"max_steps": 2, "batch_size": 4},
        "sample": {"prompts": ["completely black"], "num_inference_steps": 2},
        "tag_weighting": {"enabled": True, "alpha": 1.0, "min_count": 1},
        "output": {"dir": str(tmp_path / "run")},
    }
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config))
    result = subprocess.run([sys.executable, "-m", "sdxl_trainer", "train", str(path)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "run"
    weights = json.loads((run / "tag_weights.json").read_text())
    assert weights  # per-tag counts and weights were saved
    summary = json.loads((run / "summary.json").read_text())
    tags = summary["tag_weighting"]
    assert abs(tags["weights"]["mean"] - 1.0) < 1e-6
    rarest, commonest = tags["most_upweighted"][0], tags["most_downweighted"][0]
    assert rarest[1] <= commonest[1] and rarest[2] > commonest[2]
    assert "Tag-based loss weighting" in (run / "README.md").read_text()
