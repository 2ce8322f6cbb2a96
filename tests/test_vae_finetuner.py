"""VAE fine-tuning: streaming latent statistics, the loss, and tiny-model runs of run_vae_finetune."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline
from safetensors.torch import save_file

from sdxl_trainer.config import Config
from sdxl_trainer.data.buckets import Bucket
from sdxl_trainer.data.demo import DEMO_WORDS, write_demo_dataset
from sdxl_trainer.models.tiny import build_tiny_components, save_as_pipeline
from sdxl_trainer.models.vae_finetuner import (
    LatentStatistics,
    VAEFinetuneRecipe,
    VAEFinetuneSettings,
    VAELoss,
    all_gather_latent_statistics,
    check_crop_size,
    run_vae_finetune,
)
from sdxl_trainer.training.perceptual import LPIPS, MissingLPIPSWeightsError, NoPerceptualLoss


# ============================================================================ latent statistics


def two_pass(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference per-channel mean and population std of [N, C, H, W] in float64."""
    flat = values.double().transpose(0, 1).reshape(values.shape[1], -1)
    mean = flat.mean(dim=1)
    return mean, ((flat - mean[:, None]) ** 2).mean(dim=1).sqrt()


def random_latents(seed: int, count: int, mean: float = 0.0, std: float = 1.0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    channel_means = torch.tensor([0.5, -1.0, 2.0, 0.0], dtype=torch.float64)
    channel_stds = torch.tensor([1.0, 0.5, 3.0, 0.1], dtype=torch.float64)
    noise = torch.randn(count, 4, 6, 5, generator=generator, dtype=torch.float64)
    return mean + std * (channel_means[None, :, None, None] + channel_stds[None, :, None, None] * noise)


def streamed(batches) -> LatentStatistics:
    stats = LatentStatistics(4)
    for batch in batches:
        stats.update(batch)
    return stats


@pytest.mark.parametrize(("mean", "std"), [(0.0, 1.0), (1e4, 1e-2)])
def test_streaming_statistics_equal_two_pass(mean, std):
    latents = random_latents(0, 57, mean, std)
    stats = streamed(latents.split([1, 7, 20, 3, 26]))
    reference_mean, reference_std = two_pass(latents)
    assert torch.allclose(stats.mean, reference_mean, rtol=1e-12, atol=0)
    assert torch.allclose(stats.std, reference_std, rtol=1e-6, atol=0)
    everything = latents.flatten()
    assert stats.overall_mean == pytest.approx(everything.mean().item(), rel=1e-12)
    assert stats.overall_std == pytest.approx(everything.std(correction=0).item(), rel=1e-6)
    assert stats.count == 57 * 6 * 5


def test_large_offset_defeats_the_naive_formula_but_not_the_stream():
    latents = random_latents(1, 40, mean=1e4, std=1e-2)
    _, reference_std = two_pass(latents)
    flat = latents.transpose(0, 1).reshape(4, -1)
    naive_std = ((flat**2).mean(dim=1) - flat.mean(dim=1) ** 2).clamp(min=0).sqrt()
    assert not torch.allclose(naive_std, reference_std, rtol=1e-6)  # the test can tell stable from not
    assert torch.allclose(streamed(latents.split(3)).std, reference_std, rtol=1e-6)


def test_shards_merged_with_chan_equal_the_whole():
    latents = random_latents(2, 64, mean=1e4, std=1e-2)
    shards = [streamed(part.split(5)) for part in latents.split([10, 1, 30, 23])]
    merged = LatentStatistics(4)
    for shard in shards:
        merged.merge(shard)
    merged.merge(LatentStatistics(4))  # an empty shard (a rank without images) changes nothing
    reference_mean, reference_std = two_pass(latents)
    assert merged.count == 64 * 30
    assert torch.allclose(merged.mean, reference_mean, rtol=1e-12, atol=0)
    assert torch.allclose(merged.std, reference_std, rtol=1e-6)
    reverse = LatentStatistics(4)
    for shard in reversed(shards):
        reverse.merge(shard)
    assert torch.allclose(reverse.std, merged.std, rtol=1e-9)


def test_statistics_state_is_json_and_report_normalises_to_unit_variance():
    latents = random_latents(3, 30)
    stats = streamed(latents.split(4))
    restored = LatentStatistics(4)
    restored.load_state_dict(json.loads(json.dumps(stats.state_dict())))
    assert torch.equal(restored.mean, stats.mean) and torch.equal(restored.m2, stats.m2) and restored.count == stats.count
    report = stats.report(current_scaling_factor=0.13025, num_images=30)
    normalised = (latents - report["shift_factor"]) * report["scaling_factor"]
    assert normalised.mean().item() == pytest.approx(0.0, abs=1e-9)
    assert normalised.var(correction=0).item() == pytest.approx(1.0, rel=1e-9)
    assert (latents * report["scaling_factor_without_shift"]).pow(2).mean().item() == pytest.approx(1.0, rel=1e-9)
    assert report["channel_std"] == pytest.approx(two_pass(latents)[1].tolist(), rel=1e-9)
    with pytest.raises(ValueError, match="no latents"):
        LatentStatistics(4).std


def _gather_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        latents = random_latents(4, 21, mean=1e4, std=1e-2)
        mine = streamed(latents[rank::world_size].split(2))
        merged = all_gather_latent_statistics(mine)
        torch.save(merged.state_dict(), Path(out_dir) / f"rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


def test_all_gather_merges_ranks(tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    mp.spawn(_gather_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    reference_mean, reference_std = two_pass(random_latents(4, 21, mean=1e4, std=1e-2))
    states = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert states[0] == states[1]  # every rank holds the same merged numbers
    merged = LatentStatistics(4)
    merged.load_state_dict(states[0])
    assert merged.count == 21 * 30
    assert torch.allclose(merged.mean, reference_mean, rtol=1e-12, atol=0)
    assert torch.allclose(merged.std, reference_std, rtol=1e-6)
    # Without a process group the function is the identity.
    alone = streamed(random_latents(5, 3).split(1))
    assert all_gather_latent_statistics(alone).state_dict() == alone.state_dict()


# ============================================================================ loss and helpers


def test_vae_loss_terms_golden():
    loss = VAELoss(reconstruction="l1", reconstruction_weight=2.0, perceptual=NoPerceptualLoss(), perceptual_weight=1.0, kl_weight=0.5)
    target = torch.zeros(2, 3, 8, 8)
    reconstruction = torch.full((2, 3, 8, 8), 0.25)
    mean = torch.ones(2, 4, 1, 1)
    logvar = torch.zeros(2, 4, 1, 1)
    terms = loss(reconstruction, target, mean, logvar)
    assert terms["reconstruction"].tolist() == [0.25, 0.25]
    # KL of N(1, 1) to N(0, 1) is 0.5 per latent value; 4 values over 3*8*8 pixel values.
    assert terms["kl"].tolist() == pytest.approx([0.5 * 4 / 192] * 2)
    assert terms["total"].tolist() == pytest.approx([2 * 0.25 + 0.5 * 2 / 192] * 2)
    mse = VAELoss(reconstruction="mse", perceptual=NoPerceptualLoss())
    assert mse(reconstruction, target, mean, logvar)["reconstruction"].tolist() == [0.0625, 0.0625]
    with pytest.raises(ValueError, match="unknown reconstruction loss"):
        VAELoss(reconstruction="l2", perceptual=NoPerceptualLoss())


def test_crop_size_is_checked_against_buckets_and_the_latent_grid():
    check_crop_size(None, [Bucket(64, 64)], 8)
    check_crop_size(32, [Bucket(64, 64), Bucket(96, 32)], 8)
    with pytest.raises(ValueError, match="multiple of 8"):
        check_crop_size(30, [Bucket(64, 64)], 8)
    with pytest.raises(ValueError, match="96x32"):
        check_crop_size(48, [Bucket(64, 64), Bucket(96, 32)], 8)


# ============================================================================ tiny-model runs


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    """A tiny SDXL folder and a 64 px demo dataset."""
    root = tmp_path_factory.mktemp("vae")
    components = build_tiny_components(DEMO_WORDS, seed=0)
    # The random encoder's posterior has std ~1 around means of std ~0.2, so samples would be
    # mostly noise. A trained VAE's posterior is nearly deterministic; give the tiny one that
    # property (log-variance -12) so decoder-only training sees the encoder's signal.
    with torch.no_grad():
        channels = components.vae.config.latent_channels
        components.vae.quant_conv.weight[channels:] = 0.0
        components.vae.quant_conv.bias[channels:] = -12.0
    model = save_as_pipeline(components, EulerDiscreteScheduler(), root / "model")
    data = write_demo_dataset(root / "data", num_images=24, resolution=64, seed=0)
    return {"root": root, "model": model, "data": data, "components": components}


def make_config(tiny_setup, out: str, **vae) -> Config:
    settings = {"max_steps": 150, "batch_size": 4, "learning_rate": 3e-3, "held_out_fraction": 0.25, "ema_decay": 0.9,
                "crop_size": 32, "reconstruction_loss": "mse"}
    settings.update(vae)
    return Config.model_validate({
        "model": {"pretrained": str(tiny_setup["model"])},
        "data": {"root": str(tiny_setup["data"]), "resolution": 64},
        "train": {"device": "cpu", "log_every": 25, "seed": 0},
        "vae": settings,
        "output": {"dir": str(tiny_setup["root"] / out)},
    })


@pytest.fixture(scope="module")
def decoder_run(tiny_setup):
    config = make_config(tiny_setup, "decoder-run")
    report = run_vae_finetune(config)
    return Path(config.output.dir), report


def test_decoder_finetune_improves_held_out_reconstruction(decoder_run):
    out, report = decoder_run
    print(f"\nheld-out PSNR {report['psnr_before']:.3f} -> {report['psnr_after']:.3f} dB, "
          f"SSIM {report['ssim_before']:.4f} -> {report['ssim_after']:.4f}")
    assert report["psnr_after"] > report["psnr_before"] + 0.2
    assert report["ssim_after"] > report["ssim_before"] + 0.1
    assert report["steps"] == 150 and report["held_out_images"] >= 1 and report["train_images"] + report["held_out_images"] == 24
    assert json.loads((out / "vae_report.json").read_text()) == report
    log_text = (out / "train.log").read_text()
    assert "step 150/150" in log_text and "held-out after" in log_text
    assert (out / "config.yaml").is_file()


def test_latent_stats_file(decoder_run):
    out, report = decoder_run
    stats = json.loads((out / "latent_stats.json").read_text())
    assert stats["num_images"] == 24 and len(stats["channel_mean"]) == len(stats["channel_std"]) == 4
    assert stats["scaling_factor"] == pytest.approx(1.0 / stats["overall_std"])
    assert stats["shift_factor"] == pytest.approx(stats["overall_mean"])
    assert stats["current_scaling_factor"] == pytest.approx(0.13025)
    assert report["suggested_scaling_factor"] == stats["scaling_factor"]
    assert stats["values_per_channel"] == 24 * 8 * 8


def test_exported_vae_loads_keeps_the_encoder_and_decodes_in_a_pipeline(decoder_run, tiny_setup):
    out, _ = decoder_run
    vae = AutoencoderKL.from_pretrained(out / "vae")
    original = AutoencoderKL.from_pretrained(tiny_setup["model"], subfolder="vae")
    exported, base = vae.state_dict(), original.state_dict()
    encoder_side = [k for k in base if k.startswith(("encoder.", "quant_conv."))]
    assert encoder_side and all(torch.equal(exported[k], base[k]) for k in encoder_side)
    assert any(not torch.equal(exported[k], base[k]) for k in base if k.startswith("decoder."))

    components = tiny_setup["components"]
    pipeline = StableDiffusionXLPipeline(
        vae=vae, text_encoder=components.text_encoder, text_encoder_2=components.text_encoder_2,
        tokenizer=components.tokenizer, tokenizer_2=components.tokenizer_2, unet=components.unet,
        scheduler=EulerDiscreteScheduler(), add_watermarker=False,
    )
    pipeline.set_progress_bar_config(disable=True)
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    image = pipeline(prompt="red circle", latents=latents, num_inference_steps=2, height=64, width=64,
                     guidance_scale=1.0, output_type="np").images
    assert image.shape == (1, 64, 64, 3) and bool(((image >= 0) & (image <= 1)).all())
    with torch.no_grad():
        decoded = pipeline.vae.decode(latents / vae.config.scaling_factor).sample
    assert decoded.shape == (1, 3, 64, 64) and torch.isfinite(decoded).all()


def test_encoder_training_changes_the_encoder_with_a_kl_term(tiny_setup):
    config = make_config(tiny_setup, "encoder-run", max_steps=3, train_encoder=True, kl_weight=1e-3, perceptual_loss="none")
    recipe = VAEFinetuneRecipe(VAEFinetuneSettings.from_config(config))
    recipe.setup()
    before = {k: v.clone() for k, v in recipe.finetuner.vae.encoder.state_dict().items()}
    recipe.train()
    assert recipe.history[-1]["kl"] > 0
    assert any(not torch.equal(before[k], v) for k, v in recipe.finetuner.vae.encoder.state_dict().items())
    trained = recipe.finetuner.state_dict()["trained"]
    assert "encoder.conv_in.weight" in trained and "quant_conv.weight" in trained and "decoder.conv_out.weight" in trained


def test_resume_equals_uninterrupted(tiny_setup):
    def recipe(steps: int, out: str) -> VAEFinetuneRecipe:
        built = VAEFinetuneRecipe(VAEFinetuneSettings.from_config(make_config(tiny_setup, out, max_steps=steps, perceptual_loss="ms_ssim")))
        built.setup()
        return built

    whole = recipe(8, "resume-whole")
    whole.train()
    first = recipe(5, "resume-part")
    first.train()
    state = first.state_dict()
    resumed = recipe(8, "resume-rest")
    resumed.load_state_dict(state)
    resumed.train()
    assert resumed.finetuner.step == 8
    for (name, a), b in zip(whole.finetuner.trained.named_parameters(), resumed.finetuner.trained.parameters()):
        assert torch.equal(a, b), name
    ema_whole, ema_resumed = whole.finetuner.ema.state_dict(), resumed.finetuner.ema.state_dict()
    assert all(torch.equal(a, b) for a, b in zip(ema_whole["shadow_params"], ema_resumed["shadow_params"]))
    assert whole.sampler.state_dict() == resumed.sampler.state_dict()
    assert not any(name.startswith(("encoder.", "quant_conv.")) for name in state["finetuner"]["trained"])


def test_lpips_loss_and_report_with_a_local_weight_file(tiny_setup, tmp_path):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        state = LPIPS().state_dict()  # random VGG16; heads made positive like trained ones
    state = {k: v.abs() + 0.01 if k.startswith("lin") else v for k, v in state.items()}
    weights = tmp_path / "lpips_vgg.safetensors"
    save_file(state, str(weights))
    config = make_config(tiny_setup, "lpips-run", max_steps=2, perceptual_loss="lpips", perceptual_weight=1.0, lpips_weights=str(weights))
    report = run_vae_finetune(config)
    assert report["perceptual_loss"] == "lpips"
    assert report["lpips_before"] > 0 and report["lpips_after"] > 0


def test_lpips_without_weights_fails_before_any_model_loads(tiny_setup, tmp_path):
    config = make_config(tiny_setup, "lpips-missing", perceptual_loss="lpips")
    config.model.pretrained = str(tmp_path / "not-a-model")
    with pytest.raises(MissingLPIPSWeightsError, match="vae.lpips_weights"):
        run_vae_finetune(config)
