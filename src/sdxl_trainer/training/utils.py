"""Small helpers of the training loop."""

from __future__ import annotations

import math

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
