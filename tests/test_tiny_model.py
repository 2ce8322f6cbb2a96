import pytest
import torch
from diffusers import EulerDiscreteScheduler
from transformers import CLIPTokenizer

from sdxl_trainer.models.tiny import (
    ADDITION_TIME_EMBED_DIM,
    BOS_TOKEN,
    END_OF_WORD,
    EOS_TOKEN,
    build_clip_tokenizer,
    build_tiny_components,
    build_tiny_tokenizers,
    bytes_to_unicode,
    save_as_pipeline,
)

WORDS = ["red", "blue", "green", "circle", "square", "triangle", "a", "on", "background", "reed"]


@pytest.fixture(scope="module")
def tokenizers():
    return build_tiny_tokenizers(WORDS)


@pytest.fixture(scope="module")
def components():
    return build_tiny_components(WORDS, seed=0)


def test_vocab_is_byte_alphabet_then_learned_merges_then_specials(tokenizers):
    tokenizer, _ = tokenizers
    vocab = tokenizer.get_vocab()
    alphabet = list(bytes_to_unicode().values())
    assert len(alphabet) == len(set(alphabet)) == 256
    for index, char in enumerate(alphabet):
        assert vocab[char] == index
        assert vocab[char + END_OF_WORD] == 256 + index
    for word in WORDS:
        assert word + END_OF_WORD in vocab
    assert vocab[BOS_TOKEN] == len(vocab) - 2
    assert vocab[EOS_TOKEN] == len(vocab) - 1
    assert tokenizer.eos_token_id == len(vocab) - 1
    # Only pieces needed to build the given words were learned.
    assert "zebra" + END_OF_WORD not in vocab


def test_each_known_word_is_one_token_case_insensitive(tokenizers):
    for tokenizer in tokenizers:
        for word in WORDS:
            ids = tokenizer(word, add_special_tokens=False).input_ids
            assert tokenizer.convert_ids_to_tokens(ids) == [word + END_OF_WORD]
            assert tokenizer(word.upper(), add_special_tokens=False).input_ids == ids


def test_unknown_text_falls_back_to_pieces(tokenizers):
    tokenizer, _ = tokenizers
    ids = tokenizer("zebra", add_special_tokens=False).input_ids
    tokens = tokenizer.convert_ids_to_tokens(ids)
    assert len(tokens) > 1
    assert "".join(tokens) == "zebra" + END_OF_WORD
    ids = tokenizer("red, blue; café 42", add_special_tokens=True).input_ids
    assert ids.count(tokenizer.eos_token_id) == 1  # no unknown tokens (unk is <|endoftext|>)
    assert ids[-1] == tokenizer.eos_token_id


def test_round_trip_decode(tokenizers):
    for tokenizer in tokenizers:
        ids = tokenizer("A  Red circle\ton zebra background", padding="max_length", max_length=77).input_ids
        assert tokenizer.decode(ids, skip_special_tokens=True) == "a red circle on zebra background"


def test_padding_and_truncation_like_sdxl(tokenizers):
    tokenizer, tokenizer_2 = tokenizers
    assert tokenizer.pad_token_id == tokenizer.eos_token_id
    assert tokenizer_2.pad_token == "!"
    assert tokenizer_2.pad_token_id == tokenizer_2.convert_tokens_to_ids("!") == 0
    for tok in tokenizers:
        assert tok.model_max_length == 77
        ids = tok("a red circle", padding="max_length", max_length=tok.model_max_length).input_ids
        assert len(ids) == 77
        assert ids[:5] == [tok.bos_token_id] + tok("a red circle", add_special_tokens=False).input_ids + [
            tok.eos_token_id
        ]
        assert set(ids[5:]) == {tok.pad_token_id}
        long_ids = tok(" ".join(["red"] * 100), truncation=True, max_length=77).input_ids
        assert len(long_ids) == 77 and long_ids[-1] == tok.eos_token_id


def test_save_and_reload_gives_identical_ids(tokenizers, tmp_path):
    texts = ["a red circle", "Zebra, on GREEN! background", ""]
    for index, tokenizer in enumerate(tokenizers):
        folder = tmp_path / f"tok{index}"
        tokenizer.save_pretrained(folder)
        reloaded = CLIPTokenizer.from_pretrained(folder)
        kwargs = {"padding": "max_length", "max_length": 77, "truncation": True}
        assert reloaded(texts, **kwargs).input_ids == tokenizer(texts, **kwargs).input_ids
        assert reloaded.pad_token_id == tokenizer.pad_token_id
        assert reloaded.model_max_length == 77


def test_tokenizer_does_not_depend_on_word_order():
    first = build_clip_tokenizer(WORDS)
    second = build_clip_tokenizer(list(reversed(WORDS)) + ["red"])
    assert first.get_vocab() == second.get_vocab()


def test_shapes(components):
    with torch.no_grad():
        image = torch.randn(2, 3, 64, 64)
        latents = components.vae.encode(image).latent_dist.mean
        assert latents.shape == (2, 4, 8, 8)
        assert components.vae.decode(latents).sample.shape == (2, 3, 64, 64)

        ids = components.tokenizer(["a red circle"] * 2, padding="max_length", return_tensors="pt").input_ids
        ids_2 = components.tokenizer_2(["a red circle"] * 2, padding="max_length", return_tensors="pt").input_ids
        hidden = components.text_encoder(ids, output_hidden_states=True).hidden_states[-2]
        out_2 = components.text_encoder_2(ids_2, output_hidden_states=True)
        context = torch.cat([hidden, out_2.hidden_states[-2]], dim=-1)
        added = {"text_embeds": out_2.text_embeds, "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2)}
        noise_pred = components.unet(latents, torch.tensor([10, 500]), context, added_cond_kwargs=added).sample
    assert noise_pred.shape == latents.shape
    assert torch.isfinite(noise_pred).all()


def test_config_relations(components):
    unet = components.unet.config
    hidden_1 = components.text_encoder.config.hidden_size
    hidden_2 = components.text_encoder_2.config.hidden_size
    projection = components.text_encoder_2.config.projection_dim
    assert unet.cross_attention_dim == hidden_1 + hidden_2
    assert unet.addition_embed_type == "text_time"
    assert unet.addition_time_embed_dim == ADDITION_TIME_EMBED_DIM
    assert unet.projection_class_embeddings_input_dim == projection + 6 * unet.addition_time_embed_dim
    assert unet.use_linear_projection
    assert list(unet.down_block_types) == ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"]
    assert list(unet.up_block_types) == ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"]
    assert 2 ** (len(components.vae.config.block_out_channels) - 1) == 8
    assert components.vae.config.latent_channels == 4
    for encoder, tokenizer in [
        (components.text_encoder, components.tokenizer),
        (components.text_encoder_2, components.tokenizer_2),
    ]:
        assert encoder.config.vocab_size == len(tokenizer)
        assert encoder.config.eos_token_id == tokenizer.eos_token_id
        assert encoder.config.max_position_embeddings == 77


def test_pooled_output_is_read_at_the_first_eos(components):
    captions = ["a red circle", "green square on blue background"]
    with torch.no_grad():
        # Tokenizer 1 pads with <|endoftext|>: the pooled token must be the first one, not the last.
        ids = components.tokenizer(captions, padding="max_length", return_tensors="pt").input_ids
        first_eos = (ids == components.tokenizer.eos_token_id).int().argmax(dim=-1)
        assert (first_eos < 76).all()
        out = components.text_encoder(ids)
        rows = torch.arange(len(captions))
        assert torch.equal(out.pooler_output, out.last_hidden_state[rows, first_eos])
        assert not torch.allclose(out.pooler_output, out.last_hidden_state[:, -1])

        ids_2 = components.tokenizer_2(captions, padding="max_length", return_tensors="pt").input_ids
        first_eos_2 = (ids_2 == components.tokenizer_2.eos_token_id).int().argmax(dim=-1)
        out_2 = components.text_encoder_2(ids_2)
        expected = components.text_encoder_2.text_projection(out_2.last_hidden_state[rows, first_eos_2])
        torch.testing.assert_close(out_2.text_embeds, expected)


def _parameter_count(module):
    return sum(parameter.numel() for parameter in module.parameters())


def test_sizes_are_small(components, tmp_path):
    counts = {name: _parameter_count(module) for name, module in components.models().items()}
    assert 1_000_000 <= counts["unet"] <= 3_000_000
    assert sum(counts.values()) < 10_000_000
    folder = save_as_pipeline(components, EulerDiscreteScheduler(), tmp_path / "fp16", dtype=torch.float16)
    weight_bytes = sum(path.stat().st_size for path in folder.rglob("*.safetensors"))
    assert len(list(folder.rglob("*.safetensors"))) == 4
    assert weight_bytes < 20_000_000
    # Saving in fp16 leaves the caller's fp32 modules alone.
    assert components.unet.dtype == torch.float32


def test_init_is_deterministic_given_seed():
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    first = build_tiny_components(WORDS, seed=0)
    assert torch.equal(torch.rand(1), expected_next)  # the caller's RNG stream is untouched
    second = build_tiny_components(WORDS, seed=0)
    other = build_tiny_components(WORDS, seed=1)
    for name, module in first.models().items():
        state, state_2 = module.state_dict(), second.models()[name].state_dict()
        assert all(torch.equal(state[key], state_2[key]) for key in state)
        state_other = other.models()[name].state_dict()
        assert any(not torch.equal(state[key], state_other[key]) for key in state)


def test_base_recipe_builds_a_pipeline_and_can_reuse_its_vae(tmp_path):
    import json

    from diffusers import AutoencoderKL, StableDiffusionXLPipeline
    from safetensors.torch import load_file

    from sdxl_trainer.models.tiny_base import TinyBaseRecipe, build_tiny_base

    recipe = TinyBaseRecipe(num_images=8, resolution=64, vae_steps=2, vae_batch_size=2, vae_crop=32, unet_steps=2, unet_batch_size=2)
    first = tmp_path / "first"
    figures = build_tiny_base(first, tmp_path / "work1", recipe)
    assert all(torch.isfinite(torch.tensor(figures[key])) for key in ("vae_final_loss", "unet_final_loss", "vae_scaling_factor"))
    assert StableDiffusionXLPipeline.from_pretrained(first, local_files_only=True).scheduler.config.prediction_type == "epsilon"

    second = tmp_path / "second"
    reused = build_tiny_base(second, tmp_path / "work2", recipe, vae_from=first)
    assert reused["vae_reused"] is True and reused["vae_final_loss"] == figures["vae_final_loss"]
    vae_file = "vae/diffusion_pytorch_model.safetensors"
    before, after = load_file(first / vae_file), load_file(second / vae_file)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert json.loads((second / "training.json").read_text())["figures"]["vae_reused"] is True
    assert AutoencoderKL.from_pretrained(second / "vae").config.scaling_factor == pytest.approx(reused["vae_scaling_factor"])
    with pytest.raises(ValueError, match="different VAE recipe"):
        build_tiny_base(tmp_path / "third", tmp_path / "work3", TinyBaseRecipe(**{**recipe.__dict__, "vae_steps": 3}), vae_from=first)
