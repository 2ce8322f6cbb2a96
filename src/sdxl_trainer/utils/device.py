"""Device and dtype decisions, made once at the edge and passed down."""

from __future__ import annotations

from dataclasses import dataclass

import torch


class DeviceError(ValueError):
    """The requested device or precision is not available on this machine."""


@dataclass(frozen=True)
class DevicePlan:
    device: torch.device
    mixed_precision: str  # "no" | "bf16" | "fp16", as accelerate names it
    weight_dtype: torch.dtype  # dtype of the frozen components (VAE, text encoders)


def resolve_device(requested: str = "auto") -> torch.device:
    if requested == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if requested == "cuda" and not torch.cuda.is_available():
        raise DeviceError("train.device = cuda but no CUDA device is available; use train.device=auto or cpu")
    if requested == "mps" and not torch.backends.mps.is_available():
        raise DeviceError("train.device = mps but MPS is not available; use train.device=auto or cpu")
    if requested not in ("cpu", "cuda", "mps"):
        raise DeviceError(f"unknown device {requested!r}; allowed: auto, cpu, cuda, mps")
    return torch.device(requested)


def plan_device(requested_device: str = "auto", mixed_precision: str = "no") -> DevicePlan:
    device = resolve_device(requested_device)
    if mixed_precision == "fp16" and device.type == "cpu":
        raise DeviceError("train.mixed_precision = fp16 needs a GPU (CPU has no fp16 autocast with a gradient scaler); use bf16 or no")
    if mixed_precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise DeviceError("train.mixed_precision = bf16 is not supported by this GPU; use fp16")
    weight_dtype = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision)
    if weight_dtype is None:
        raise DeviceError(f"unknown mixed_precision {mixed_precision!r}; allowed: no, bf16, fp16")
    return DevicePlan(device=device, mixed_precision=mixed_precision, weight_dtype=weight_dtype)
