"""Exports: single-file SDXL in the original layout (round trip through diffusers' loader), diffusers folders, checkpoints."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from sdxl_trainer.main import main

# SDXL 1.0 base, as published (stabilityai/stable-diffusion-xl-base-1.0 */config.json).
SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(320, 640, 1280), attention_head_dim=(5, 10, 20), transformer_layers_per_block=(1, 2, 10),
    cross_attention_dim=2048, use_linear_projection=True, norm_num_groups=32,
    addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
)
SDXL_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32, sample_size=1024,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512), scaling_factor=0.13025,
)
SDXL_CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                   max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)
SDXL_CLIP_G = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                   max_position_embeddings=77, hidden_act="gelu", projection_dim=1280)


def _shapes(state: dict) -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in state.items() if not k.endswith("position_ids")}


def test_sdxl_architecture_exports_the_keys_diffusers_conversion_expects():
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders import single_file_utils as sfu
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from sdxl_trainer.utils.export import sdxl_single_file_state_dict

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SDXL_UNET)
        vae = AutoencoderKL(**SDXL_VAE)
        clip_l = CLIPTextModel(CLIPTextConfig(**SDXL_CLIP_L))
        clip_g = CLIPTextModelWithProjection(CLIPTextConfig(**SDXL_CLIP_G))
    exported = sdxl_single_file_state_dict(unet.state_dict(), dict(unet.config), vae.state_dict(), dict(vae.config),
                                           clip_l.state_dict(), clip_g.state_dict())
    assert all(t.is_meta for t in exported.values())
    # diffusers recognises the file as SDXL base by its keys
    assert sfu.infer_diffusers_model_type(exported) == "xl_base"
    # well-known keys of sd_xl_base_1.0.safetensors, with their shapes
    known = {
        "model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3),
        "model.diffusion_model.label_emb.0.0.weight": (1280, 2816),
        "model.diffusion_model.input_blocks.8.1.transformer_blocks.9.attn2.to_k.weight": (1280, 2048),
        "model.diffusion_model.middle_block.1.transformer_blocks.9.ff.net.0.proj.weight": (10240, 1280),
        "model.diffusion_model.output_blocks.2.2.conv.weight": (1280, 1280, 3, 3),
        "model.diffusion_model.output_blocks.5.2.conv.weight": (640, 640, 3, 3),
        "model.diffusion_model.output_blocks.6.0.skip_connection.weight": (320, 960, 1, 1),
        "model.diffusion_model.out.2.weight": (4, 320, 3, 3),
        "first_stage_model.encoder.mid.attn_1.q.weight": (512, 512, 1, 1),
        "first_stage_model.decoder.up.3.upsample.conv.weight": (512, 512, 3, 3),
        "first_stage_model.decoder.up.0.block.0.nin_shortcut.weight": (128, 256, 1, 1),
        "conditioner.embedders.0.transformer.text_model.encoder.layers.11.mlp.fc2.weight": (768, 3072),
        "conditioner.embedders.0.transformer.text_model.embeddings.position_embedding.weight": (77, 768),
        "conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight": (3840, 1280),
        "conditioner.embedders.1.model.transformer.resblocks.0.mlp.c_fc.weight": (5120, 1280),
        "conditioner.embedders.1.model.text_projection": (1280, 1280),
        "conditioner.embedders.1.model.positional_embedding": (77, 1280),
        "conditioner.embedders.1.model.ln_final.weight": (1280,),
    }
    for key, shape in known.items():
        assert tuple(exported[key].shape) == shape, key

    # diffusers' own original -> diffusers conversion gives back exactly each model's keys and shapes
    converted_unet = sfu.convert_ldm_unet_checkpoint(exported, dict(unet.config))
    assert _shapes(converted_unet) == _shapes(unet.state_dict())
    converted_vae = sfu.convert_ldm_vae_checkpoint(exported, dict(vae.config))
    assert _shapes(converted_vae) == _shapes(vae.state_dict())
    converted_l = {k.removeprefix("text_model."): v for k, v in sfu.convert_ldm_clip_checkpoint(exported).items()}
    assert _shapes(converted_l) == _shapes(clip_l.state_dict())
    converted_g = sfu.convert_open_clip_checkpoint(clip_g, exported, prefix="conditioner.embedders.1.model.")
    assert _shapes(converted_g) == _shapes(clip_g.state_dict())
    # and nothing is left over
    assert len(exported) == len(converted_unet) + len(converted_vae) + len(converted_l) + len(converted_g) - 64 * 2


def test_tiny_single_file_round_trip_generates_the_same_image(tiny_pipeline_dir, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    out = tmp_path / "tiny.safetensors"
    assert main(["export", str(tiny_pipeline_dir), "--format", "single-file", "--out", str(out)]) == 0
    with safe_open(str(out), "pt") as handle:
        metadata = handle.metadata()
        keys = set(handle.keys())
    assert metadata["modelspec.architecture"] == "stable-diffusion-xl-v1-base"
    assert metadata["modelspec.prediction_type"] == "epsilon"
    assert {k.split(".")[0] for k in keys} == {"model", "first_stage_model", "conditioner"}

    reference = StableDiffusionXLPipeline.from_pretrained(tiny_pipeline_dir, local_files_only=True)
    loaded = StableDiffusionXLPipeline.from_single_file(str(out), config=str(tiny_pipeline_dir), local_files_only=True)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        a, b = getattr(reference, name).state_dict(), getattr(loaded, name).state_dict()
        assert a.keys() == b.keys(), name
        assert all(torch.equal(a[k], b[k]) for k in a), name
    kwargs = dict(prompt="red circle", num_inference_steps=2, height=64, width=64, output_type="np")
    image_a = reference(**kwargs, generator=torch.Generator().manual_seed(0)).images
    image_b = loaded(**kwargs, generator=torch.Generator().manual_seed(0)).images
    assert float(abs(image_a - image_b).max()) == 0.0


def test_training_loads_a_single_file_with_its_config_dir(tiny_pipeline_dir, tmp_path):
    from sdxl_trainer.models.setup import ModelLoadError, load_components

    out = tmp_path / "tiny.safetensors"
    assert main(["export", str(tiny_pipeline_dir), "--format", "single-file", "--out", str(out)]) == 0
    components = load_components(str(out), config_dir=tiny_pipeline_dir)
    reference = load_components(str(tiny_pipeline_dir))
    assert "single file" in components.source
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        a, b = getattr(reference, name).state_dict(), getattr(components, name).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), name
    assert components.scheduler_config == reference.scheduler_config
    with pytest.raises(ModelLoadError, match="model.config_dir"):
        load_components(str(out))


def _checkpoint_of_tiny(tiny_pipeline_dir, folder):
    """A checkpoint as the trainer writes it: raw UNet and EMA weights that differ from the base and from each other."""
    from sdxl_trainer.config import Config, dump_config
    from sdxl_trainer.models.setup import load_components
    from sdxl_trainer.training.setup import build_ema
    from sdxl_trainer.utils import checkpoint as ckpt

    config = Config.model_validate({"model": {"pretrained": str(tiny_pipeline_dir)}, "objective": {"prediction_type": "v_prediction"}})
    unet = load_components(str(tiny_pipeline_dir)).unet
    ema = build_ema(unet, enabled=True, decay=0.9, warmup=False)
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.01)
        for s in ema.shadow_params:
            s.sub_(0.02)
    request = ckpt.SaveRequest(step=3, epoch=0, unet=unet, ema=ema, objects={}, rng_states=[ckpt.capture_rng_state(None)],
                               config_tree=config.model_dump(mode="json"), config_yaml=dump_config(config))
    return ckpt.save_checkpoint(folder, request), unet, ema


def test_export_of_a_checkpoint_picks_raw_or_ema_weights_and_dtype(tiny_pipeline_dir, tmp_path):
    from diffusers import UNet2DConditionModel

    folder, unet, ema = _checkpoint_of_tiny(tiny_pipeline_dir, tmp_path / "run" / "checkpoints")
    raw_file = tmp_path / "raw-fp16.safetensors"
    assert main(["export", str(folder), "--format", "single-file", "--out", str(raw_file), "--no-ema", "--dtype", "fp16"]) == 0
    exported = load_file(str(raw_file))
    conv_in = exported["model.diffusion_model.input_blocks.0.0.weight"]
    assert conv_in.dtype == torch.float16
    assert torch.equal(conv_in, unet.conv_in.weight.detach().half())
    assert exported["v_pred"].numel() == 0 and exported["ztsnr"].numel() == 0  # ComfyUI/Forge sampling markers
    with safe_open(str(raw_file), "pt") as handle:
        metadata = handle.metadata()
    assert metadata["modelspec.prediction_type"] == "v"
    assert json.loads(metadata["sdxl_trainer.steps"]) == 3 and metadata["sdxl_trainer.final_weights"] == "raw"

    ema_dir = tmp_path / "ema-diffusers"
    assert main(["export", str(folder), "--format", "diffusers", "--out", str(ema_dir)]) == 0  # EMA by default
    ema_unet = UNet2DConditionModel.from_pretrained(ema_dir / "unet")
    names = [n for n, _ in unet.named_parameters()]
    shadow = dict(zip(names, ema.shadow_params))
    assert all(torch.equal(p, shadow[n]) for n, p in ema_unet.named_parameters())
    assert json.loads((ema_dir / "scheduler" / "scheduler_config.json").read_text())["prediction_type"] == "v_prediction"


def test_export_refuses_bad_requests(tiny_pipeline_dir, tmp_path, capsys):
    existing = tmp_path / "exists.safetensors"
    existing.write_bytes(b"")
    assert main(["export", str(tiny_pipeline_dir), "--format", "single-file", "--out", str(existing)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["export", str(tiny_pipeline_dir), "--format", "single-file", "--out", str(tmp_path / "x.safetensors"), "--ema"]) == 2
    assert "--ema/--no-ema need a run or a checkpoint" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "missing"), "--format", "diffusers", "--out", str(tmp_path / "o")]) == 2
