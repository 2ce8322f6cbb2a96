"""Small helpers of the training loop."""

from __future__ import annotations

import hashlib
import math

import numpy as np
import torch


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; training stops before anything is saved from that step."""


def unet_forward(unet, noisy_latents, timesteps, *, prompt_embeds, pooled_prompt_embeds, time_ids) -> torch.Tensor:
    """SDXL UNet call with its micro-conditioning (Podell et al. 2023, sec. 2.2)."""
    return unet(
        noisy_latents,
        timesteps,
        encoder_hidden_states=prompt_embeds,
        added_cond_kwargs={"text_embeds": pooled_prompt_embeds, "time_ids": time_ids},
        return_dict=False,
    )[0]


class LossHistory:
    """Per-step mean losses; head/tail means over the first/last 10% of steps for summary.json."""

    def __init__(self, losses: list[float] | None = None):
        self.losses: list[float] = list(losses or [])

    def append(self, loss: float) -> None:
        self.losses.append(float(loss))

    def _window(self) -> int:
        return max(1, math.ceil(len(self.losses) * 0.1))

    def head_mean(self) -> float | None:
        if not self.losses:
            return None
        window = self.losses[: self._window()]
        return sum(window) / len(window)

    def tail_mean(self) -> float | None:
        if not self.losses:
            return None
        window = self.losses[-self._window():]
        return sum(window) / len(window)

    def state_dict(self) -> dict:
        return {"losses": self.losses}

    def load_state_dict(self, state: dict) -> None:
        self.losses = [float(x) for x in state["losses"]]


def sample_keyed_noise(
    objective, latents: torch.Tensor, indices: list[int], *, seed: int, step: int, device: torch.device | str, pixel_size: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(noise, timesteps) of each sample from a generator keyed by (seed, step, dataset index).

    A sample's draw does not depend on which process or batch position it landed in, so a run
    split over N processes sees what one process with the same global batch would see.
    """
    noises, timesteps = [], []
    for row, index in enumerate(indices):
        generator = torch.Generator(device="cpu").manual_seed(_keyed_seed(seed, step, index))
        timesteps.append(objective.sample_timesteps(1, generator, device=device, pixel_size=pixel_size))
        noises.append(objective.sample_noise(latents[row : row + 1], generator))
    return torch.cat(noises), torch.cat(timesteps)


def _keyed_seed(*parts: int) -> int:
    state = np.random.SeedSequence([int(part) & 0xFFFFFFFF for part in parts]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


@torch.no_grad()
def weights_fingerprint(module: torch.nn.Module) -> str:
    """A short digest of every parameter's exact bits, computed on the parameters' device.

    Per parameter: the sum of its bit patterns and a position-weighted sum (int64, wrapping), so
    a single flipped bit or a swapped pair changes the digest; only the small vector of sums
    leaves the device.
    """
    sums = []
    for param in module.parameters():
        flat = param.detach().reshape(-1)
        bits = flat.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[flat.element_size()]).to(torch.int64)
        weights = torch.arange(bits.numel(), device=bits.device, dtype=torch.int64) % 65521 + 1
        sums.append(torch.stack([bits.sum(), (bits * weights).sum()]))
    vector = torch.stack(sums).cpu().numpy().tobytes() if sums else b""
    return hashlib.sha256(vector).hexdigest()[:16]
