"""Cache stage throughput: build vs bare encoders, index open time/memory at 100k items, loader rate.

Run: python bench/cache_throughput.py [--images 64] [--resolution 256] [--items 100000]
                                      [--workers 2] [--step-seconds S]

1. Build: images/s of `build_cache` (decode + bucket + crop in worker processes, hashing,
   shard/index writes) against the bare VAE + text-encoder forward passes over the same batches
   in the same process. Target: build >= 0.9x bare (decoding and I/O hidden behind the encoders).
2. Index: time and resident-memory growth of opening a 100,000-item cache (CachedDataset,
   i.e. manifest + index), measured in a fresh process. Target: < 3 s, growth <= the files' size.
3. Loader: batches/s of a DataLoader over CachedDataset + BucketBatchSampler against the rate a
   tiny-UNet training step consumes them (measured here, or --step-seconds).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from sdxl_trainer.data import cache as cache_module
from sdxl_trainer.data.buckets import BucketBatchSampler, assign_bucket, generate_buckets, prepare_image
from sdxl_trainer.data.cache import CachedDataset, build_cache
from sdxl_trainer.data.dataset import load_image_rgb, scan_folder
from sdxl_trainer.data.demo import DEMO_WORDS, write_demo_dataset
from sdxl_trainer.models.conditioning import encode_prompts
from sdxl_trainer.models.tiny import build_tiny_components


def machine_info() -> dict:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average": os.getloadavg(),
    }


def _pixels(image) -> torch.Tensor:
    import numpy as np

    return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).float() / 127.5 - 1


@torch.no_grad()
def bare_encode_seconds(components, records, buckets, batch_size: int) -> float:
    """The encoders alone, over the batches the build forms (images pre-decoded, untimed)."""
    by_bucket: dict = {}
    for record in records:
        bucket = assign_bucket(record.width, record.height, buckets)
        prepared, _, _ = prepare_image(load_image_rgb(record.path), bucket)
        by_bucket.setdefault(bucket, []).append(_pixels(prepared))
    image_batches = [
        torch.stack(images[i : i + batch_size])
        for _, images in sorted(by_bucket.items())
        for i in range(0, len(images), batch_size)
    ]
    captions = list(dict.fromkeys(r.caption for r in records))
    caption_batches = [captions[i : i + batch_size] for i in range(0, len(captions), batch_size)]
    tokenizers = (components.tokenizer, components.tokenizer_2)
    encoders = (components.text_encoder, components.text_encoder_2)
    start = time.perf_counter()
    for chunk in caption_batches:
        encode_prompts(chunk, tokenizers, encoders)
    for pixels in image_batches:
        components.vae.encode(pixels).latent_dist.mean
    return time.perf_counter() - start


def bench_build(args, work: Path) -> tuple[dict, Path]:
    data_dir = write_demo_dataset(work / "demo", num_images=args.images, resolution=args.resolution, seed=0)
    records = scan_folder(data_dir).records
    buckets = generate_buckets(args.resolution, step=64)
    components = build_tiny_components(DEMO_WORDS, seed=0)
    for module in (components.vae, components.text_encoder, components.text_encoder_2):
        module.eval()
    options = dict(
        vae=components.vae,
        tokenizers=(components.tokenizer, components.tokenizer_2),
        text_encoders=(components.text_encoder, components.text_encoder_2),
        buckets=buckets,
        batch_size=args.batch_size,
        num_workers=args.workers,
        progress=False,
    )
    bare_encode_seconds(components, records[: 2 * args.batch_size], buckets, args.batch_size)  # warm-up
    build_cache(records[: 2 * args.batch_size], cache_dir=work / "warmup", **options)
    # Alternate the two and keep each one's best run: a shared CPU's noise hits both alike.
    bare_runs, build_runs = [], []
    for repeat in range(args.repeats):
        bare_runs.append(bare_encode_seconds(components, records, buckets, args.batch_size))
        cache_dir = work / f"cache{repeat}"
        start = time.perf_counter()
        report = build_cache(records, cache_dir=cache_dir, **options)
        build_runs.append(time.perf_counter() - start)
        timings = report.timings
    bare, build = min(bare_runs), min(build_runs)
    start = time.perf_counter()
    reused = build_cache(records, cache_dir=cache_dir, **options)
    rebuild = time.perf_counter() - start
    assert report.cached == len(records) and reused.reused == len(records)
    return {
        "images": len(records),
        "buckets": report.bucket_counts,
        "bare_runs_s": bare_runs,
        "build_runs_s": build_runs,
        "bare_encode_images_per_s": len(records) / bare,
        "build_images_per_s": len(records) / build,
        "build_vs_bare": bare / build,
        "build_phase_seconds": timings,
        "rebuild_all_reused_s": rebuild,
    }, cache_dir


def write_synthetic_cache(cache_dir: Path, items: int, texts: int, per_shard: int) -> float:
    """A real-format cache of `items` tiny latents; returns the seconds it took."""
    start = time.perf_counter()
    cache_dir.mkdir(parents=True)
    files = cache_module._RankFiles(cache_dir, rank=0, world_size=1)
    tables = cache_module._Tables()
    writer = cache_module._ShardWriter(
        files, tables, max_entries=per_shard, max_bytes=1 << 30, timings=cache_module._Timings()
    )
    generator = torch.Generator().manual_seed(0)
    mean = torch.randn(items, 4, 2, 2, generator=generator)
    text_keys = [cache_module._sha256_text(f"text {t}") for t in range(texts)]
    for key in text_keys:
        writer.add_text(key, torch.randn(77, 8, generator=generator), torch.randn(8, generator=generator))
    vocabulary = [f"tag_{t}" for t in range(2000)]
    rng = random.Random(0)
    manifest = []
    for i in range(items):
        key = cache_module._sha256_text(f"latent {i}")
        geometry = {"original_size": (16, 16), "crop_top_left": (0, 0), "bucket": (16, 16)}
        writer.add_latent(key, mean[i], mean[i].abs(), geometry)
        caption_row = i % texts
        manifest.append(
            cache_module.ManifestItem(
                position=i,
                latent_key=key,
                text_keys=(text_keys[caption_row],),
                texts=(f"caption {caption_row}",),
                caption=f"caption {caption_row}",
                tags=tuple(rng.sample(vocabulary, 8)),
                source=f"/datasets/synthetic/folder_{i // 1000:03d}/image_{i:07d}.png",
                bucket=(16, 16),
            )
        )
    writer.commit()
    cache_module._write_manifest(files.manifest, manifest, {"latent_mode": "sample", "crop": "center"})
    return time.perf_counter() - start


_OPEN_PROBE = """
import json, os, sys, time
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
from sdxl_trainer.data.cache import CachedDataset, load_index
cache_dir = sys.argv[1]
before = rss()
start = time.perf_counter()
dataset = CachedDataset(cache_dir)
open_s = time.perf_counter() - start
after = rss()
start = time.perf_counter()
index = load_index(cache_dir)
index_s = time.perf_counter() - start
del index
start = time.perf_counter()
for i in range(0, len(dataset), max(1, len(dataset) // 1000)):
    dataset[i]
read_s = (time.perf_counter() - start) / len(range(0, len(dataset), max(1, len(dataset) // 1000)))
print(json.dumps({"items": len(dataset), "load_index_s": index_s, "open_dataset_s": open_s,
                  "rss_growth_bytes": after - before, "item_read_ms": read_s * 1000}))
"""


def bench_index(args, work: Path) -> dict:
    cache_dir = work / "synthetic"
    write_s = write_synthetic_cache(
        cache_dir, args.items, texts=max(1, args.items // 20), per_shard=max(1, args.items // 10)
    )
    probe = subprocess.run(
        [sys.executable, "-c", _OPEN_PROBE, str(cache_dir)], capture_output=True, text=True, check=True
    )
    result = json.loads(probe.stdout.strip().splitlines()[-1])
    index_bytes = (cache_dir / cache_module.INDEX_NAME).stat().st_size
    manifest_bytes = (cache_dir / cache_module.MANIFEST_NAME).stat().st_size
    result.update(
        {
            "write_synthetic_s": write_s,
            "index_file_bytes": index_bytes,
            "manifest_file_bytes": manifest_bytes,
            "rss_growth_vs_files": result["rss_growth_bytes"] / (index_bytes + manifest_bytes),
        }
    )
    return result


def measure_step_seconds(dataset: CachedDataset, batch_size: int) -> float:
    """A tiny-UNet training step (forward, backward, AdamW) on one cached batch."""
    unet = build_tiny_components(DEMO_WORDS, seed=0).unet.train()
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-4)
    sampler = BucketBatchSampler(dataset.bucket_ids, batch_size, seed=0)
    batch = dataset.collate([dataset[i] for i in next(iter(sampler))])
    timings = []
    for _ in range(4):
        start = time.perf_counter()
        noise = torch.randn_like(batch["latents"])
        timesteps = torch.randint(0, 1000, (batch["latents"].shape[0],))
        prediction = unet(
            batch["latents"] + noise,
            timesteps,
            encoder_hidden_states=batch["prompt_embeds"],
            added_cond_kwargs={"text_embeds": batch["pooled_prompt_embeds"], "time_ids": batch["time_ids"]},
        ).sample
        torch.nn.functional.mse_loss(prediction, noise).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        timings.append(time.perf_counter() - start)
    return min(timings[1:])


def bench_loader(args, cache_dir: Path) -> dict:
    dataset = CachedDataset(cache_dir)
    sampler = BucketBatchSampler(dataset.bucket_ids, args.batch_size, seed=0)
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, num_workers=args.workers, collate_fn=CachedDataset.collate
    )
    batches = 0
    start = time.perf_counter()
    for epoch in range(args.loader_epochs):
        dataset.set_epoch(epoch)
        for _ in loader:
            batches += 1
    loader_s = time.perf_counter() - start
    step_s = args.step_seconds if args.step_seconds else measure_step_seconds(dataset, args.batch_size)
    return {
        "batch_size": args.batch_size,
        "loader_batches_per_s": batches / loader_s,
        "train_steps_per_s": 1 / step_s,
        "step_seconds_source": "--step-seconds" if args.step_seconds else "measured tiny UNet",
        "loader_vs_consumption": (batches / loader_s) * step_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--loader-epochs", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2, help="bare/build runs each (best is kept)")
    parser.add_argument("--step-seconds", type=float, default=None)
    parser.add_argument(
        "--threads",
        type=int,
        default=max(1, (os.cpu_count() or 1) - 2),
        help="torch threads for the encoders (default: CPUs minus the 2 decode workers, at least 1)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print("machine:", json.dumps(machine_info()))
    with tempfile.TemporaryDirectory(prefix="cache-bench-") as tmp:
        work = Path(tmp)
        build, cache_dir = bench_build(args, work)
        print("build:", json.dumps(build))
        print("index:", json.dumps(bench_index(args, work)))
        print("loader:", json.dumps(bench_loader(args, cache_dir)))


if __name__ == "__main__":
    main()
