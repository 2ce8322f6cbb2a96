"""Perceptual losses and image-quality metrics for VAE fine-tuning: LPIPS, MS-SSIM, SSIM, PSNR.

Every loss takes images in [-1, 1] (the VAE's pixel space), shape [B, 3, H, W], and returns a
per-sample loss [B]; reduction is the caller's.

LPIPS (Zhang et al. 2018, "The Unreasonable Effectiveness of Deep Features as a Perceptual
Metric", the "vgg" variant of v0.1) is written here in plain torch so that no torchvision is
needed. Its weights are read from ONE local file (``.safetensors``, ``.pth`` or ``.pt``) that
holds both parts, with exactly the published key names:

- ``features.N.weight`` / ``features.N.bias``: torchvision's ImageNet VGG16
  (torchvision's published ImageNet file ``vgg16-397923af.pth``; its ``classifier.*`` keys are ignored);
- ``lin0.model.1.weight`` ... ``lin4.model.1.weight``: the LPIPS linear heads of the ``lpips``
  package (https://github.com/richzhang/PerceptualSimilarity/raw/master/lpips/weights/v0.1/vgg.pth).

:func:`combine_lpips_weights` writes that file from the two published files. Nothing here
downloads anything.

MS-SSIM (Wang et al. 2003) comes from the ``pytorch-msssim`` package; see
:func:`ms_ssim_settings` for how small images are handled.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from pytorch_msssim import ms_ssim, ssim
from torch import nn

PERCEPTUAL_LOSSES = ("none", "ms_ssim", "lpips")

VGG16_WEIGHTS = "torchvision's published ImageNet VGG16 weights (vgg16-397923af.pth)"
LPIPS_HEADS_WEIGHTS = "the LPIPS v0.1 VGG heads (lpips/weights/v0.1/vgg.pth in the PerceptualSimilarity repository)"

# torchvision's vgg16().features: numbers are conv output channels, "M" is a 2x2 max-pool.
VGG16_LAYOUT: tuple[int | str, ...] = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")
# Indices in `features` of relu1_2, relu2_2, relu3_3, relu4_3, relu5_3: the five LPIPS taps.
LPIPS_TAPS: tuple[int, ...] = (3, 8, 15, 22, 29)
LPIPS_CHANNELS: tuple[int, ...] = (64, 128, 256, 512, 512)
# LPIPS' ScalingLayer: inputs in [-1, 1] are mapped to ImageNet statistics.
LPIPS_SHIFT = (-0.030, -0.088, -0.188)
LPIPS_SCALE = (0.458, 0.448, 0.450)
_FEATURE_EPS = 1e-10  # as lpips.normalize_tensor

# The five scale weights of Wang, Simoncelli & Bovik 2003, "Multi-scale structural similarity", as pytorch-msssim uses.
MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
MIN_MS_SSIM_WINDOW = 5  # smaller windows barely see structure; below this single-scale SSIM is used
_MS_SSIM_DOWNSAMPLINGS = 4  # pytorch-msssim always requires room for 4 halvings
PSNR_CAP_DB = 100.0


class MissingLPIPSWeightsError(FileNotFoundError):
    """LPIPS was asked for but its weight file is not there or is incomplete."""


def _missing_weights_message(path: str | Path | None, problem: str) -> str:
    return (
        f"{problem}. perceptual_loss=lpips needs one local file with torchvision's VGG16 "
        f"features (features.N.weight/bias, from {VGG16_WEIGHTS}) and the LPIPS linear heads "
        f"(lin0.model.1.weight ... lin4.model.1.weight, from {LPIPS_HEADS_WEIGHTS}). Download both, "
        "combine them with sdxl_trainer.training.perceptual.combine_lpips_weights(vgg16, heads, "
        "'lpips_vgg.safetensors'), and set vae.lpips_weights to that file; or use "
        "vae.perceptual_loss=ms_ssim, which needs no weights"
        + ("" if path is None else f" (vae.lpips_weights = {str(path)!r})")
    )


def vgg16_features() -> nn.Sequential:
    """VGG16's convolutional stack with torchvision's layer indices (so its keys load as is)."""
    layers: list[nn.Module] = []
    in_channels = 3
    for item in VGG16_LAYOUT:
        if item == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers.append(nn.Conv2d(in_channels, int(item), kernel_size=3, padding=1))
            layers.append(nn.ReLU(inplace=True))
            in_channels = int(item)
    return nn.Sequential(*layers)


class NetLinLayer(nn.Module):
    """LPIPS' 1x1 linear head; ``model.1`` is the conv so the published keys load."""

    def __init__(self, channels: int):
        super().__init__()
        self.model = nn.Sequential(nn.Dropout(), nn.Conv2d(channels, 1, kernel_size=1, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def _unit_normalize(features: torch.Tensor) -> torch.Tensor:
    norm = torch.sqrt(torch.sum(features**2, dim=1, keepdim=True))
    return features / (norm + _FEATURE_EPS)


class LPIPS(nn.Module):
    """LPIPS distance with a VGG16 backbone; frozen and in eval mode, gradients flow to the inputs.

    state_dict keys: ``features.N.*`` (VGG16) and ``linK.model.1.weight`` (heads).
    """

    def __init__(self) -> None:
        super().__init__()
        self.features = vgg16_features()[: LPIPS_TAPS[-1] + 1]  # relu5_3 is the last layer used
        for index, channels in enumerate(LPIPS_CHANNELS):
            self.add_module(f"lin{index}", NetLinLayer(channels))
        self.register_buffer("shift", torch.tensor(LPIPS_SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(LPIPS_SCALE).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "LPIPS":
        # A metric: dropout stays off even when a parent module is put in training mode.
        return super().train(False)

    def _taps(self, images: torch.Tensor) -> list[torch.Tensor]:
        x = (images - self.shift) / self.scale
        taps = []
        for index, layer in enumerate(self.features):
            x = layer(x)
            if index in LPIPS_TAPS:
                taps.append(x)
        return taps

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-sample LPIPS distance [B] between images in [-1, 1]."""
        if x.shape != y.shape or x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"LPIPS needs two [B, 3, H, W] tensors of one shape, got {list(x.shape)} and {list(y.shape)}")
        taps = self._taps(torch.cat([x, y]))
        distance = x.new_zeros(x.shape[0])
        for index, features in enumerate(taps):
            fx, fy = _unit_normalize(features).chunk(2)
            head = getattr(self, f"lin{index}")
            distance = distance + head((fx - fy) ** 2).mean(dim=(1, 2, 3))
        return distance


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    if path.suffix in (".pth", ".pt", ".bin"):
        state = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(state, dict):
            raise MissingLPIPSWeightsError(_missing_weights_message(path, f"{path} does not hold a state dict"))
        return state
    raise MissingLPIPSWeightsError(
        _missing_weights_message(path, f"{path} has an unknown weight-file suffix {path.suffix!r} (use .safetensors, .pth or .pt)")
    )


def load_lpips(path: str | Path | None) -> LPIPS:
    """LPIPS with weights from the single local file at ``path`` (see the module docstring)."""
    if path is None:
        raise MissingLPIPSWeightsError(_missing_weights_message(None, "vae.lpips_weights is not set"))
    path = Path(path).expanduser()
    if not path.is_file():
        raise MissingLPIPSWeightsError(_missing_weights_message(path, f"LPIPS weight file {path} does not exist"))
    state = _read_state_dict(path)
    model = LPIPS()
    expected = model.state_dict().keys()
    missing = sorted(key for key in expected if key not in state)
    if missing:
        shown = ", ".join(missing[:6]) + (f" and {len(missing) - 6} more" if len(missing) > 6 else "")
        raise MissingLPIPSWeightsError(_missing_weights_message(path, f"{path} lacks LPIPS keys: {shown}"))
    # Extra keys (VGG's classifier.*, features beyond relu5_3) are not used by LPIPS.
    model.load_state_dict({key: state[key] for key in expected}, strict=True)
    return model


def combine_lpips_weights(vgg16_path: str | Path, heads_path: str | Path, out_path: str | Path) -> Path:
    """Write the single LPIPS weight file from torchvision's vgg16 ``.pth`` and lpips' ``vgg.pth``."""
    from safetensors.torch import save_file

    vgg = _read_state_dict(Path(vgg16_path))
    heads = _read_state_dict(Path(heads_path))
    keys = LPIPS().state_dict().keys()
    combined = {}
    for key in keys:
        source = heads if key.startswith("lin") else vgg
        if key not in source:
            where = heads_path if key.startswith("lin") else vgg16_path
            raise MissingLPIPSWeightsError(_missing_weights_message(None, f"{where} lacks {key}"))
        combined[key] = source[key].detach().to(torch.float32).contiguous()
    out_path = Path(out_path)
    save_file(combined, str(out_path))
    return out_path


@dataclass(frozen=True)
class SSIMSettings:
    """How (MS-)SSIM is computed for a given image size."""

    multiscale: bool  # False: single-scale SSIM
    window: int
    sigma: float


def ms_ssim_settings(min_side: int) -> SSIMSettings:
    """The (MS-)SSIM variant for images whose shorter side is ``min_side`` pixels.

    pytorch-msssim needs ``min_side > (window - 1) * 16`` for its five scales. Above 160 px this
    is the standard MS-SSIM (11-tap window, sigma 1.5). From 65 to 160 px the window shrinks to
    the largest odd size (9, 7 or 5) that fits, its sigma scaled in proportion
    (1.5 * window / 11), so all five scales are kept. At 64 px or less a window of 3 would be
    too small to measure structure, so single-scale SSIM is used instead, with the 11-tap window
    (or the largest odd window that fits below 11 px).
    """
    if min_side < 3:
        raise ValueError(f"SSIM needs images at least 3 pixels on a side, got {min_side}")
    for window in range(SSIM_WINDOW, MIN_MS_SSIM_WINDOW - 1, -2):
        if min_side > (window - 1) * 2**_MS_SSIM_DOWNSAMPLINGS:
            return SSIMSettings(True, window, SSIM_SIGMA * window / SSIM_WINDOW)
    window = min(SSIM_WINDOW, min_side if min_side % 2 else min_side - 1)
    return SSIMSettings(False, window, SSIM_SIGMA * window / SSIM_WINDOW)


def _to_unit_range(images: torch.Tensor) -> torch.Tensor:
    return (images.float() + 1.0) / 2.0


def ms_ssim_per_sample(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """MS-SSIM [B] of images in [-1, 1] (data range 1 after mapping to [0, 1]); see ms_ssim_settings."""
    if x.shape != y.shape or x.ndim != 4:
        raise ValueError(f"MS-SSIM needs two [B, C, H, W] tensors of one shape, got {list(x.shape)} and {list(y.shape)}")
    settings = ms_ssim_settings(min(x.shape[-2:]))
    a, b = _to_unit_range(x), _to_unit_range(y)
    if settings.multiscale:
        return ms_ssim(a, b, data_range=1.0, size_average=False, win_size=settings.window, win_sigma=settings.sigma, weights=list(MS_SSIM_WEIGHTS))
    return ssim(a, b, data_range=1.0, size_average=False, win_size=settings.window, win_sigma=settings.sigma)


def ssim_per_sample(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Standard single-scale SSIM [B] (11-tap gaussian window, sigma 1.5) of images in [-1, 1]."""
    if x.shape != y.shape or x.ndim != 4:
        raise ValueError(f"SSIM needs two [B, C, H, W] tensors of one shape, got {list(x.shape)} and {list(y.shape)}")
    if min(x.shape[-2:]) < SSIM_WINDOW:
        raise ValueError(f"SSIM needs images at least {SSIM_WINDOW} pixels on a side, got {list(x.shape[-2:])}")
    return ssim(_to_unit_range(x), _to_unit_range(y), data_range=1.0, size_average=False, win_size=SSIM_WINDOW, win_sigma=SSIM_SIGMA)


def psnr_per_sample(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """PSNR in dB [B] of images in [-1, 1], measured in [0, 1] after clamping (as 8-bit output would be).

    Identical images give PSNR_CAP_DB instead of infinity, so means and JSON stay finite.
    """
    a = _to_unit_range(x).clamp(0.0, 1.0).double()
    b = _to_unit_range(y).clamp(0.0, 1.0).double()
    mse = ((a - b) ** 2).mean(dim=tuple(range(1, a.ndim))).clamp(min=10.0 ** (-PSNR_CAP_DB / 10.0))
    return (10.0 * torch.log10(1.0 / mse)).float()


class MSSSIMLoss(nn.Module):
    """Per-sample ``1 - MS-SSIM`` (see ms_ssim_settings for small images)."""

    def forward(self, reconstruction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return 1.0 - ms_ssim_per_sample(reconstruction, target)


class LPIPSLoss(nn.Module):
    """Per-sample LPIPS distance."""

    def __init__(self, lpips: LPIPS):
        super().__init__()
        self.lpips = lpips

    def forward(self, reconstruction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.lpips(reconstruction.float(), target.float())


class NoPerceptualLoss(nn.Module):
    """Null object for perceptual_loss=none: zeros, so the loss code has no special case."""

    def forward(self, reconstruction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return reconstruction.new_zeros(reconstruction.shape[0], dtype=torch.float32)


def build_perceptual_loss(kind: str, lpips_weights: str | Path | None = None) -> nn.Module:
    """The per-sample perceptual loss ``kind`` (none, ms_ssim, lpips); lpips needs its weight file."""
    if kind not in PERCEPTUAL_LOSSES:
        raise ValueError(f"unknown perceptual loss {kind!r}; allowed: {', '.join(PERCEPTUAL_LOSSES)}")
    if kind == "none":
        return NoPerceptualLoss()
    if kind == "ms_ssim":
        return MSSSIMLoss()
    return LPIPSLoss(load_lpips(lpips_weights))

