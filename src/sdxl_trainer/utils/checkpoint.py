"""Full training state on disk: atomic, bounded, and resumable bit for bit.

A checkpoint is the folder ``checkpoints/step-NNNNNN/``:

- ``unet.safetensors``: the trained UNet (its state_dict, in the training dtype)
- ``ema.safetensors``: EMA shadow weights keyed like the UNet's parameters (only with EMA on)
- ``state.json`` + ``state.safetensors``: step, epoch, the resolved config and its hash, the EMA
  scalars, and every stateful object (optimizer, LR scheduler, sampler, dataset, loss history,
  tag weighter, grad scaler); tensors live in the .safetensors file and are referenced by key
  from the JSON
- ``rng-rankR.json`` + ``rng-rankR.safetensors``: python/numpy/torch/CUDA/trainer-generator RNG
  states of rank R
- ``config.yaml``: the resolved config, for people
- ``manifest.json``: written last; lists every file with its size. A folder without a matching
  manifest is incomplete and never loaded.

A save writes ``checkpoints/.tmp-step-NNNNNN-<pid>/``, fsyncs every file and the folder, renames
it to ``step-NNNNNN`` and only then replaces the ``checkpoints/latest`` pointer (JSON) atomically;
old checkpoints are pruned after that. A kill at any moment leaves the previous checkpoint
loadable. Nothing is unpickled: loading reads safetensors and JSON only.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import re
import shutil
import signal
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from sdxl_trainer.config import ConfigError
from sdxl_trainer.utils.io import fsync_path
from sdxl_trainer.utils.logging import get_logger

log = get_logger("checkpoint")

FORMAT_VERSION = 1
LATEST_POINTER = "latest"
MANIFEST = "manifest.json"
STATE_JSON = "state.json"
STATE_TENSORS = "state.safetensors"
UNET_FILE = "unet.safetensors"
EMA_FILE = "ema.safetensors"
CONFIG_FILE = "config.yaml"
_STEP_DIR = re.compile(r"^step-(\d{6,})$")
_TMP_DIR = re.compile(r"^\.tmp-step-\d{6,}-(\d+)$")
# Test hook: "POINT" or "POINT@STEP" makes the saving process SIGKILL itself at POINT of a save.
KILL_HOOK_ENV = "SDXL_TRAINER_TEST_KILL_DURING_SAVE"
KILL_POINTS = ("mid_files", "after_files", "after_rename", "after_pointer")

# Config keys whose change makes the saved state mean something else: resuming is refused.
RESUME_CRITICAL_KEYS = (
    "model.pretrained",
    "data.root",
    "data.resolution",
    "data.crop",
    "data.bucket_step",
    "data.max_aspect_ratio",
    "train.batch_size",
    "train.gradient_accumulation_steps",
    "train.seed",
    "objective.*",
)
# Changes allowed without a word: where the run goes and how long it runs.
RESUME_SILENT_KEYS = ("train.max_steps", "train.resume", "train.resume_force", "train.checkpoint_every", "train.keep_last_n",
                      "train.log_every", "output.*", "sample.*", "cache.num_workers", "cache.batch_size")


class CheckpointError(RuntimeError):
    """A checkpoint could not be written; the message says where and what survived."""


class ResumeError(ConfigError):
    """A resume request that cannot be honoured as asked (exit 2): no checkpoint, or a changed config."""


# ---------------------------------------------------------------------------- state encoding
def encode_state(value: Any, tensors: dict[str, torch.Tensor], key: str) -> Any:
    """JSON-able form of a state_dict-like value; tensors go to `tensors` under key paths.

    Tuples, non-string dict keys (optimizer state is keyed by int) and numpy arrays are tagged so
    that `decode_state` gives back exactly what was stored.
    """
    if isinstance(value, torch.Tensor):
        tensors[key] = value.detach().cpu().contiguous()
        return {"__tensor__": key}
    if isinstance(value, np.ndarray):
        return {"__ndarray__": value.tolist(), "dtype": str(value.dtype)}
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in value):
            return {k: encode_state(v, tensors, f"{key}/{k}") for k, v in value.items()}
        return {"__items__": [[encode_state(k, tensors, f"{key}/key{i}"), encode_state(v, tensors, f"{key}/{k}")]
                              for i, (k, v) in enumerate(value.items())]}
    if isinstance(value, tuple):
        return {"__tuple__": [encode_state(v, tensors, f"{key}/{i}") for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [encode_state(v, tensors, f"{key}/{i}") for i, v in enumerate(value)]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot store a {type(value).__name__} at {key!r} in a checkpoint (tensors, numbers, strings, lists and dicts only)")


def decode_state(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, list):
        return [decode_state(v, tensors) for v in value]
    if not isinstance(value, dict):
        return value
    if "__tensor__" in value:
        return tensors[value["__tensor__"]]
    if "__ndarray__" in value:
        return np.asarray(value["__ndarray__"], dtype=value["dtype"])
    if "__tuple__" in value:
        return tuple(decode_state(v, tensors) for v in value["__tuple__"])
    if "__items__" in value:
        return {decode_state(k, tensors): decode_state(v, tensors) for k, v in value["__items__"]}
    return {k: decode_state(v, tensors) for k, v in value.items()}


def config_hash(config_tree: dict) -> str:
    return hashlib.sha256(json.dumps(config_tree, sort_keys=True).encode()).hexdigest()


# ---------------------------------------------------------------------------- RNG
def capture_rng_state(generator: torch.Generator | None) -> dict[str, Any]:
    """Every RNG the loop may touch, for this rank."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if generator is not None:
        state["generator"] = generator.get_state()
    return state


def restore_rng_state(state: dict[str, Any], generator: torch.Generator | None) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if generator is not None:
        if "generator" not in state:
            raise ResumeError("the checkpoint holds no state of the trainer's noise generator; it was not written by this trainer")
        generator.set_state(state["generator"])


# ---------------------------------------------------------------------------- durable writes
def _write_text(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


def _write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    save_file(tensors, str(path), metadata=metadata)
    fsync_path(path)


def _kill_hook(point: str, step: int) -> None:
    """SIGKILL this process at `point` when the test hook asks for it (never set in normal use)."""
    wanted = os.environ.get(KILL_HOOK_ENV)
    if not wanted:
        return
    name, _, at_step = wanted.partition("@")
    if name == point and (not at_step or int(at_step) == step):
        os.kill(os.getpid(), signal.SIGKILL)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ---------------------------------------------------------------------------- layout helpers
def step_dir_name(step: int) -> str:
    return f"step-{step:06d}"


def _step_of(path: Path) -> int | None:
    match = _STEP_DIR.match(path.name)
    return int(match.group(1)) if match else None


def is_complete(folder: Path) -> bool:
    """A checkpoint folder whose manifest lists files that are all there with their sizes."""
    manifest = folder / MANIFEST
    if not manifest.is_file():
        return False
    try:
        files = json.loads(manifest.read_text(encoding="utf-8"))["files"]
    except (ValueError, KeyError, OSError):
        return False
    return all((folder / name).is_file() and (folder / name).stat().st_size == size for name, size in files.items())


def list_checkpoints(checkpoints_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not checkpoints_dir.is_dir():
        return []
    found = [p for p in checkpoints_dir.iterdir() if p.is_dir() and _step_of(p) is not None and is_complete(p)]
    return sorted(found, key=_step_of)


def read_latest_pointer(checkpoints_dir: Path) -> Path | None:
    pointer = checkpoints_dir / LATEST_POINTER
    if not pointer.is_file():
        return None
    try:
        name = json.loads(pointer.read_text(encoding="utf-8"))["name"]
    except (ValueError, KeyError, OSError):
        return None
    return checkpoints_dir / name


def latest_checkpoint(checkpoints_dir: Path) -> Path | None:
    """The checkpoint the pointer names, or (pointer missing/stale) the newest complete one."""
    pointed = read_latest_pointer(checkpoints_dir)
    if pointed is not None and is_complete(pointed):
        return pointed
    complete = list_checkpoints(checkpoints_dir)
    if complete and pointed is not None:
        log.warning("checkpoint pointer %s names %s, which is incomplete; using %s", checkpoints_dir / LATEST_POINTER, pointed.name, complete[-1].name)
    return complete[-1] if complete else None


def find_checkpoint(resume: str, checkpoints_dir: Path) -> Path:
    """`train.resume` -> a complete checkpoint folder: 'latest' (of this run), a step folder, a checkpoints folder or a run folder."""
    if resume == "latest":
        found = latest_checkpoint(checkpoints_dir)
        if found is None:
            raise ResumeError(f"train.resume=latest: no complete checkpoint in {checkpoints_dir}; "
                              "start without train.resume, or pass the path of a checkpoint")
        return found
    path = Path(resume).expanduser()
    if not path.exists():
        raise ResumeError(f"train.resume={resume}: no such file or folder")
    if (path / MANIFEST).is_file():
        if not is_complete(path):
            raise ResumeError(f"train.resume={resume}: the checkpoint is incomplete (a file is missing or truncated); "
                              f"use an older one from {path.parent}")
        return path
    for candidate in (path, path / "checkpoints"):
        found = latest_checkpoint(candidate)
        if found is not None:
            return found
    raise ResumeError(f"train.resume={resume}: not a checkpoint, and no complete checkpoint found under it")


def read_checkpoint_meta(folder: Path) -> dict:
    return json.loads((folder / STATE_JSON).read_text(encoding="utf-8"))


# ---------------------------------------------------------------------------- resume compatibility
def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, dotted + "."))
        else:
            flat[dotted] = value
    return flat


def _matches(key: str, patterns: Iterable[str]) -> bool:
    return any(key == p or (p.endswith(".*") and key.startswith(p[:-1])) for p in patterns)


def config_differences(saved: dict, current: dict) -> tuple[list[str], list[str]]:
    """(critical, other) differences between two resolved config trees, as 'key: saved -> now' lines."""
    old, new = _flatten(saved), _flatten(current)
    critical, other = [], []
    for key in sorted(set(old) | set(new)):
        if old.get(key) == new.get(key) or _matches(key, RESUME_SILENT_KEYS):
            continue
        line = f"{key}: {old.get(key)!r} -> {new.get(key)!r}"
        (critical if _matches(key, RESUME_CRITICAL_KEYS) else other).append(line)
    return critical, other


def check_resume(folder: Path, current_config: dict, *, force: bool, max_steps: int) -> dict:
    """Refuse (ResumeError) a resume whose config changes what the saved state means, unless forced."""
    meta = read_checkpoint_meta(folder)
    if meta.get("format") != FORMAT_VERSION:
        raise ResumeError(f"{folder}: checkpoint format {meta.get('format')!r} is not supported (expected {FORMAT_VERSION})")
    critical, other = config_differences(meta["config"], current_config)
    if critical and not force:
        raise ResumeError(
            f"cannot resume from {folder}: the config changed what the saved state means:\n  - "
            + "\n  - ".join(critical)
            + "\nrestore these values, start a new run (another output.dir), or force it with train.resume_force=true"
        )
    if critical:
        log.warning("resuming with changed settings because train.resume_force=true:\n  - %s", "\n  - ".join(critical))
    if other:
        log.warning("resuming with changed settings; the optimizer and LR-schedule state come from the checkpoint:\n  - %s",
                    "\n  - ".join(other))
    if meta["step"] > max_steps:
        raise ResumeError(f"cannot resume from {folder}: it is at step {meta['step']} but train.max_steps={max_steps}; "
                          f"raise train.max_steps above {meta['step']}")
    return meta


# ---------------------------------------------------------------------------- save
def _ema_tensors(ema, parameter_names: list[str]) -> tuple[dict[str, torch.Tensor], dict]:
    if not getattr(ema, "enabled", False):
        return {}, {}
    state = dict(ema.state_dict())
    shadow = state.pop("shadow_params")
    if len(shadow) != len(parameter_names):
        raise CheckpointError(f"EMA holds {len(shadow)} tensors but the UNet has {len(parameter_names)} parameters")
    return {name: t.detach().cpu().contiguous() for name, t in zip(parameter_names, shadow)}, state


@dataclass
class SaveRequest:
    """Everything a checkpoint holds; built by the trainer from its live objects."""

    step: int
    epoch: int
    unet: torch.nn.Module
    ema: Any
    objects: dict[str, Any]  # name -> object with state_dict()
    rng_states: list[dict[str, Any]]  # one per rank, rank order
    config_tree: dict
    config_yaml: str


def save_checkpoint(checkpoints_dir: Path, request: SaveRequest, *, keep_last_n: int | None = None) -> Path:
    """Write the checkpoint atomically, move the `latest` pointer, prune; returns the folder.

    Disk full (or any OS error) removes the temporary folder and raises CheckpointError; the
    previous checkpoint is untouched.
    """
    checkpoints_dir = Path(checkpoints_dir)
    checkpoints_dir.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(checkpoints_dir)
    name = step_dir_name(request.step)
    final = checkpoints_dir / name
    tmp = checkpoints_dir / f".tmp-{name}-{os.getpid()}"
    previous = latest_checkpoint(checkpoints_dir)
    started = time.perf_counter()
    try:
        tmp.mkdir()
        _write_checkpoint_files(tmp, request)
        _kill_hook("after_files", request.step)
        fsync_path(tmp)
        if final.exists():  # the same step saved before (a re-run): swap it out, then drop it
            trash = checkpoints_dir / f".tmp-replaced-{name}-{os.getpid()}"
            os.rename(final, trash)
            os.rename(tmp, final)
            shutil.rmtree(trash)
        else:
            os.rename(tmp, final)
        fsync_path(checkpoints_dir)
        _kill_hook("after_rename", request.step)
        _write_pointer(checkpoints_dir, name, request.step)
        _kill_hook("after_pointer", request.step)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        intact = f"previous checkpoint {previous.name} is intact" if previous is not None else "there is no previous checkpoint"
        if err.errno == errno.ENOSPC:
            raise CheckpointError(f"disk full while saving checkpoint to {final}; {intact}. "
                                  f"Free space on {checkpoints_dir} (or lower train.keep_last_n) and resume with train.resume=latest") from err
        raise CheckpointError(f"could not save checkpoint to {final} ({err}); {intact}") from err
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("checkpoint %s saved (%.1f s)", final, time.perf_counter() - started)
    if keep_last_n is not None:
        prune_checkpoints(checkpoints_dir, keep_last_n)
    return final


def _write_checkpoint_files(folder: Path, request: SaveRequest) -> None:
    unet_state = {k: v.detach().cpu().contiguous() for k, v in request.unet.state_dict().items()}
    _write_safetensors(folder / UNET_FILE, unet_state, {"format": "pt"})
    _kill_hook("mid_files", request.step)
    parameter_names = [n for n, _ in request.unet.named_parameters()]
    ema_weights, ema_scalars = _ema_tensors(request.ema, parameter_names)
    if ema_weights:
        _write_safetensors(folder / EMA_FILE, ema_weights, {"format": "pt"})

    tensors: dict[str, torch.Tensor] = {}
    objects = {name: encode_state(obj.state_dict(), tensors, name) for name, obj in request.objects.items()}
    _write_safetensors(folder / STATE_TENSORS, tensors)
    meta = {
        "format": FORMAT_VERSION,
        "step": request.step,
        "epoch": request.epoch,
        "world_size": len(request.rng_states),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "config_hash": config_hash(request.config_tree),
        "config": request.config_tree,
        "ema": encode_state(ema_scalars, tensors, "ema") if ema_weights else None,
        "objects": objects,
    }
    _write_text(folder / STATE_JSON, json.dumps(meta, indent=1) + "\n")
    for rank, rng in enumerate(request.rng_states):
        rng_tensors: dict[str, torch.Tensor] = {}
        encoded = encode_state(rng, rng_tensors, "rng")
        _write_safetensors(folder / f"rng-rank{rank}.safetensors", rng_tensors)
        _write_text(folder / f"rng-rank{rank}.json", json.dumps(encoded) + "\n")
    _write_text(folder / CONFIG_FILE, request.config_yaml)
    files = {p.name: p.stat().st_size for p in sorted(folder.iterdir()) if p.is_file()}
    _write_text(folder / MANIFEST, json.dumps({"format": FORMAT_VERSION, "step": request.step, "files": files}, indent=1) + "\n")


def _write_pointer(checkpoints_dir: Path, name: str, step: int) -> None:
    tmp = checkpoints_dir / f".{LATEST_POINTER}.tmp-{os.getpid()}"
    _write_text(tmp, json.dumps({"name": name, "step": step}) + "\n")
    os.replace(tmp, checkpoints_dir / LATEST_POINTER)
    fsync_path(checkpoints_dir)


def _remove_stale_temporaries(checkpoints_dir: Path) -> None:
    """Temporary folders of saves that died (their process is gone) are garbage."""
    for path in checkpoints_dir.iterdir():
        match = _TMP_DIR.match(path.name)
        if match and int(match.group(1)) != os.getpid() and not _pid_alive(int(match.group(1))):
            shutil.rmtree(path, ignore_errors=True)


def prune_checkpoints(checkpoints_dir: Path, keep_last_n: int) -> list[Path]:
    """Delete all but the newest `keep_last_n` checkpoints (never the one `latest` names)."""
    pointed = read_latest_pointer(checkpoints_dir)
    steps = sorted((p for p in checkpoints_dir.iterdir() if p.is_dir() and _step_of(p) is not None), key=_step_of)
    removed = []
    for path in steps[: max(0, len(steps) - keep_last_n)]:
        if pointed is not None and path.name == pointed.name:
            continue
        shutil.rmtree(path)
        removed.append(path)
    return removed


# ---------------------------------------------------------------------------- load
@dataclass
class LoadedCheckpoint:
    folder: Path
    meta: dict
    unet: dict[str, torch.Tensor]
    ema: dict[str, torch.Tensor] | None
    objects: dict[str, Any]

    @property
    def step(self) -> int:
        return int(self.meta["step"])

    @property
    def epoch(self) -> int:
        return int(self.meta["epoch"])

    def rng_state(self, rank: int) -> dict[str, Any]:
        json_path = self.folder / f"rng-rank{rank}.json"
        if not json_path.is_file():
            raise ResumeError(f"{self.folder} holds no RNG state for rank {rank} (saved with {self.meta['world_size']} process(es)); "
                              "resume with the same number of processes")
        tensors = load_file(str(self.folder / f"rng-rank{rank}.safetensors"))
        return decode_state(json.loads(json_path.read_text(encoding="utf-8")), tensors)


def load_checkpoint(folder: Path) -> LoadedCheckpoint:
    folder = Path(folder)
    if not is_complete(folder):
        raise ResumeError(f"{folder} is not a complete checkpoint")
    meta = read_checkpoint_meta(folder)
    tensors = load_file(str(folder / STATE_TENSORS))
    objects = {name: decode_state(encoded, tensors) for name, encoded in meta["objects"].items()}
    ema = load_file(str(folder / EMA_FILE)) if (folder / EMA_FILE).is_file() else None
    return LoadedCheckpoint(folder=folder, meta=meta, unet=load_file(str(folder / UNET_FILE)), ema=ema, objects=objects)


def restore_training_state(checkpoint: LoadedCheckpoint, *, unet: torch.nn.Module, ema, objects: dict[str, Any],
                           generator: torch.Generator | None, rank: int) -> None:
    """Load every piece of `checkpoint` into the live objects (same names as when saved)."""
    unet.load_state_dict(checkpoint.unet, strict=True)
    if getattr(ema, "enabled", False):
        if checkpoint.ema is None:
            raise ResumeError(f"{checkpoint.folder} has no EMA weights but train.ema.enabled is true; resume with train.ema.enabled=false")
        names = [n for n, _ in unet.named_parameters()]
        device = next(unet.parameters()).device
        state = decode_state(checkpoint.meta["ema"], {})
        state["shadow_params"] = [checkpoint.ema[n].to(device) for n in names]
        ema.load_state_dict(state)
    missing = sorted(set(objects) - set(checkpoint.objects))
    if missing:
        raise ResumeError(f"{checkpoint.folder} holds no state for {', '.join(missing)}")
    for name, obj in objects.items():
        try:
            obj.load_state_dict(checkpoint.objects[name])
        except (ValueError, KeyError) as err:
            raise ResumeError(f"cannot restore {name} from {checkpoint.folder}: {err}") from err
    restore_rng_state(checkpoint.rng_state(rank), generator)


def checkpoint_unet_weights(folder: Path, *, ema: bool) -> dict[str, torch.Tensor]:
    """The UNet weights of a checkpoint: raw, or EMA (the buffers come from the raw state)."""
    raw = load_file(str(Path(folder) / UNET_FILE))
    if not ema:
        return raw
    path = Path(folder) / EMA_FILE
    if not path.is_file():
        raise ResumeError(f"{folder} holds no EMA weights (the run had train.ema.enabled=false); export with --no-ema")
    return {**raw, **load_file(str(path))}

