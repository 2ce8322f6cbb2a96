"""Precision and memory options on CPU: what CPU can run is run, what it cannot is a clear error."""

from __future__ import annotations

import copy

import pytest
import torch
from diffusers import UNet2DConditionModel

from sdxl_trainer.config import ConfigError, load_config
from sdxl_trainer.models.setup import attention_backend, prepare_unet_for_training
from sdxl_trainer.models.tiny import tiny_unet_config
from sdxl_trainer.training.optimizers import BF16StochasticAdamW, FusedBackwardOptimizer, stochastic_round_to_bf16
from sdxl_trainer.training.setup import build_ema, build_lr_scheduler, build_optimizer
from sdxl_trainer.training.utils import unet_forward, weights_fingerprint
from sdxl_trainer.utils.device import DeviceError, check_process_options, plan_device



@pytest.fixture(scope="module")
def tiny_unet() -> UNet2DConditionModel:
    torch.manual_seed(0)
    return UNet2DConditionModel(**tiny_unet_config())


def _batch(batch_size: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        "noisy": torch.randn(batch_size, 4, 16, 16, generator=generator),
        "timesteps": torch.randint(0, 1000, (batch_size,), generator=generator),
        "prompt_embeds": torch.randn(batch_size, 77, 96, generator=generator),
        "pooled_prompt_embeds": torch.randn(batch_size, 64, generator=generator),
        "time_ids": torch.tensor([[128.0, 128.0, 0.0, 0.0, 128.0, 128.0]] * batch_size),
        "target": torch.randn(batch_size, 4, 16, 16, generator=generator),
    }


def _loss(unet, batch) -> torch.Tensor:
    output = unet_forward(unet, batch["noisy"], batch["timesteps"], prompt_embeds=batch["prompt_embeds"],
                          pooled_prompt_embeds=batch["pooled_prompt_embeds"], time_ids=batch["time_ids"])
    return (output.float() - batch["target"]).pow(2).mean()


def _train_steps(unet, optimizer, steps: int, *, autocast: bool = False, clip: float = 0.0) -> list[float]:
    losses = []
    for step in range(steps):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = _loss(unet, _batch(seed=step))
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(unet.parameters(), clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


# ----------------------------------------------------------------- what CPU runs
def test_sdpa_attention_is_the_default(tiny_unet):
    assert attention_backend(tiny_unet).startswith("AttnProcessor2_0 (PyTorch scaled_dot_product_attention)")


def test_bf16_autocast_step_keeps_fp32_master_weights(tiny_unet):
    unet = copy.deepcopy(tiny_unet)
    before = [p.detach().clone() for p in unet.parameters()]
    optimizer = build_optimizer(unet.parameters(), learning_rate=1e-3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        output = unet_forward(unet, _batch()["noisy"], _batch()["timesteps"], prompt_embeds=_batch()["prompt_embeds"],
                              pooled_prompt_embeds=_batch()["pooled_prompt_embeds"], time_ids=_batch()["time_ids"])
    assert output.dtype == torch.bfloat16  # the forward really ran in bf16
    loss = (output.float() - _batch()["target"]).pow(2).mean()
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all() for p in unet.parameters())
    optimizer.step()
    assert all(p.dtype == torch.float32 for p in unet.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, unet.parameters()))


def test_adafactor_step_trains(tiny_unet):
    from transformers.optimization import Adafactor

    unet = copy.deepcopy(tiny_unet)
    optimizer = build_optimizer(unet.parameters(), learning_rate=1e-3, name="adafactor")
    assert isinstance(optimizer, Adafactor)
    assert optimizer.param_groups[0]["relative_step"] is False and optimizer.param_groups[0]["lr"] == 1e-3
    before = [p.detach().clone() for p in unet.parameters()]
    losses = _train_steps(unet, optimizer, 2)
    assert all(torch.isfinite(torch.tensor(losses)))
    changed = sum(not torch.equal(a, b) for a, b in zip(before, unet.parameters()))
    assert changed == len(before)
    # Factored second moment: a 2-D weight keeps a row and a column vector, not a full matrix.
    weight = next(p for p in unet.parameters() if p.ndim == 2 and min(p.shape) > 1)
    assert "exp_avg_sq_row" in optimizer.state[weight] and "exp_avg_sq" not in optimizer.state[weight]


@pytest.mark.parametrize("name", ["adamw", "adafactor"])
def test_fused_backward_equals_the_usual_step(tiny_unet, name):
    reference, fused = copy.deepcopy(tiny_unet), copy.deepcopy(tiny_unet)
    for unet in (reference, fused):
        prepare_unet_for_training(unet, gradient_checkpointing=True)
    usual = build_optimizer(reference.parameters(), learning_rate=1e-3, name=name)
    in_backward = build_optimizer(fused.parameters(), learning_rate=1e-3, name=name, fused_backward=True)
    assert isinstance(in_backward, FusedBackwardOptimizer)
    scheduler = build_lr_scheduler(in_backward, name="linear", warmup_steps=0, total_steps=10)
    reference_scheduler = build_lr_scheduler(usual, name="linear", warmup_steps=0, total_steps=10)
    for step in range(2):
        loss = _loss(fused, _batch(seed=step))
        loss.backward()
        # Gradients are freed inside backward, parameter by parameter.
        assert all(p.grad is None for p in fused.parameters())
        in_backward.step()
        in_backward.zero_grad(set_to_none=True)
        scheduler.step()
        _loss(reference, _batch(seed=step)).backward()
        usual.step()
        usual.zero_grad(set_to_none=True)
        reference_scheduler.step()
    # The scheduler reaches every per-parameter optimizer.
    assert {group["lr"] for group in in_backward.param_groups} == {usual.param_groups[0]["lr"]}
    difference = max((a - b).abs().max().item() for a, b in zip(reference.parameters(), fused.parameters()))
    moved = max((a - b).abs().max().item() for a, b in zip(reference.parameters(), tiny_unet.parameters()))
    assert moved > 1e-4
    assert difference < 1e-6, difference
    # Its state round-trips (accelerate and checkpoints call state_dict/load_state_dict).
    state = in_backward.state_dict()
    in_backward.load_state_dict(state)
    assert len(state["per_parameter"]) == len(list(fused.parameters()))


def test_stochastic_rounding_is_unbiased():
    # 1 + k/1024 lies between bf16 neighbours 1 and 1 + 1/128: nearest rounding is biased, stochastic is not.
    values = torch.full((200_000,), 1.0 + 3 / 1024)
    generator = torch.Generator().manual_seed(0)
    rounded = stochastic_round_to_bf16(values, generator)
    assert rounded.dtype == torch.bfloat16
    assert set(rounded.float().unique().tolist()) == {1.0, 1.0 + 1 / 128}
    assert rounded.float().mean().item() == pytest.approx(1.0 + 3 / 1024, abs=2e-5)
    assert values.to(torch.bfloat16).float().mean().item() == 1.0  # round-to-nearest loses it
    negative = stochastic_round_to_bf16(-values, generator)
    assert negative.float().mean().item() == pytest.approx(-(1.0 + 3 / 1024), abs=2e-5)
    exact = torch.tensor([0.0, 1.0, -2.5, 1.0 + 1 / 128])
    assert torch.equal(stochastic_round_to_bf16(exact, generator).float(), exact)


def test_full_bf16_adamw_keeps_bf16_weights_and_small_updates_survive():
    # Updates of lr=1e-3 are below half a bf16 ulp at 1.0 (2**-9): round-to-nearest never moves.
    steps, lr = 40, 1e-3
    param = torch.nn.Parameter(torch.ones(20_000, dtype=torch.bfloat16))
    optimizer = BF16StochasticAdamW([param], lr=lr, weight_decay=0.0, seed=3)
    nearest = torch.nn.Parameter(torch.ones(20_000, dtype=torch.bfloat16))
    plain = torch.optim.AdamW([nearest], lr=lr, weight_decay=0.0)
    for _ in range(steps):
        for p, opt in ((param, optimizer), (nearest, plain)):
            p.grad = torch.ones_like(p)
            opt.step()
    assert param.dtype == torch.bfloat16
    assert optimizer.state[param]["exp_avg"].dtype == torch.float32
    assert torch.equal(nearest.float(), torch.ones(20_000))  # stuck at 1.0
    expected = 1.0 - steps * lr  # Adam with a constant gradient steps by lr each time
    assert param.float().mean().item() == pytest.approx(expected, abs=5e-4)


def test_full_bf16_adamw_equals_torch_adamw_on_fp32_weights():
    torch.manual_seed(0)
    ours = torch.nn.Parameter(torch.randn(64, 32))
    theirs = torch.nn.Parameter(ours.detach().clone())
    a = BF16StochasticAdamW([ours], lr=1e-2, weight_decay=0.1)
    b = torch.optim.AdamW([theirs], lr=1e-2, weight_decay=0.1)
    for step in range(5):
        grad = torch.randn(64, 32, generator=torch.Generator().manual_seed(step))
        ours.grad, theirs.grad = grad.clone(), grad.clone()
        a.step()
        b.step()
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7)


def test_full_bf16_unet_trains_under_bf16_autocast(tiny_unet):
    unet = prepare_unet_for_training(copy.deepcopy(tiny_unet), gradient_checkpointing=False, dtype=torch.bfloat16)
    optimizer = build_optimizer(unet.parameters(), learning_rate=1e-3, full_bf16=True)
    before = weights_fingerprint(unet)
    losses = _train_steps(unet, optimizer, 2, autocast=True, clip=1.0)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert {p.dtype for p in unet.parameters()} == {torch.bfloat16}
    assert weights_fingerprint(unet) != before


def test_compile_is_applied_in_place(tiny_unet):
    # Compiling the tiny UNet takes minutes on 2 CPU cores (measured ~8 min): only the wiring is
    # checked here; bench/gpu_sdxl.py runs compiled steps on a GPU.
    unet = prepare_unet_for_training(copy.deepcopy(tiny_unet), gradient_checkpointing=False, compile=True)
    assert unet._compiled_call_impl is not None
    assert isinstance(unet, UNet2DConditionModel)  # state_dict keys and save_pretrained unchanged
    assert set(unet.state_dict()) == set(tiny_unet.state_dict())


def test_ema_update_matches_the_closed_form_for_fp32_and_bf16_weights():
    # shadow <- d * shadow + (1 - d) * weight, at update k = 1, 2, ... with warm-up decay d_k = 1 - k^(-2/3) capped at
    # `decay` (diffusers EMAModel, inv_gamma 1, power 2/3); shadows stay fp32 even for bf16 weights.
    generator = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Linear(7, 3)).to(dtype)
        ema = build_ema(model, enabled=True, decay=0.95, warmup=True)
        expected = [p.detach().double() for p in model.parameters()]
        for step in range(1, 6):
            with torch.no_grad():
                for parameter in model.parameters():
                    parameter.add_(torch.randn(parameter.shape, generator=generator).to(dtype))
            ema.step(model.parameters())
            decay = min(0.95, 1 - step ** (-2 / 3))
            expected = [decay * e + (1 - decay) * p.detach().double() for e, p in zip(expected, model.parameters())]
        for shadow, reference in zip(ema.shadow_params, expected):
            assert shadow.dtype == torch.float32
            torch.testing.assert_close(shadow.double(), reference, rtol=1e-5, atol=1e-6)


def test_weights_fingerprint_sees_one_bit():
    module = torch.nn.Linear(8, 8)
    before = weights_fingerprint(module)
    with torch.no_grad():
        module.weight.view(-1)[5] = torch.nextafter(module.weight.view(-1)[5], torch.tensor(10.0))
    assert weights_fingerprint(module) != before


# ----------------------------------------------------------------- what CPU cannot run: clear errors
def test_fp16_on_cpu_is_a_device_error():
    with pytest.raises(DeviceError, match="fp16 needs a GPU"):
        plan_device("cpu", "fp16")


def test_bf16_autocast_on_cpu_is_allowed():
    plan = plan_device("cpu", "bf16", full_bf16=True)
    assert plan.mixed_precision == "bf16" and plan.train_dtype == torch.bfloat16


def test_adamw8bit_without_cuda_is_a_device_error():
    with pytest.raises(DeviceError, match="adamw8bit needs a CUDA device"):
        plan_device("cpu", "no", optimizer="adamw8bit")


def test_device_errors_are_reported_together():
    with pytest.raises(DeviceError) as error:
        plan_device("cpu", "fp16", optimizer="adamw8bit")
    assert "fp16" in str(error.value) and "adamw8bit" in str(error.value)


def test_fused_backward_refuses_several_processes():
    check_process_options(1, fused_backward=True)
    with pytest.raises(DeviceError, match="one process only"):
        check_process_options(2, fused_backward=True)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["train.fused_backward=true", "train.max_grad_norm=0", "train.gradient_accumulation_steps=2"], "cannot accumulate"),
        (["train.fused_backward=true"], "no global gradient norm"),
        (["train.fused_backward=true", "train.max_grad_norm=0", "train.mixed_precision=fp16"], "gradient scaler"),
        (["train.full_bf16=true"], "full_bf16 needs mixed_precision bf16"),
        (["train.full_bf16=true", "train.mixed_precision=bf16", "train.optimizer=adafactor"], "adamw only"),
        (["train.optimizer=lion"], "optimizer"),
    ],
)
def test_incompatible_options_are_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


# ----------------------------------------------------------------- presets
def test_presets_fill_only_what_the_user_left_out():
    config = load_config(None, ["train.preset=24gb"])
    assert (config.train.mixed_precision, config.train.optimizer, config.train.fused_backward) == ("bf16", "adafactor", True)
    assert config.model.gradient_checkpointing and config.train.batch_size == 1 and config.train.max_grad_norm == 0
    explicit = load_config(None, ["train.preset=24gb", "train.batch_size=3", "model.gradient_checkpointing=false"])
    assert explicit.train.batch_size == 3 and not explicit.model.gradient_checkpointing
    assert explicit.train.optimizer == "adafactor"
    big = load_config(None, ["train.preset=80gb"])
    assert big.train.optimizer == "adamw" and not big.model.gradient_checkpointing and not big.train.fused_backward
    assert load_config(None, ["train.preset=48gb"]).train.optimizer == "adamw8bit"
    # An explicit value that contradicts the preset is reported, not silently replaced.
    with pytest.raises(ConfigError, match="no global gradient norm"):
        load_config(None, ["train.preset=24gb", "train.max_grad_norm=1.0"])
    with pytest.raises(ConfigError, match="preset"):
        load_config(None, ["train.preset=12gb"])


def test_resolved_preset_config_round_trips(tmp_path):
    from sdxl_trainer.config import dump_config

    config = load_config(None, ["train.preset=24gb", "train.batch_size=2"])
    path = tmp_path / "resolved.yaml"
    path.write_text(dump_config(config))
    assert load_config(path) == config


def test_init_config_documents_presets_and_options():
    from sdxl_trainer.config import example_config

    text = example_config()
    for needle in ("preset: none", "24gb = bf16", "optimizer: adamw", "full_bf16: false", "fused_backward: false", "compile: false"):
        assert needle in text, needle
