"""Device and dtype decisions, made once at the edge and passed down."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import torch


class DeviceError(ValueError):
    """The requested device or precision is not available on this machine."""


@dataclass(frozen=True)
class DevicePlan:
    device: torch.device
    mixed_precision: str  # "no" | "bf16" | "fp16", as accelerate names it
    weight_dtype: torch.dtype  # dtype of the frozen components (VAE, text encoders)
    train_dtype: torch.dtype = torch.float32  # dtype of the trained UNet weights (bf16 with full_bf16)


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


def plan_device(
    requested_device: str = "auto",
    mixed_precision: str = "no",
    *,
    optimizer: str = "adamw",
    full_bf16: bool = False,
) -> DevicePlan:
    device = resolve_device(requested_device)
    weight_dtype = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision)
    if weight_dtype is None:
        raise DeviceError(f"unknown mixed_precision {mixed_precision!r}; allowed: no, bf16, fp16")
    problems = []
    if mixed_precision == "fp16" and device.type == "cpu":
        problems.append("train.mixed_precision = fp16 needs a GPU (CPU has no fp16 autocast with a gradient scaler); use bf16 or no")
    if mixed_precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        problems.append("train.mixed_precision = bf16 is not supported by this GPU; use fp16")
    if optimizer == "adamw8bit" and device.type != "cuda":
        problems.append(f"train.optimizer = adamw8bit needs a CUDA device (bitsandbytes), the device is {device.type}; use adamw or adafactor")
    elif optimizer == "adamw8bit" and importlib.util.find_spec("bitsandbytes") is None:
        problems.append("train.optimizer = adamw8bit needs bitsandbytes, which is not installed: pip install bitsandbytes, or use adamw or adafactor")
    if full_bf16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        problems.append("train.full_bf16 needs bf16 support, which this GPU lacks; set train.full_bf16=false")
    if problems:
        raise DeviceError("; ".join(problems))
    train_dtype = torch.bfloat16 if full_bf16 else torch.float32
    return DevicePlan(device=device, mixed_precision=mixed_precision, weight_dtype=weight_dtype, train_dtype=train_dtype)


def check_process_options(num_processes: int, *, fused_backward: bool) -> None:
    """Options that depend on how many processes share the run."""
    if fused_backward and num_processes > 1:
        raise DeviceError(
            f"train.fused_backward steps each parameter before DDP has averaged its gradient, so it runs "
            f"in one process only ({num_processes} were launched); set train.fused_backward=false"
        )
