"""Optimizers for the memory options: bf16 AdamW with stochastic rounding, and the fused backward pass.

`BF16StochasticAdamW` trains bf16 weights without fp32 master copies: moments are fp32, the update
is computed in fp32 and written back with stochastic rounding, which is unbiased
(E[round(x)] = x), so updates far below a bf16 ulp still move the weights on average (Zamirai
et al. 2020, "Revisiting BFloat16 Training", sec. 4).

`FusedBackwardOptimizer` steps each parameter inside the backward pass, from a
`register_post_accumulate_grad_hook`, and frees its gradient at once: the full set of gradients
never exists, so peak memory drops by about one copy of the weights. There is no global gradient
norm to clip and no accumulation across micro-steps (config validation rejects both), and it
cannot run under DDP (the hook fires before gradients are all-reduced).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence

import torch

OPTIMIZERS = ("adamw", "adamw8bit", "adafactor")

_MASK_HIGH_16 = -65536  # int32 with the low 16 bits clear: keeps sign, exponent and the bf16 mantissa


def _mix_key(*parts: int) -> int:
    """A 63-bit seed from integers (splitmix64 finaliser), so nearby keys give unrelated streams."""
    value = 0x9E3779B97F4A7C15
    for part in parts:
        value = (value ^ (int(part) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        value = (value ^ (value >> 31)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
    return value >> 1


def stochastic_round_to_bf16(value: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """fp32 -> bf16, rounding away from zero with probability equal to the dropped fraction.

    Adding uniform random bits below the bf16 mantissa and truncating is unbiased stochastic
    rounding of the magnitude; the sign bit is untouched.
    """
    if value.dtype != torch.float32:
        raise TypeError(f"stochastic_round_to_bf16 expects float32, got {value.dtype}")
    bits = value.contiguous().view(torch.int32)
    noise = torch.randint(0, 1 << 16, value.shape, dtype=torch.int32, device=value.device, generator=generator)
    return torch.bitwise_and(bits + noise, _MASK_HIGH_16).view(torch.float32).to(torch.bfloat16)


class BF16StochasticAdamW(torch.optim.Optimizer):
    """AdamW (decoupled weight decay, as torch.optim.AdamW) whose bf16 parameters are written back
    with stochastic rounding; fp32 parameters are updated exactly like torch's AdamW.

    The random bits of a parameter are keyed by (seed, its position in this optimizer, its step):
    every rank draws the same bits (DDP replicas stay identical) and a resumed run draws what the
    uninterrupted run would have, with no generator state to save.
    """

    def __init__(
        self,
        params: Iterable[torch.nn.Parameter] | Iterable[dict],
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        seed: int = 0,
    ) -> None:
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.seed = seed
        self._generators: dict[torch.device, torch.Generator] = {}

    def _generator(self, device: torch.device, key: int) -> torch.Generator:
        generator = self._generators.get(device)
        if generator is None:
            generator = self._generators[device] = torch.Generator(device=device)
        return generator.manual_seed(key)

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        position = 0
        for group in self.param_groups:
            lr, (beta1, beta2), eps, weight_decay = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for param in group["params"]:
                position += 1
                if param.grad is None:
                    continue
                grad = param.grad.float()
                state = self.state[param]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(param, dtype=torch.float32, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(param, dtype=torch.float32, memory_format=torch.preserve_format)
                state["step"] += 1
                step = state["step"]
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                exp_avg.lerp_(grad, 1 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                denominator = (exp_avg_sq.sqrt() / math.sqrt(1 - beta2**step)).add_(eps)
                updated = param.float() if param.dtype != torch.float32 else param
                updated.mul_(1 - lr * weight_decay)
                updated.addcdiv_(exp_avg, denominator, value=-lr / (1 - beta1**step))
                if param.dtype == torch.bfloat16:
                    generator = self._generator(param.device, _mix_key(self.seed, position, step))
                    param.copy_(stochastic_round_to_bf16(updated, generator))
                elif updated is not param:
                    param.copy_(updated)
        return loss


class FusedBackwardOptimizer(torch.optim.Optimizer):
    """One inner optimizer per parameter, stepped from a post-accumulate-grad hook during backward.

    `step()` only runs a closure and `zero_grad()` finds no gradients: the loop stays the same.
    `param_groups` are the inner optimizers' own group dicts, so an LR scheduler that sets
    `group["lr"]` drives every inner optimizer. A parameter must be used once per backward (true of
    the SDXL UNet): the hook fires on every accumulation into `.grad`.
    """

    def __init__(
        self,
        params: Iterable[torch.nn.Parameter],
        make_optimizer: Callable[[list[torch.nn.Parameter], int], torch.optim.Optimizer],
    ) -> None:
        params = list(params)
        super().__init__(params, {})
        self.inner: list[torch.optim.Optimizer] = [make_optimizer([param], index) for index, param in enumerate(params)]
        self._by_param = {param: optimizer for param, optimizer in zip(params, self.inner)}
        self.param_groups = [group for optimizer in self.inner for group in optimizer.param_groups]
        self._hooks = [param.register_post_accumulate_grad_hook(self._step_parameter) for param in params]

    def _step_parameter(self, param: torch.nn.Parameter) -> None:
        optimizer = self._by_param[param]
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None):
        # The updates already happened inside backward.
        if closure is None:
            return None
        with torch.enable_grad():
            return closure()

    def state_dict(self) -> dict:
        return {"per_parameter": [optimizer.state_dict() for optimizer in self.inner]}

    def load_state_dict(self, state_dict: dict) -> None:
        saved: Sequence[dict] = state_dict["per_parameter"]
        if len(saved) != len(self.inner):
            raise ValueError(f"fused-backward optimizer state holds {len(saved)} parameters, this model has {len(self.inner)}")
        for optimizer, state in zip(self.inner, saved):
            optimizer.load_state_dict(state)
        self.param_groups = [group for optimizer in self.inner for group in optimizer.param_groups]

    def remove_hooks(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []


def _adamw8bit_class():
    try:
        import bitsandbytes
    except ImportError as err:
        raise ValueError("train.optimizer = adamw8bit needs bitsandbytes (pip install bitsandbytes) on a CUDA device") from err
    return bitsandbytes.optim.AdamW8bit


def optimizer_factory(
    name: str,
    *,
    learning_rate: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
    full_bf16: bool,
    seed: int,
) -> Callable[[list[torch.nn.Parameter], int], torch.optim.Optimizer]:
    """A function (params, index) -> optimizer for `name`; `index` separates the rounding streams of
    per-parameter optimizers."""
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; allowed: {', '.join(OPTIMIZERS)}")
    if full_bf16 and name != "adamw":
        raise ValueError(f"full_bf16 supports optimizer adamw (stochastic-rounding AdamW) only, got {name!r}")
    if name == "adamw" and full_bf16:
        return lambda params, index: BF16StochasticAdamW(
            params, lr=learning_rate, betas=betas, eps=eps, weight_decay=weight_decay, seed=_mix_key(seed, index)
        )
    if name == "adamw":
        return lambda params, index: torch.optim.AdamW(params, lr=learning_rate, betas=betas, eps=eps, weight_decay=weight_decay)
    if name == "adamw8bit":
        adamw8bit = _adamw8bit_class()
        return lambda params, index: adamw8bit(params, lr=learning_rate, betas=betas, eps=eps, weight_decay=weight_decay)
    from transformers.optimization import Adafactor

    # A fixed learning rate (relative_step=False, no parameter scaling) so LR schedules mean the same
    # as with AdamW; no first moment (beta1=None) to keep the factored, low-memory state.
    return lambda params, index: Adafactor(
        params, lr=learning_rate, relative_step=False, scale_parameter=False, warmup_init=False, weight_decay=weight_decay
    )
