"""Validation: model checks, samples on the training schedule, held-out loss, the `validate` command.

Trainers run in-process on one shared cache (24 demo images at 128 px, a random tiny SDXL).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from diffusers import EulerDiscreteScheduler, UNet2DConditionModel
from PIL import Image

from sdxl_trainer.config import load_config
from sdxl_trainer.data.demo import DEMO_WORDS
from sdxl_trainer.data.split import split_position, split_validation
from sdxl_trainer.main import main
from sdxl_trainer.models import model_validator
from sdxl_trainer.models.model_validator import (
    ModelCheckError,
    build_pipeline,
    check_model,
    generate_samples,
    require_valid_model,
    unconditional_branch_warnings,
    validation_timesteps,
)
from sdxl_trainer.models.tiny import build_tiny_components, save_as_pipeline, tiny_unet_config
from sdxl_trainer.training import trainer as trainer_module
from sdxl_trainer.training.loss import DiffusionObjective, ObjectiveConfig
from sdxl_trainer.training.trainer import Trainer, objective_from_config

SAMPLE_SIZE = 64


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("validation-cache")


def run_overrides(pipeline_dir, data_dir, cache_dir, output_dir) -> list[str]:
    return [
        f"model.pretrained={pipeline_dir}",
        f"data.root={data_dir}",
        "data.resolution=128",
        "data.validation_fraction=0.2",
        f"cache.dir={cache_dir}",
        "cache.num_workers=0",
        "cache.batch_size=8",
        "train.device=cpu",
        "train.max_steps=2",
        "train.batch_size=4",
        "train.log_every=1",
        "sample.every_n_steps=0",
        "sample.prompts=[completely black]",
        "sample.num_inference_steps=2",
        "sample.guidance_scale=2.0",
        "sample.guidance_rescale=0.7",
        f"sample.width={SAMPLE_SIZE}",
        f"sample.height={SAMPLE_SIZE}",
        f"output.dir={output_dir}",
    ]


@pytest.fixture(scope="module")
def trainer(tmp_path_factory, tiny_pipeline_dir, small_demo_dir, shared_cache) -> Trainer:
    """A set-up (not finished) trainer: v-prediction + ZTSNR on an epsilon/leading base."""
    output = tmp_path_factory.mktemp("trainer-run")
    config = load_config(None, run_overrides(tiny_pipeline_dir, small_demo_dir, shared_cache, output))
    run = Trainer(config)
    run.setup()
    return run


# ----------------------------------------------------------------------------- the objective options


OBJECTIVE_OPTIONS = [
    {"prediction_type": "epsilon", "zero_terminal_snr": False, "loss_weighting": "none"},
    {"prediction_type": "v_prediction", "zero_terminal_snr": False},
    {"prediction_type": "v_prediction", "zero_terminal_snr": True},
    {"prediction_type": "epsilon", "zero_terminal_snr": True, "loss_weighting": "min_snr"},
    {"loss_weighting": "none"},
    {"loss_weighting": "min_snr", "min_snr_floor": 0.1},
    {"loss_weighting": "soft_min_snr"},
    {"loss_weighting": "debiased"},
    {"prediction_type": "epsilon", "zero_terminal_snr": True, "loss_weighting": "debiased"},
    {"timestep_sampling": "uniform"},
    {"timestep_sampling": "logit_normal", "logit_mean": 0.5},
    {"resolution_shift": True, "base_resolution": 64},  # 128 px canvases: sigma x2
    {"noise_offset": 0.1},
    {"loss_type": "huber", "huber_delta": 0.1},
]


def test_every_objective_option_trains_with_finite_loss(trainer):
    """Two optimizer steps of the UNet per option through the trainer's own compute_loss."""
    unet = trainer.accelerator.unwrap_model(trainer.unet)
    initial = {name: value.clone() for name, value in unet.state_dict().items()}
    original_objective = trainer.objective
    try:
        for option in OBJECTIVE_OPTIONS:
            config = trainer.config.model_copy(deep=True)
            for key, value in option.items():
                setattr(config.objective, key, value)
            trainer.objective = objective_from_config(config)
            unet.load_state_dict(initial)
            batches = trainer.sampler.batches()
            losses = []
            for _ in range(2):
                batch = trainer.dataset.collate([trainer.dataset[i] for i in next(batches)])
                loss = trainer.compute_loss(batch)
                trainer.accelerator.backward(loss)
                trainer.optimizer.step()
                trainer.optimizer.zero_grad(set_to_none=True)
                losses.append(loss.item())
            assert all(math.isfinite(value) for value in losses), (option, losses)
            assert all(torch.isfinite(p).all() for p in unet.parameters()), option
            assert any(not torch.equal(unet.state_dict()[name], initial[name]) for name in initial), option
    finally:
        trainer.objective = original_objective
        unet.load_state_dict(initial)


# ----------------------------------------------------------------------------- samples use the training schedule


@pytest.mark.parametrize(
    "objective_config",
    [
        ObjectiveConfig(prediction_type="v_prediction", zero_terminal_snr=True),
        ObjectiveConfig(prediction_type="epsilon", zero_terminal_snr=True, beta_schedule="linear", beta_end=0.02),
    ],
    ids=["v-ztsnr", "eps-ztsnr-linear"],
)
def test_samples_use_the_training_schedule(trainer, monkeypatch, objective_config):
    """The base (tiny_pipeline_dir) is epsilon/leading/SDXL betas: a sampler taken from it fails here."""
    captured = []

    def capturing_build_pipeline(*args, **kwargs):
        pipeline = build_pipeline(*args, **kwargs)
        captured.append(pipeline)
        return pipeline

    monkeypatch.setattr(trainer_module, "build_pipeline", capturing_build_pipeline)
    monkeypatch.setattr(trainer, "objective", DiffusionObjective(objective_config))
    path = trainer.sample()
    assert path is not None and path.is_file()
    assert len(captured) == 1
    scheduler = captured[0].scheduler
    objective = trainer.objective
    assert scheduler.config.prediction_type == objective_config.prediction_type
    assert scheduler.config.timestep_spacing == "trailing"
    torch.testing.assert_close(scheduler.alphas_cumprod.double(), objective.alphas_cumprod, atol=1e-6, rtol=1e-4)
    scheduler.set_timesteps(trainer.config.sample.num_inference_steps)
    assert int(scheduler.timesteps[0]) == objective_config.num_train_timesteps - 1  # starts from pure noise
    # The grid has one row of raw and one of EMA weights.
    assert Image.open(path).height == 14 + 2 * SAMPLE_SIZE


def test_guidance_rescale_reaches_the_pipeline(trainer, monkeypatch):
    from diffusers.pipelines.stable_diffusion_xl import pipeline_stable_diffusion_xl as sdxl_module

    calls = []
    original = sdxl_module.rescale_noise_cfg

    def counting(noise_cfg, noise_pred_text, guidance_rescale=0.0):
        calls.append(guidance_rescale)
        return original(noise_cfg, noise_pred_text, guidance_rescale=guidance_rescale)

    monkeypatch.setattr(sdxl_module, "rescale_noise_cfg", counting)
    components = trainer.components
    pipeline = build_pipeline(components, trainer.accelerator.unwrap_model(trainer.unet), trainer.objective.scheduler_config())
    settings = dict(seed=0, num_inference_steps=1, guidance_scale=2.0, width=SAMPLE_SIZE, height=SAMPLE_SIZE)
    first = generate_samples(pipeline, ["completely white"], guidance_rescale=0.7, **settings)
    assert calls == [0.7]
    generate_samples(pipeline, ["completely white"], guidance_rescale=0.0, **settings)
    assert calls == [0.7]
    again = generate_samples(pipeline, ["completely white"], guidance_rescale=0.7, **settings)
    assert np.array_equal(np.asarray(first[0]), np.asarray(again[0]))  # fixed seeds: the same image


# ----------------------------------------------------------------------------- validation loss


def test_validation_loss_is_fixed_for_fixed_weights(trainer):
    unet = trainer.accelerator.unwrap_model(trainer.unet)
    first = trainer._validation_loss(unet)
    # Training randomness in between must not move the validation numbers.
    torch.randn(1000)
    trainer.objective.sample_noise(torch.zeros(4, 4, 8, 8), trainer.generator)
    second = trainer._validation_loss(unet)
    assert first == second
    assert first.timesteps == tuple(validation_timesteps(1000).tolist())
    assert len(first.timesteps) == 8 and first.timesteps[0] == 0 and first.timesteps[-1] == 999
    assert all(math.isfinite(v) for v in first.unweighted + first.weighted)
    weights = trainer.objective.loss_weights(torch.tensor(first.timesteps)).tolist()
    for unweighted, weighted, weight in zip(first.unweighted, first.weighted, weights):
        assert weighted == pytest.approx(unweighted * weight, rel=1e-5, abs=1e-12)
    assert first.items == len(trainer.validation_dataset)

    with torch.no_grad():
        next(unet.parameters()).add_(0.05)
    try:
        assert trainer._validation_loss(unet) != first  # the number does measure the weights
    finally:
        with torch.no_grad():
            next(unet.parameters()).sub_(0.05)


def test_held_out_images_are_not_trained_on(trainer, small_demo_dir):
    validation = trainer.validation_dataset
    assert validation is not None and len(validation) >= 1
    train_sources = {trainer.dataset.source(i) for i in range(len(trainer.dataset))}
    held_out = {validation.source(i) for i in range(len(validation))}
    assert not train_sources & held_out
    assert len(train_sources | held_out) == len(list(Path(small_demo_dir).glob("*.png")))


def test_split_is_deterministic_and_stable(tmp_path):
    records = [SimpleNamespace(path=tmp_path / f"sub/img_{i:04d}.png", repeats=1) for i in range(2000)]
    training, validation = split_validation(records, tmp_path, 0.1)
    assert len(training) + len(validation) == 2000
    assert 150 < len(validation) < 250
    again = split_validation(list(reversed(records)), tmp_path, 0.1)[1]
    assert {r.path for r in again} == {r.path for r in validation}
    # Adding files never moves an existing file to the other side.
    more = records + [SimpleNamespace(path=tmp_path / f"new_{i}.png", repeats=1) for i in range(300)]
    assert {r.path for r in validation} <= {r.path for r in split_validation(more, tmp_path, 0.1)[1]}
    # The key is the path relative to the root: moving the dataset keeps the split.
    assert split_position("sub/img_0001.png") == split_position(Path("sub/img_0001.png").as_posix())
    two = records[:2]
    train_two, val_two = split_validation(two, tmp_path, 0.01)
    assert len(train_two) == 1 and len(val_two) == 1
    assert split_validation(records, tmp_path, 0.0) == (records, [])


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_pipeline_dir, small_demo_dir, shared_cache) -> Path:
    output = tmp_path_factory.mktemp("finished-run")
    overrides = run_overrides(tiny_pipeline_dir, small_demo_dir, shared_cache, output) + ["train.validate_every=1"]
    run = Trainer(load_config(None, overrides))
    run.setup()
    run.train()
    run.finish()
    return output


def test_training_logs_validation_per_timestep_bin(finished_run):
    summary = json.loads((finished_run / "summary.json").read_text())
    assert math.isfinite(summary["validation_loss"])
    assert summary["validation_loss"] == summary["validation"]["ema"]["loss"]  # final/ holds EMA weights
    assert set(summary["validation"]) == {"raw", "ema"}
    assert len(summary["validation"]["raw"]["by_timestep"]) == 8
    log_text = (finished_run / "train.log").read_text()
    assert "validation (raw weights) at step 1" in log_text  # validate_every=1, before the end
    assert "validation (ema weights) at step 2" in log_text  # and at the end
    assert "t999=" in log_text and "t0=" in log_text
    assert "validation loss" in (finished_run / "README.md").read_text()

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(finished_run / "logs"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    for t in validation_timesteps(1000).tolist():
        assert f"validation/raw/unweighted/t{t:04d}" in tags
        assert f"validation/ema/weighted/t{t:04d}" in tags
    assert [event.step for event in events.Scalars("validation/raw/loss")] == [1, 2]


def test_saved_pipeline_carries_the_training_scheduler(finished_run):
    folder = finished_run / "final" / "scheduler"
    saved = json.loads((folder / "scheduler_config.json").read_text())
    assert saved["prediction_type"] == "v_prediction"
    assert saved["rescale_betas_zero_snr"] is True
    assert saved["timestep_spacing"] == "trailing"
    scheduler = EulerDiscreteScheduler.from_pretrained(folder)
    objective = DiffusionObjective(ObjectiveConfig())
    torch.testing.assert_close(scheduler.alphas_cumprod.double(), objective.alphas_cumprod, atol=1e-6, rtol=1e-4)
    assert model_validator.saved_scheduler_problems(finished_run / "final", ObjectiveConfig()) == []
    assert model_validator.saved_scheduler_problems(finished_run / "final", ObjectiveConfig(prediction_type="epsilon"))


# ----------------------------------------------------------------------------- check_model


@pytest.fixture(scope="module")
def tiny_components():
    tiny = build_tiny_components(DEMO_WORDS, seed=0)
    base_scheduler = DiffusionObjective(ObjectiveConfig(prediction_type="epsilon", zero_terminal_snr=False)).scheduler_config()
    return SimpleNamespace(**vars(tiny), scheduler_config=base_scheduler)


def _with_unet(components, **changes):
    config = {**tiny_unet_config(), **changes}
    return SimpleNamespace(**{**vars(components), "unet": UNet2DConditionModel(**config)})


def test_check_model_passes_a_consistent_model(tiny_components):
    assert check_model(tiny_components, ObjectiveConfig()) == []
    notes = require_valid_model(tiny_components, ObjectiveConfig())
    # The epsilon/leading base differs from a v/ZTSNR objective: expected, reported as info only.
    assert notes and "expected" in notes[0]
    assert any("prediction_type" in note for note in notes) and any("trailing" in note for note in notes)
    assert require_valid_model(tiny_components, ObjectiveConfig(prediction_type="epsilon", zero_terminal_snr=False)) == []


def test_guidance_warns_when_the_unconditional_branch_keeps_the_base_objective(tiny_components):
    base = tiny_components.scheduler_config  # epsilon, SDXL betas
    v_ztsnr = ObjectiveConfig(prediction_type="v_prediction", zero_terminal_snr=True)
    warnings = unconditional_branch_warnings(base, v_ztsnr, caption_dropout=0.0, guidance_scale=5.0)
    assert len(warnings) == 1
    assert "prediction type epsilon -> v_prediction and noise schedule" in warnings[0]
    assert "data.caption_dropout" in warnings[0]
    only_ztsnr = ObjectiveConfig(prediction_type="epsilon", zero_terminal_snr=True)
    assert "noise schedule" in unconditional_branch_warnings(base, only_ztsnr, caption_dropout=0.0, guidance_scale=5.0)[0]
    # Fine when captions are dropped, when no guidance is used, or when the objective is the base's.
    assert unconditional_branch_warnings(base, v_ztsnr, caption_dropout=0.1, guidance_scale=5.0) == []
    assert unconditional_branch_warnings(base, v_ztsnr, caption_dropout=0.0, guidance_scale=1.0) == []
    same = ObjectiveConfig(prediction_type="epsilon", zero_terminal_snr=False)
    assert unconditional_branch_warnings(base, same, caption_dropout=0.0, guidance_scale=5.0) == []


def test_check_model_catches_cross_attention_mismatch(tiny_components):
    broken = _with_unet(tiny_components, cross_attention_dim=64)
    problems = check_model(broken, ObjectiveConfig())
    assert len(problems) == 1 and "cross_attention_dim = 64" in problems[0] and "96" in problems[0]
    with pytest.raises(ModelCheckError, match="cross_attention_dim"):
        require_valid_model(broken, ObjectiveConfig())


def test_check_model_catches_add_embedding_mismatch(tiny_components):
    broken = _with_unet(tiny_components, projection_class_embeddings_input_dim=64 + 6 * 8 + 8)
    problems = check_model(broken, ObjectiveConfig())
    assert len(problems) == 1 and "projection_class_embeddings_input_dim = 120" in problems[0]
    assert "= 112" in problems[0]


def test_check_model_catches_non_finite_weights(tiny_components):
    broken = _with_unet(tiny_components)
    broken.unet.load_state_dict(tiny_components.unet.state_dict())
    assert check_model(broken, ObjectiveConfig()) == []
    with torch.no_grad():
        broken.unet.conv_in.weight[0, 0, 0, 0] = float("nan")
        broken.unet.conv_out.bias[1] = float("inf")
    problems = check_model(broken, ObjectiveConfig())
    assert len(problems) == 1
    assert "conv_in.weight (1 of" in problems[0] and "conv_out.bias" in problems[0]


def test_check_model_catches_a_sampler_that_does_not_match_training(tiny_components):
    objective = ObjectiveConfig(prediction_type="v_prediction", zero_terminal_snr=True)
    good = DiffusionObjective(objective).scheduler_config()
    leading = {**good, "timestep_spacing": "leading", "steps_offset": 1}
    problems = check_model(tiny_components, objective, sampler_config=leading, check_weights=False)
    assert len(problems) == 1 and "trailing" in problems[0] and "t=999" in problems[0]
    eps = {**good, "prediction_type": "epsilon"}
    assert "prediction_type='epsilon'" in check_model(tiny_components, objective, sampler_config=eps, check_weights=False)[0]
    no_ztsnr = {**good, "rescale_betas_zero_snr": False}
    assert "noise schedule" in check_model(tiny_components, objective, sampler_config=no_ztsnr, check_weights=False)[0]


# ----------------------------------------------------------------------------- the validate command


def _write_config(tmp_path, pipeline_dir, data_dir, cache_dir) -> Path:
    overrides = run_overrides(pipeline_dir, data_dir, cache_dir, tmp_path / "run")
    config = load_config(None, overrides)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    return path


def test_validate_command_checks_and_writes_a_grid(tmp_path, tiny_pipeline_dir, small_demo_dir, shared_cache, capsys):
    config = _write_config(tmp_path, tiny_pipeline_dir, small_demo_dir, shared_cache)
    assert main(["validate", str(config)]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    grid = tmp_path / "run" / "samples" / "validate.png"
    assert result["ok"] is True and Path(result["sample"]) == grid and grid.is_file()
    assert result["notes"]  # epsilon base, v/ZTSNR training: an info line, not an error
    loaded = load_config(config, [])
    assert bool(result["warnings"]) == (loaded.data.caption_dropout == 0 and loaded.sample.guidance_scale > 1)
    assert Image.open(grid).height == 14 + 2 * SAMPLE_SIZE  # base sampler row + training sampler row


def test_validate_bad_config_exits_2(tmp_path, tiny_pipeline_dir, small_demo_dir, shared_cache, capsys):
    config = _write_config(tmp_path, tiny_pipeline_dir, small_demo_dir, shared_cache)
    assert main(["validate", str(config), "objective.prediction_type=x0"]) == 2
    assert "prediction_type" in capsys.readouterr().err


def test_validate_broken_model_exits_2(tmp_path, tiny_pipeline_dir, small_demo_dir, shared_cache, capsys):
    broken_dir = tmp_path / "broken-model"
    shutil.copytree(tiny_pipeline_dir, broken_dir)
    tiny = build_tiny_components(DEMO_WORDS, seed=0)
    tiny.unet = UNet2DConditionModel(**{**tiny_unet_config(), "cross_attention_dim": 64})
    save_as_pipeline(tiny, EulerDiscreteScheduler.from_pretrained(tiny_pipeline_dir / "scheduler"), broken_dir)
    config = _write_config(tmp_path, broken_dir, small_demo_dir, shared_cache)
    assert main(["validate", str(config)]) == 2
    err = capsys.readouterr().err
    assert "cross_attention_dim = 64" in err and "96" in err
