"""Two CPU processes (torchrun, gloo) train exactly what one process with the same global batch trains.

Why the comparison is exact, not approximate: the data set is 4 images in one bucket, so one
process with batch 4 and each of two processes with batch 2 see all 4 images at every step (the
sampler's per-rank split of an epoch is then the whole epoch); `train.noise_keying=sample` draws
each sample's noise and timestep from (seed, step, dataset index), not from a per-rank stream;
DDP averages the two ranks' mean-loss gradients, which is the gradient of the 4-sample mean.
What remains is float summation order, far below one learning-rate step.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

from sdxl_trainer.data.demo import write_demo_dataset

LEARNING_RATE = 1e-3
STEPS = 4


def _config(tmp_path, pipeline_dir, data_dir) -> str:
    config = {
        "model": {"pretrained": str(pipeline_dir)},
        "data": {"root": str(data_dir), "resolution": 128},
        "cache": {"dir": str(tmp_path / "cache"), "num_workers": 0, "batch_size": 2},
        "train": {"device": "cpu", "max_steps": STEPS, "learning_rate": LEARNING_RATE, "lr_scheduler": "linear",
                  "lr_warmup_steps": 2, "max_grad_norm": 1.0, "log_every": 1, "noise_keying": "sample", "ema": {"enabled": False}},
        "sample": {"prompts": ["completely black"], "num_inference_steps": 2, "width": 64, "height": 64},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def _run(command: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, capture_output=True, text=True, timeout=420, env=env)


def _unet(run_dir) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "final" / "unet" / "diffusion_pytorch_model.safetensors"))


@pytest.mark.slow
def test_two_processes_equal_one_process_with_the_same_global_batch(tmp_path, tiny_pipeline_dir):
    data = write_demo_dataset(tmp_path / "data", num_images=4, resolution=128, seed=0)
    config = _config(tmp_path, tiny_pipeline_dir, data)
    two = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                "-m", "sdxl_trainer", "train", config, f"output.dir={tmp_path / 'two'}", "train.batch_size=2"])
    assert two.returncode == 0, two.stderr[-4000:]
    one = _run([sys.executable, "-m", "sdxl_trainer", "train", config, f"output.dir={tmp_path / 'one'}", "train.batch_size=4"])
    assert one.returncode == 0, one.stderr[-4000:]

    # The cache was built split across the two ranks, then reused by the single process.
    report = json.loads((tmp_path / "cache" / "report.json").read_text())
    assert report["reused"] == 4 and report["cached"] == 0
    assert not list((tmp_path / "cache").glob("*.rank*"))  # per-rank index/manifest/report merged away
    assert "2 process(es)" in (tmp_path / "two" / "train.log").read_text()

    summary_two = json.loads((tmp_path / "two" / "summary.json").read_text())
    summary_one = json.loads((tmp_path / "one" / "summary.json").read_text())
    # Identical weights on both ranks after training (each rank's digest, gathered by rank 0).
    fingerprints = summary_two["rank_weight_fingerprints"]
    assert summary_two["processes"] == 2 and len(fingerprints) == 2 and fingerprints[0] == fingerprints[1]
    # Same losses (the 2-process loss is the mean over ranks) and same weights as one process.
    assert summary_two["initial_loss"] == pytest.approx(summary_one["initial_loss"], rel=1e-5)
    assert summary_two["final_loss"] == pytest.approx(summary_one["final_loss"], rel=1e-5)
    base = load_file(str(tiny_pipeline_dir / "unet" / "diffusion_pytorch_model.safetensors"))
    two_weights, one_weights = _unet(tmp_path / "two"), _unet(tmp_path / "one")
    difference = max((two_weights[k].float() - one_weights[k].float()).abs().max().item() for k in one_weights)
    moved = max((one_weights[k].float() - base[k].float()).abs().max().item() for k in one_weights)
    # A learning-rate schedule stepped once per process, or ranks training on their halves
    # without averaging, would differ by about one step (1e-3); summation order by ~1e-9.
    assert moved > 0.5 * LEARNING_RATE
    assert difference < 0.02 * LEARNING_RATE, difference
