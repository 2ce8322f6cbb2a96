import shutil

import numpy as np
import pytest
import torch
from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

from sdxl_trainer.models import setup
from sdxl_trainer.models.setup import (
    ModelLoadError,
    enable_gradient_checkpointing,
    freeze,
    load_components,
    resolve_pretrained,
)
from sdxl_trainer.models.tiny import build_tiny_components, save_as_pipeline

WORDS = ["red", "blue", "circle", "square", "a", "on"]


@pytest.fixture(scope="module")
def components():
    return build_tiny_components(WORDS, seed=7)


@pytest.fixture(scope="module")
def pipeline_folder(components, tmp_path_factory):
    return save_as_pipeline(components, EulerDiscreteScheduler(), tmp_path_factory.mktemp("tiny") / "pipe")


def test_saved_pipeline_loads_in_diffusers_and_generates(pipeline_folder):
    assert (pipeline_folder / "model_index.json").is_file()
    assert (pipeline_folder / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    pipeline = StableDiffusionXLPipeline.from_pretrained(pipeline_folder, local_files_only=True)
    image = pipeline(
        "a red circle",
        height=64,
        width=64,
        num_inference_steps=2,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).images
    assert image.shape == (1, 64, 64, 3)
    assert np.isfinite(image).all()


def test_load_components_returns_the_saved_weights(components, pipeline_folder):
    loaded = load_components(str(pipeline_folder))
    for name, module in components.models().items():
        expected, actual = module.state_dict(), getattr(loaded, name).state_dict()
        assert expected.keys() == actual.keys()
        assert all(torch.equal(expected[key], actual[key]) for key in expected), name
    for attribute in ("tokenizer", "tokenizer_2"):
        kwargs = {"padding": "max_length", "max_length": 77, "truncation": True}
        text = "a red zebra, on blue!"
        assert getattr(loaded, attribute)(text, **kwargs).input_ids == getattr(components, attribute)(
            text, **kwargs
        ).input_ids
    assert loaded.scheduler_config["_class_name"] == "EulerDiscreteScheduler"
    assert str(pipeline_folder.resolve()) in loaded.source


def test_load_components_applies_dtype(pipeline_folder):
    loaded = load_components(str(pipeline_folder), dtype=torch.float16)
    for module in (loaded.unet, loaded.vae, loaded.text_encoder, loaded.text_encoder_2):
        assert module.dtype == torch.float16


def test_missing_subfolders_are_named(pipeline_folder, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(pipeline_folder, broken)
    shutil.rmtree(broken / "text_encoder_2")
    (broken / "scheduler" / "scheduler_config.json").unlink()
    with pytest.raises(ModelLoadError) as info:
        load_components(str(broken))
    message = str(info.value)
    assert str(broken) in message
    missing = message.split("missing ", 1)[1].split(". ", 1)[0]
    assert missing == "text_encoder_2/, scheduler/scheduler_config.json"


def test_missing_weights_are_reported_as_model_load_error(pipeline_folder, tmp_path):
    broken = tmp_path / "no-weights"
    shutil.copytree(pipeline_folder, broken)
    (broken / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="vae/"):
        load_components(str(broken))


def test_builtin_without_assets_says_how_to_build(monkeypatch, tmp_path):
    monkeypatch.setattr(setup, "BUILTIN_MODELS", {"tiny-base": tmp_path / "not-built"})
    with pytest.raises(ModelLoadError, match="python scripts/build_tiny_base.py"):
        load_components("builtin:tiny-base")


def test_builtin_resolves_to_its_folder(monkeypatch, pipeline_folder):
    monkeypatch.setattr(setup, "BUILTIN_MODELS", {"tiny-base": pipeline_folder})
    assert resolve_pretrained("builtin:tiny-base") == pipeline_folder
    loaded = load_components("builtin:tiny-base")
    assert loaded.source.startswith("built-in tiny-base")


def test_unknown_builtin_lists_the_available_ones():
    with pytest.raises(ModelLoadError, match="builtin:tiny-base"):
        resolve_pretrained("builtin:huge")


def test_hub_ids_are_refused_offline_and_passed_through_online(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="HF_HUB_OFFLINE"):
        resolve_pretrained("someone/some-sdxl")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(setup.huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    assert resolve_pretrained("someone/some-sdxl") == "someone/some-sdxl"


def test_paths_that_do_not_exist_are_not_hub_ids(tmp_path):
    with pytest.raises(ModelLoadError, match="neither an existing local path"):
        resolve_pretrained(str(tmp_path / "missing" / "model"))
    with pytest.raises(ModelLoadError, match="did you mean 'builtin:tiny-base'"):
        resolve_pretrained("tiny-base")


def test_single_file_checkpoints_are_refused_clearly(tmp_path):
    checkpoint = tmp_path / "model.safetensors"
    checkpoint.write_bytes(b"")
    with pytest.raises(ModelLoadError, match="single-file"):
        load_components(str(checkpoint))


def test_freeze_and_gradient_checkpointing():
    encoder = build_tiny_components(WORDS, seed=7).text_encoder
    encoder.train()
    assert freeze(encoder) is encoder
    assert not encoder.training
    assert not any(parameter.requires_grad for parameter in encoder.parameters())

    unet = build_tiny_components(WORDS, seed=7).unet
    assert not unet.is_gradient_checkpointing
    assert enable_gradient_checkpointing(unet).is_gradient_checkpointing
