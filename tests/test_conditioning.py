import pytest
import torch
from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

from sdxl_trainer.models.conditioning import batch_time_ids, encode_prompts, time_ids
from sdxl_trainer.models.tiny import build_tiny_components

WORDS = ["red", "blue", "green", "circle", "square", "a", "on", "background"]


@pytest.fixture(scope="module")
def components():
    return build_tiny_components(WORDS, seed=3)


@pytest.fixture(scope="module")
def pipeline(components):
    return StableDiffusionXLPipeline(
        vae=components.vae,
        text_encoder=components.text_encoder,
        text_encoder_2=components.text_encoder_2,
        tokenizer=components.tokenizer,
        tokenizer_2=components.tokenizer_2,
        unet=components.unet,
        scheduler=EulerDiscreteScheduler(),
    )


def test_encode_prompts_matches_the_sdxl_pipeline(components, pipeline):
    captions = ["a red circle", "green square on blue background", "a zebra, purple!", ""]
    with torch.no_grad():
        ours = encode_prompts(
            captions,
            (components.tokenizer, components.tokenizer_2),
            (components.text_encoder, components.text_encoder_2),
        )
        prompt_embeds, _, pooled, _ = pipeline.encode_prompt(
            captions, device=torch.device("cpu"), do_classifier_free_guidance=False
        )
    hidden = components.text_encoder.config.hidden_size + components.text_encoder_2.config.hidden_size
    assert ours.prompt_embeds.shape == (4, 77, hidden)
    assert ours.pooled_prompt_embeds.shape == (4, components.text_encoder_2.config.projection_dim)
    torch.testing.assert_close(ours.prompt_embeds, prompt_embeds, atol=1e-6, rtol=0)
    torch.testing.assert_close(ours.pooled_prompt_embeds, pooled, atol=1e-6, rtol=0)
    # Different captions give different embeddings (the comparison above is not vacuous).
    assert not torch.allclose(ours.prompt_embeds[0], ours.prompt_embeds[1])


def test_encode_prompts_requires_an_encoder_with_projection(components):
    with pytest.raises(ValueError, match="CLIPTextModelWithProjection"):
        encode_prompts(
            ["a red circle"],
            (components.tokenizer, components.tokenizer),
            (components.text_encoder, components.text_encoder),
        )


def test_encode_prompts_rejects_a_single_string(components):
    with pytest.raises(TypeError):
        encode_prompts(
            "a red circle",
            (components.tokenizer, components.tokenizer_2),
            (components.text_encoder, components.text_encoder_2),
        )


@pytest.mark.parametrize(
    "original, crop, target",
    [((1024, 1024), (0, 0), (1024, 1024)), ((768, 1344), (12, 34), (512, 896))],
)
def test_time_ids_match_the_sdxl_pipeline(pipeline, components, original, crop, target):
    expected = pipeline._get_add_time_ids(
        original,
        crop,
        target,
        dtype=torch.float32,
        text_encoder_projection_dim=components.text_encoder_2.config.projection_dim,
    )
    ours = time_ids(original, crop, target)
    assert ours.shape == (6,) and ours.dtype == torch.float32
    assert torch.equal(ours.unsqueeze(0), expected)


def test_batch_time_ids_stacks_rows_in_order():
    ids = batch_time_ids([(100, 200), (300, 400)], [(1, 2), (3, 4)], [(64, 64), (128, 64)])
    assert torch.equal(
        ids, torch.tensor([[100.0, 200, 1, 2, 64, 64], [300.0, 400, 3, 4, 128, 64]])
    )
    with pytest.raises(ValueError, match="batch sizes differ"):
        batch_time_ids([(100, 200)], [(1, 2), (3, 4)], [(64, 64)])
    with pytest.raises(ValueError, match="h, w"):
        time_ids((100,), (0, 0), (64, 64))
