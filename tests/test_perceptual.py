"""LPIPS (plain-torch VGG16 + linear heads, local weights only), MS-SSIM/SSIM and PSNR."""

from __future__ import annotations

import pytest
import torch
from pytorch_msssim import ms_ssim, ssim
from safetensors.torch import save_file

from sdxl_trainer.training.perceptual import (
    LPIPS,
    LPIPS_HEADS_WEIGHTS,
    VGG16_WEIGHTS,
    MissingLPIPSWeightsError,
    MSSSIMLoss,
    NoPerceptualLoss,
    build_perceptual_loss,
    combine_lpips_weights,
    load_lpips,
    ms_ssim_per_sample,
    ms_ssim_settings,
    psnr_per_sample,
    ssim_per_sample,
    vgg16_features,
)

# torchvision's vgg16().features: conv layers sit at these indices (ReLU/max-pool in between).
TORCHVISION_CONV_INDICES = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)
TORCHVISION_CONV_CHANNELS = (64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512)


def smooth_images(batch: int, size: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(batch, 3, 4, 4, generator=generator) * 2 - 1
    return torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)


def noisy(images: torch.Tensor, std: float, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (images + std * torch.randn(images.shape, generator=generator)).clamp(-1, 1)


def fake_published_weights(seed: int = 0) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(torchvision-style vgg16 state dict with classifier keys, lpips-style heads with positive weights)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        features = vgg16_features()
        vgg = {f"features.{k}": v.clone() for k, v in features.state_dict().items()}
        vgg["classifier.0.weight"] = torch.randn(8, 8)
        vgg["classifier.0.bias"] = torch.randn(8)
        heads = {f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1) + 0.01 for i, c in enumerate((64, 128, 256, 512, 512))}
    return vgg, heads


@pytest.fixture(scope="module")
def lpips_file(tmp_path_factory):
    vgg, heads = fake_published_weights()
    path = tmp_path_factory.mktemp("lpips") / "lpips_vgg.safetensors"
    save_file({**vgg, **heads}, str(path))
    return path


@pytest.fixture(scope="module")
def lpips_model(lpips_file):
    return load_lpips(lpips_file)


def test_vgg16_features_have_torchvision_indices_and_shapes():
    state = vgg16_features().state_dict()
    expected = {}
    in_channels = 3
    for index, channels in zip(TORCHVISION_CONV_INDICES, TORCHVISION_CONV_CHANNELS):
        expected[f"{index}.weight"] = (channels, in_channels, 3, 3)
        expected[f"{index}.bias"] = (channels,)
        in_channels = channels
    assert {k: tuple(v.shape) for k, v in state.items()} == expected
    assert len(vgg16_features()) == 31  # ends with the 5th max-pool, index 30, as torchvision


def test_lpips_state_dict_keys_are_the_published_ones():
    keys = set(LPIPS().state_dict())
    features = {f"features.{i}.{p}" for i in TORCHVISION_CONV_INDICES for p in ("weight", "bias")}
    heads = {f"lin{i}.model.1.weight" for i in range(5)}
    assert keys == features | heads


def test_lpips_identity_is_zero_and_distance_is_symmetric(lpips_model):
    x = smooth_images(3, 64, seed=1)
    y = noisy(x, 0.2, seed=2)
    assert torch.equal(lpips_model(x, x), torch.zeros(3))
    forward, backward = lpips_model(x, y), lpips_model(y, x)
    assert forward.shape == (3,)
    assert torch.allclose(forward, backward, rtol=1e-5, atol=1e-7)
    assert bool((forward > 0).all())


def test_lpips_orders_distortions_by_strength(lpips_model):
    x = smooth_images(4, 64, seed=3)
    small, medium, large = (lpips_model(x, noisy(x, std, seed=4)) for std in (0.02, 0.1, 0.5))
    assert bool((small < medium).all()) and bool((medium < large).all())


def test_lpips_gradients_reach_the_input_not_the_weights(lpips_model):
    x = smooth_images(2, 64, seed=5)
    y = noisy(x, 0.3, seed=6).requires_grad_(True)
    lpips_model(y, x).sum().backward()
    assert y.grad is not None and torch.isfinite(y.grad).all() and y.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in lpips_model.parameters())
    lpips_model.train()
    assert not lpips_model.training  # dropout of the heads never switches on


def test_combine_published_files_into_one(tmp_path, lpips_model):
    vgg, heads = fake_published_weights()
    torch.save(vgg, tmp_path / "vgg16-397923af.pth")
    torch.save(heads, tmp_path / "vgg.pth")
    combined = combine_lpips_weights(tmp_path / "vgg16-397923af.pth", tmp_path / "vgg.pth", tmp_path / "lpips.safetensors")
    x, y = smooth_images(2, 64, seed=7), smooth_images(2, 64, seed=8)
    assert torch.equal(load_lpips(combined)(x, y), lpips_model(x, y))
    torch.save({**vgg, **heads}, tmp_path / "both.pth")
    assert torch.equal(load_lpips(tmp_path / "both.pth")(x, y), lpips_model(x, y))


def test_missing_or_incomplete_lpips_weights_say_what_and_where(tmp_path):
    for path in (None, tmp_path / "absent.safetensors"):
        with pytest.raises(MissingLPIPSWeightsError) as error:
            build_perceptual_loss("lpips", path)
        message = str(error.value)
        assert VGG16_WEIGHTS in message and LPIPS_HEADS_WEIGHTS in message and "vae.lpips_weights" in message
    vgg, _ = fake_published_weights()
    only_vgg = tmp_path / "only_vgg.safetensors"
    save_file(vgg, str(only_vgg))
    with pytest.raises(MissingLPIPSWeightsError, match="lin0.model.1.weight"):
        load_lpips(only_vgg)
    with pytest.raises(MissingLPIPSWeightsError, match="suffix"):
        (tmp_path / "weights.npz").write_bytes(b"x")
        load_lpips(tmp_path / "weights.npz")


def test_build_perceptual_loss_kinds(lpips_file):
    x = smooth_images(2, 64, seed=9)
    assert torch.equal(build_perceptual_loss("none")(x, -x), torch.zeros(2))
    assert isinstance(build_perceptual_loss("none"), NoPerceptualLoss)
    assert isinstance(build_perceptual_loss("ms_ssim"), MSSSIMLoss)
    assert build_perceptual_loss("lpips", lpips_file)(x, x).tolist() == [0.0, 0.0]
    with pytest.raises(ValueError, match="unknown perceptual loss"):
        build_perceptual_loss("vgg")


@pytest.mark.parametrize(
    ("side", "multiscale", "window"),
    [(256, True, 11), (161, True, 11), (160, True, 9), (128, True, 7), (96, True, 5), (65, True, 5), (64, False, 11), (32, False, 11), (9, False, 9), (8, False, 7)],
)
def test_ms_ssim_settings_for_small_images(side, multiscale, window):
    settings = ms_ssim_settings(side)
    assert (settings.multiscale, settings.window) == (multiscale, window)
    assert settings.sigma == pytest.approx(1.5 * window / 11)


def test_ms_ssim_matches_the_package_at_full_size_and_falls_back_to_ssim_when_small():
    x = smooth_images(2, 192, seed=10)
    y = noisy(x, 0.1, seed=11)
    reference = ms_ssim((x + 1) / 2, (y + 1) / 2, data_range=1.0, size_average=False)
    assert torch.allclose(ms_ssim_per_sample(x, y), reference)
    small_x, small_y = x[..., :64, :64], y[..., :64, :64]
    reference = ssim((small_x + 1) / 2, (small_y + 1) / 2, data_range=1.0, size_average=False)
    assert torch.allclose(ms_ssim_per_sample(small_x, small_y), reference)


@pytest.mark.parametrize("size", [32, 64, 128, 192])
def test_ms_ssim_loss_identity_ordering_and_gradients(size):
    loss = MSSSIMLoss()
    x = smooth_images(2, size, seed=12)
    assert torch.allclose(loss(x, x), torch.zeros(2), atol=1e-6)
    small, large = loss(noisy(x, 0.05, seed=13), x), loss(noisy(x, 0.4, seed=13), x)
    assert bool((small < large).all())
    y = noisy(x, 0.2, seed=14).requires_grad_(True)
    loss(y, x).sum().backward()
    assert torch.isfinite(y.grad).all() and y.grad.abs().sum() > 0


def test_psnr_and_ssim_golden_values():
    x = torch.zeros(1, 3, 16, 16)
    y = torch.full((1, 3, 16, 16), 0.2)  # 0.1 apart in [0, 1]: MSE 0.01 -> 20 dB
    assert psnr_per_sample(y, x).item() == pytest.approx(20.0, abs=1e-4)
    assert psnr_per_sample(torch.full_like(x, 3.0), torch.ones_like(x)).item() == pytest.approx(100.0)  # same after clamping: capped
    images = smooth_images(2, 32, seed=15)
    assert torch.allclose(ssim_per_sample(images, images), torch.ones(2))
    with pytest.raises(ValueError):
        ssim_per_sample(images[..., :8, :8], images[..., :8, :8])
