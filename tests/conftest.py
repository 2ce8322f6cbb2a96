"""Shared fixtures: a freshly initialised tiny SDXL pipeline folder and a small demo dataset."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One thread in the test process and (through OMP_NUM_THREADS) in the commands it starts: tiny
# models gain nothing from threads, and two OpenMP threads on a busy 2-core machine spin against
# each other (measured ~10x slower per training step).
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_pipeline_dir(tmp_path_factory) -> Path:
    """A random-initialised tiny SDXL saved as a diffusers folder (epsilon, SDXL betas: like SDXL 1.0)."""
    from diffusers import EulerDiscreteScheduler

    from sdxl_trainer.data.demo import DEMO_WORDS
    from sdxl_trainer.models.tiny import build_tiny_components, save_as_pipeline
    from sdxl_trainer.training.loss import DiffusionObjective, ObjectiveConfig

    out = tmp_path_factory.mktemp("tiny-pipeline")
    components = build_tiny_components(DEMO_WORDS, seed=0)
    scheduler_config = DiffusionObjective(ObjectiveConfig(prediction_type="epsilon", zero_terminal_snr=False, loss_weighting="none")).scheduler_config()
    save_as_pipeline(components, EulerDiscreteScheduler(**scheduler_config), out)
    return out


@pytest.fixture(scope="session")
def small_demo_dir(tmp_path_factory) -> Path:
    from sdxl_trainer.data.demo import write_demo_dataset

    return write_demo_dataset(tmp_path_factory.mktemp("demo-data"), num_images=24, resolution=128, seed=0)
