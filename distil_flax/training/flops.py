"""Useful FLOPs of a distillation step and model FLOPs utilisation (MFU).

Counts only useful work, as in DESIGN.md: matmuls and attention, forward = 1×, backward = 2×;
the MLM head only on the fraction of positions a loss reads. Recomputation (remat) and padding
are not useful work and are not counted.

Plain Python (no JAX import), so the PyTorch peer benchmark counts FLOPs with the same formula.
"""

from typing import Any

# Dense bf16 matmul peaks in FLOP/s, by device kind (substring match). H100 uses the measured
# 8192³ matmul peak (DESIGN.md), not the datasheet's 989 TFLOP/s, so MFU reads against what a
# matmul can actually reach.
PEAK_FLOPS = {
    "H100": 789e12,
    "H200": 789e12,
    "A100": 312e12,
    "L4": 121e12,
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v6": 918e12,
}


def layer_flops(hidden: int, intermediate: int, seq_len: int) -> float:
    """Forward FLOPs per token of one encoder layer."""
    return 2 * (4 * hidden**2 + 2 * hidden * intermediate) + 4 * seq_len * hidden


def head_flops(hidden: int, vocab: int, fraction: float) -> float:
    """Forward FLOPs per token of the MLM head run on `fraction` of the positions."""
    return 2 * (hidden**2 + hidden * vocab) * fraction


def model_flops_per_token(model, seq_len: int, head_fraction: float) -> float:
    """Forward FLOPs per token of an `Encoder` whose head runs on `head_fraction` of positions.

    `model` is anything with `num_layers`, `hidden_size`, `intermediate_size` and `vocab_size`.
    """
    return (model.num_layers * layer_flops(model.hidden_size, model.intermediate_size, seq_len)
            + head_flops(model.hidden_size, model.vocab_size, head_fraction))


def step_flops_per_token(student, teacher, seq_len: int, student_head: float,
                         teacher_head: float) -> float:
    """Teacher forward + student forward and backward, per token."""
    total = 3 * model_flops_per_token(student, seq_len, student_head)
    if teacher is not None:
        total += model_flops_per_token(teacher, seq_len, teacher_head)
    return total


def peak_flops_of_kind(kind: str) -> float | None:
    """Peak FLOP/s for a device name ("NVIDIA H100 80GB HBM3", "TPU v5p"); None if unknown."""
    for name, flops in PEAK_FLOPS.items():
        if name.lower() in kind.lower():
            return flops
    return None


def peak_flops(device: Any = None, override_tflops: float = 0.0) -> float | None:
    """Peak FLOP/s of one JAX device: the override if given, else looked up; None if unknown."""
    if override_tflops:
        return override_tflops * 1e12
    if device is None:
        import jax

        device = jax.devices()[0]
    return peak_flops_of_kind(device.device_kind)
