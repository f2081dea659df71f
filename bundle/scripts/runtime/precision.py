"""Number formats: which one a run uses (fp32 or bfloat16), for inference slices and for training.

- :func:`native_bf16`: whether this CPU computes bfloat16 natively (else it is emulated, and slower than fp32);
- :func:`resolve_precision`: what ``"auto"`` means for inference (:class:`scripts.runtime.inference.SliceRunner`);
- :func:`training_precision` and :func:`autocast`: what it means for the GAN trainer, and the autocast context
  its forward passes run in (fp32 master weights and optimizer state in every case).
"""

from __future__ import annotations

import torch

#: Number formats a network can run in (``auto``: :func:`resolve_precision` / :func:`training_precision`).
PRECISIONS = ("auto", "fp32", "bf16")


def native_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX-512 BF16 or AMX); without it bf16 is emulated, and slow."""
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:  # a torch without these probes
        return False


def check_precision(precision: str) -> str:
    """``precision`` itself when it is one of :data:`PRECISIONS` (bf16 on a CPU without native bf16 runs, with a
    warning at its first use).

    Raises:
        ValueError: an unknown precision.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    return precision


def resolve_precision(precision: str, device_type: str) -> str:
    """The number format ``precision`` means for inference slices on a ``device_type`` device: ``"fp32"`` or
    ``"bf16"``.

    ``auto`` is bf16 on a CPU that computes it natively (:func:`native_bf16`), where it was measured faster than the
    fp32 default path with outputs close to fp32's (the figures: docs/performance.md), and fp32
    elsewhere: on a CPU without it (emulated bf16 is slow) and on a GPU (the network is a few percent of a
    volume's time there; ``amp`` is the GPU's option).
    """
    if check_precision(precision) == "auto":
        return "bf16" if device_type == "cpu" and native_bf16() else "fp32"
    return precision


def training_precision(precision: str, device_type: str) -> str:
    """The number format ``precision`` means for training on a ``device_type`` device: ``"fp32"`` or ``"bf16"``.

    ``auto`` is bf16 where it is computed natively: a CPU with :func:`native_bf16`, or a CUDA GPU that supports
    it (``torch.cuda.is_bf16_supported``); fp32 elsewhere. An explicit ``"bf16"`` is kept (emulated on a CPU
    without native bf16: correct, slower).

    Raises:
        ValueError: an unknown precision.
    """
    if check_precision(precision) != "auto":
        return precision
    if device_type == "cpu":
        return "bf16" if native_bf16() else "fp32"
    if device_type == "cuda":
        return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"
    return "fp32"


def autocast(precision: str, device_type: str) -> torch.autocast:
    """The autocast context of a resolved ``precision`` (``"fp32"``: disabled) on a ``device_type`` device.

    Under bf16 autocast convolutions and matrix products run in bfloat16, reductions and losses in fp32; the
    parameters, their gradients and the optimizer state stay fp32 (no loss scaling is needed: bf16 has fp32's
    exponent range)."""
    return torch.autocast(device_type=device_type, dtype=torch.bfloat16, enabled=precision == "bf16")
