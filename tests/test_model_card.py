"""The model card of a real (tiny) run: valid Hub metadata, the run's figures, a usage snippet that runs."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch
import yaml

from sdxl_trainer.utils.model_card import _fmt, render_model_card


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_pipeline_dir, small_demo_dir):
    root = tmp_path_factory.mktemp("card")
    config = {
        "model": {"pretrained": str(tiny_pipeline_dir)},
        "data": {"root": str(small_demo_dir), "resolution": 64},
        "cache": {"dir": str(root / "cache"), "num_workers": 0},
        "train": {"max_steps": 3, "batch_size": 2, "log_every": 1},
        "sample": {"prompts": ["red"], "num_inference_steps": 1},
        "output": {"dir": str(root / "run"), "export_single_file": True},
    }
    (root / "config.yaml").write_text(yaml.safe_dump(config))
    result = subprocess.run([sys.executable, "-m", "sdxl_trainer", "train", str(root / "config.yaml")], capture_output=True, text=True,
                            timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    return root / "run"


def _table(card: str) -> dict[str, str]:
    rows = re.findall(r"^\| ([^|]+?) \| ([^|]*?) \|$", card, flags=re.MULTILINE)
    return {name: value for name, value in rows if name.strip()}


@pytest.mark.slow
def test_card_parses_and_matches_summary(finished_run):
    from huggingface_hub import ModelCard

    summary = json.loads((finished_run / "summary.json").read_text())
    card = ModelCard.load(finished_run / "README.md")
    assert card.data.license == "openrail++"
    assert card.data.library_name == "diffusers" and card.data.pipeline_tag == "text-to-image"
    assert "stable-diffusion-xl" in card.data.tags
    assert card.data.base_model is None  # a local folder is no Hub id
    table = _table(card.text)
    for name, key in [("steps", "steps"), ("images", "images"), ("final loss (last 10% of steps)", "final_loss"),
                      ("initial loss (first 10% of steps)", "initial_loss"), ("EMA", "ema"), ("loss weighting", "loss_weighting"),
                      ("weights in this folder", "final_weights")]:
        assert table[name] == _fmt(summary[key]), name
    assert table["buckets"] == ", ".join(f"{k}: {v}" for k, v in summary["buckets"].items())
    assert table["objective"].startswith(summary["prediction_type"])
    for link in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", card.text):
        assert (finished_run / link).is_file(), link
    assert summary["last_sample"] in card.text


@pytest.mark.slow
def test_usage_snippet_runs_against_final(finished_run, tmp_path):
    card = (finished_run / "README.md").read_text()
    [snippet] = re.findall(r"```python\n(.*?)```", card, flags=re.DOTALL)
    assert 'from_pretrained("final"' in snippet
    snippet = snippet.replace('from_pretrained("final"', f'from_pretrained({str(finished_run / "final")!r}')
    result = subprocess.run([sys.executable, "-c", snippet], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "sample.png").is_file()


@pytest.mark.slow
def test_final_single_file_holds_the_final_weights(finished_run):
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

    summary = json.loads((finished_run / "summary.json").read_text())
    assert summary["single_file"] == "final.safetensors"
    loaded = StableDiffusionXLPipeline.from_single_file(str(finished_run / "final.safetensors"), config=str(finished_run / "final"),
                                                        local_files_only=True)
    final_unet = UNet2DConditionModel.from_pretrained(finished_run / "final" / "unet")
    reference, exported = final_unet.state_dict(), loaded.unet.state_dict()
    assert all(torch.equal(reference[k], exported[k]) for k in reference)
    assert loaded.scheduler.config.prediction_type == "v_prediction"


def test_base_model_only_for_hub_ids():
    from huggingface_hub import ModelCard

    summary = {"steps": 10, "prediction_type": "v_prediction", "zero_terminal_snr": True}
    hub = ModelCard(render_model_card(summary, run_name="r", pretrained="stabilityai/stable-diffusion-xl-base-1.0"))
    assert hub.data.base_model == "stabilityai/stable-diffusion-xl-base-1.0"
    local = ModelCard(render_model_card(summary, run_name="r", pretrained="builtin:tiny-base"))
    assert local.data.base_model is None
