"""Full-size SDXL UNet on one GPU: training throughput, model FLOP utilisation, memory of the 24gb preset.

Run (GPU, about 3-5 minutes on an H200):  python bench/gpu_sdxl.py
    CPU smoke run of the same code path:  python bench/gpu_sdxl.py --device cpu --tiny
    FLOPs and parameters only (no run):   python bench/gpu_sdxl.py --dry-run

The UNet is SDXL 1.0 base's published architecture (SDXL_UNET_CONFIG, 2,567,463,684 parameters)
with random weights: nothing is downloaded. Latents are 128x128 (1024x1024 images), text
conditioning has SDXL's shapes (77 x 2048 tokens, 1280 pooled, 6 time ids).

(a) Throughput: batch 8, bf16 autocast with fp32 master weights, AdamW, SDPA attention (the
    80gb preset's options). If batch 8 does not fit without gradient checkpointing it is retried
    with checkpointing, and the report says so. FLOPs of one step (forward + backward) are
    counted with torch.utils.flop_counter.FlopCounterMode on the meta device (model FLOPs, not
    counting checkpoint recomputation); MFU = FLOPs per step / (seconds per step x peak).
(b) Memory: peak torch.cuda.max_memory_allocated of a full fine-tune step at batch 1 with the
    24gb preset (bf16 autocast, fp32 master weights, gradient checkpointing, Adafactor, fused
    backward), built with the trainer's own build_optimizer and prepare_unet_for_training.

The optimizer, weights and activations are the trainer's; the data path (cache reads) is not
part of this benchmark (bench/train_step.py measures the trainer's overhead over a bare step).
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time

import torch
from diffusers import UNet2DConditionModel
from torch.utils.flop_counter import FlopCounterMode

from cache_throughput import machine_info
from sdxl_trainer.models.setup import attention_backend, prepare_unet_for_training
from sdxl_trainer.models.tiny import tiny_unet_config
from sdxl_trainer.training.setup import build_optimizer
from sdxl_trainer.training.utils import unet_forward

# stabilityai/stable-diffusion-xl-base-1.0 unet/config.json (the keys that differ from diffusers' defaults).
SDXL_UNET_CONFIG = {
    "sample_size": 128,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "block_out_channels": (320, 640, 1280),
    "layers_per_block": 2,
    "attention_head_dim": (5, 10, 20),  # numbers of heads (diffusers' historic name), head width 64
    "transformer_layers_per_block": (1, 2, 10),
    "cross_attention_dim": 2048,
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,  # 1280 pooled + 6 time ids x 256
    "norm_num_groups": 32,
}
SDXL_PARAMETERS = 2_567_463_684
H200_BF16_DENSE_TFLOPS = 790.0


def text_shapes(config: dict) -> tuple[int, int]:
    """(cross-attention width, pooled width) of a UNet config."""
    pooled = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
    return config["cross_attention_dim"], pooled


def make_batch(config: dict, batch_size: int, latent_size: int, device) -> dict[str, torch.Tensor]:
    width, pooled = text_shapes(config)
    generator = torch.Generator(device="cpu").manual_seed(0)
    side = latent_size * 8
    tensors = {
        "noisy": torch.randn(batch_size, 4, latent_size, latent_size, generator=generator),
        "target": torch.randn(batch_size, 4, latent_size, latent_size, generator=generator),
        "timesteps": torch.randint(0, 1000, (batch_size,), generator=generator),
        "prompt_embeds": torch.randn(batch_size, 77, width, generator=generator),
        "pooled_prompt_embeds": torch.randn(batch_size, pooled, generator=generator),
        "time_ids": torch.tensor([[side, side, 0, 0, side, side]] * batch_size, dtype=torch.float32),
    }
    return {name: tensor.to(device) for name, tensor in tensors.items()}


def meta_batch(config: dict, batch_size: int, latent_size: int) -> dict[str, torch.Tensor]:
    width, pooled = text_shapes(config)
    with torch.device("meta"):
        return {
            "noisy": torch.empty(batch_size, 4, latent_size, latent_size),
            "target": torch.empty(batch_size, 4, latent_size, latent_size),
            "timesteps": torch.zeros(batch_size, dtype=torch.long),
            "prompt_embeds": torch.empty(batch_size, 77, width),
            "pooled_prompt_embeds": torch.empty(batch_size, pooled),
            "time_ids": torch.empty(batch_size, 6),
        }


def loss_of(unet, batch) -> torch.Tensor:
    output = unet_forward(unet, batch["noisy"], batch["timesteps"], prompt_embeds=batch["prompt_embeds"],
                          pooled_prompt_embeds=batch["pooled_prompt_embeds"], time_ids=batch["time_ids"])
    return torch.nn.functional.mse_loss(output.float(), batch["target"])


def count_step_flops(config: dict, batch_size: int, latent_size: int) -> dict:
    """Parameters and forward/backward FLOPs of one training step, on the meta device (no memory, no GPU)."""
    with torch.device("meta"):
        unet = UNet2DConditionModel(**config)
    batch = meta_batch(config, batch_size, latent_size)
    with FlopCounterMode(display=False) as counter:
        loss = loss_of(unet, batch)
        forward = counter.get_total_flops()
        loss.backward()
    return {"parameters": sum(p.numel() for p in unet.parameters()), "forward_flops": forward, "step_flops": counter.get_total_flops()}


def build_unet(config: dict, device: torch.device, *, gradient_checkpointing: bool, compile: bool = False) -> UNet2DConditionModel:
    torch.manual_seed(0)
    with torch.device(device):  # initialise on the GPU directly: 2.6e9 parameters on CPU take minutes
        unet = UNet2DConditionModel(**config)
    return prepare_unet_for_training(unet, gradient_checkpointing=gradient_checkpointing, compile=compile)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_steps(unet, optimizer, batch, steps: int, device: torch.device) -> float:
    """Seconds per step (forward + backward + optimizer step) under bf16 autocast."""
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = loss_of(unet, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    synchronize(device)
    if not torch.isfinite(loss):
        raise RuntimeError(f"non-finite loss {loss.item()} in the benchmark")
    return (time.perf_counter() - start) / steps


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def measure_throughput(config, device, *, checkpointing, batch_size, latent_size, warmup, steps, compile) -> dict | None:
    """Seconds per step and peak memory, or None when it runs out of memory (all of it freed again)."""
    try:
        unet = build_unet(config, device, gradient_checkpointing=checkpointing, compile=compile)
        optimizer = build_optimizer(unet.parameters(), learning_rate=1e-5)
        batch = make_batch(config, batch_size, latent_size, device)
        train_steps(unet, optimizer, batch, warmup, device)
        seconds = train_steps(unet, optimizer, batch, steps, device)
    except torch.cuda.OutOfMemoryError:
        return None
    measured = {"attention": attention_backend(unet), "seconds": seconds}
    if device.type == "cuda":
        measured["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    return measured


def throughput(config, device, *, batch_size, latent_size, warmup, steps, compile, flops, peak_tflops) -> dict:
    result: dict = {"batch_size": batch_size, "image_size": latent_size * 8, "precision": "bf16 autocast, fp32 master weights",
                    "optimizer": "adamw", "compile": compile}
    for checkpointing in (False, True):
        free_memory()
        measured = measure_throughput(config, device, checkpointing=checkpointing, batch_size=batch_size, latent_size=latent_size,
                                      warmup=warmup, steps=steps, compile=compile)
        free_memory()
        if measured is None:
            result["out_of_memory_without_checkpointing"] = True
            continue
        seconds = measured.pop("seconds")
        result.update({
            "gradient_checkpointing": checkpointing,
            **measured,
            "seconds_per_step": round(seconds, 4),
            "images_per_second": round(batch_size / seconds, 3),
            "model_tflops_per_step": round(flops / 1e12, 2),
            "achieved_tflops": round(flops / seconds / 1e12, 1),
            "peak_tflops_assumed": peak_tflops,
            "mfu": round(flops / seconds / (peak_tflops * 1e12), 4),
        })
        return result
    raise RuntimeError(f"batch {batch_size} does not fit even with gradient checkpointing")


def preset_24gb_memory(config, device, *, latent_size, steps) -> dict:
    free_memory()
    unet = build_unet(config, device, gradient_checkpointing=True)
    optimizer = build_optimizer(unet.parameters(), learning_rate=1e-5, name="adafactor", fused_backward=True)
    batch = make_batch(config, 1, latent_size, device)
    seconds = train_steps(unet, optimizer, batch, steps, device)
    result = {"preset": "24gb", "batch_size": 1, "image_size": latent_size * 8,
              "options": "bf16 autocast + fp32 master weights + gradient checkpointing + adafactor + fused backward",
              "seconds_per_step": round(seconds, 4)}
    if device.type == "cuda":
        result["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
        result["weights_gib"] = round(sum(p.numel() * p.element_size() for p in unet.parameters()) / 2**30, 2)
    else:
        result["peak_memory_gib"] = None  # torch keeps no allocator statistics for the CPU
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--tiny", action="store_true", help="the built-in tiny UNet config at 32x32 latents (smoke test)")
    parser.add_argument("--dry-run", action="store_true", help="only count parameters and FLOPs (meta device)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--compile", action="store_true", help="torch.compile the UNet for the throughput run")
    parser.add_argument("--peak-tflops", type=float, default=H200_BF16_DENSE_TFLOPS, help="bf16 dense peak of the GPU")
    args = parser.parse_args()

    config = tiny_unet_config() if args.tiny else SDXL_UNET_CONFIG
    latent_size = 32 if args.tiny else 128
    batch_size = 2 if args.tiny and args.batch_size == 8 else args.batch_size
    report: dict = {"machine": machine_info(), "model": "tiny UNet" if args.tiny else "SDXL UNet (random weights)"}
    if torch.cuda.is_available():
        report["machine"]["gpu"] = torch.cuda.get_device_name(0)
    counted = count_step_flops(config, batch_size, latent_size)
    report["flops"] = {**counted, "batch_size": batch_size, "image_size": latent_size * 8,
                       "forward_tflops_per_image": round(counted["forward_flops"] / batch_size / 1e12, 3)}
    if not args.tiny and counted["parameters"] != SDXL_PARAMETERS:
        raise SystemExit(f"SDXL_UNET_CONFIG builds {counted['parameters']} parameters, SDXL has {SDXL_PARAMETERS}")
    if args.dry_run:
        print(json.dumps(report, indent=2))
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        print(json.dumps(report, indent=2))
        print("no CUDA device: nothing was measured. Run on a GPU, or use --device cpu --tiny (smoke run) "
              "or --dry-run (FLOPs only).", file=sys.stderr)
        return 0
    device = torch.device(args.device)
    warmup, steps = (1, 2) if args.tiny else (args.warmup, args.steps)
    report["throughput"] = throughput(config, device, batch_size=batch_size, latent_size=latent_size, warmup=warmup, steps=steps,
                                      compile=args.compile, flops=counted["step_flops"], peak_tflops=args.peak_tflops)
    report["memory_24gb_preset"] = preset_24gb_memory(config, device, latent_size=latent_size, steps=2 if args.tiny else 3)
    print(json.dumps(report, indent=2))
    tp = report["throughput"]
    print(f"{report['model']} on {report['machine'].get('gpu', args.device)}: {tp['seconds_per_step']} s/step at batch {batch_size}, "
          f"{tp['images_per_second']} images/s, MFU {100 * tp['mfu']:.1f}% of {args.peak_tflops:g} TFLOP/s; "
          f"24gb preset peak memory {report['memory_24gb_preset']['peak_memory_gib']} GiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
