"""The DeepSpeed JSON, generated: a pure function of the training config and the world size."""

from __future__ import annotations

from typing import Literal

Precision = Literal["fp32", "bf16", "fp16"]


def build_deepspeed_config(
    *,
    micro_batch: int,
    grad_accum: int,
    world_size: int,
    zero_stage: int,
    precision: Precision = "fp32",
    grad_clip: float | None = 1.0,
    hpz_partition_size: int | None = None,
    quantized_weights: bool = False,
    quantized_gradients: bool = False,
    log_every: int = 1_000_000,
) -> dict:
    """Global batch = micro × accumulation × world, as DeepSpeed checks at initialize.

    The optimizer is built by tessera (a torch optimizer; DeepSpeed's fused ones need CUDA), so
    `zero_allow_untested_optimizer` is set; LR schedules are applied by tessera too.
    """
    if min(micro_batch, grad_accum, world_size) < 1:
        raise ValueError(f"micro_batch, grad_accum and world_size must be >= 1, "
                         f"got {micro_batch}, {grad_accum}, {world_size}")
    if zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"zero_stage must be 0-3, got {zero_stage}")
    cfg: dict = {
        "train_batch_size": micro_batch * grad_accum * world_size,
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "zero_optimization": {"stage": zero_stage},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": log_every,
        "wall_clock_breakdown": False,
    }
    if grad_clip:
        cfg["gradient_clipping"] = grad_clip
    if precision == "bf16":
        cfg["bf16"] = {"enabled": True}
    elif precision == "fp16":
        cfg["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16}
    if zero_stage == 3:
        # Gather whole weights for the checkpoint's consolidated copy (export reads it).
        cfg["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] = True
    if hpz_partition_size:
        if zero_stage != 3:
            raise ValueError("hpz_partition_size (ZeRO++ hierarchical partitioning) needs zero_stage 3")
        if world_size % hpz_partition_size:
            raise ValueError(f"world_size {world_size} is not a multiple of "
                             f"hpz_partition_size {hpz_partition_size}")
        cfg["zero_optimization"]["zero_hpz_partition_size"] = hpz_partition_size
    if quantized_weights or quantized_gradients:
        # ZeRO++ qwZ (int8 weight all-gather) / qgZ (int4 all-to-all gradient reduction; DeepSpeed
        # offers no error feedback for it). Both need DeepSpeed's CUDA quantizer kernels.
        if zero_stage != 3:
            raise ValueError("quantized weights/gradients (ZeRO++) need zero_stage 3")
        cfg["zero_optimization"]["zero_quantized_weights"] = bool(quantized_weights)
        cfg["zero_optimization"]["zero_quantized_gradients"] = bool(quantized_gradients)
    return cfg
