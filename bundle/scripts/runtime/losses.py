"""TC-MGAN loss terms that MONAI lacks (the Dice term is MONAI's ``DiceLoss``, declared in the configs).

Reductions follow the reference code, for which the paper's weights (λl1 0.1, λcls 10, λseg 50, λgp 100) were
tuned: the critic score and the L1 term are *summed over each image* (the 4x4 critic map, the 128x128 pixels)
and then averaged over the batch. With ``reduction="mean"`` they are averaged over pixels instead; then λl1
must be about 16384x larger (128x128 pixels) to weigh the same.
"""

from __future__ import annotations

import torch
from torch import nn

REDUCTIONS = ("sum", "mean")


def _per_image(x: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "sum":
        return x.flatten(1).sum(1).mean()
    if reduction == "mean":
        return x.mean()
    raise ValueError(f"unknown reduction {reduction!r}; expected one of {REDUCTIONS}")


def critic_score(src: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
    """Mean critic value of a batch: ``src`` ``(B, 1, h, w)`` -> scalar (per-image sum or mean of the map)."""
    return _per_image(src, reduction)


def l1_loss(fake: torch.Tensor, real: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
    """L1 between ``(B, 1, H, W)`` images in [-1, 1]: per-image sum (reference) or per-pixel mean."""
    return _per_image((fake - real).abs(), reduction)


def modality_classification_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of ``(B, num_targets)`` logits against ``(B,)`` target indices (modalities are exclusive)."""
    return nn.functional.cross_entropy(logits, labels.long())


def gradient_penalty(
    critic: nn.Module, source: torch.Tensor, real: torch.Tensor, fake: torch.Tensor, labels: torch.Tensor | None = None
) -> torch.Tensor:
    """WGAN-GP: ``mean((||∇_x̂ D_src(source, x̂)||₂ - 1)²)`` with ``x̂ = α·real + (1-α)·fake``, α ~ U(0, 1) per sample.

    Only the target is interpolated; the T2 ``source`` is the fixed condition. The gradient is taken of the
    critic map summed per image and its norm over the whole ``(1, H, W)`` image.

    Args:
        critic: ``critic(source, target, labels) -> (src, cls)``.
        source, real, fake: ``(B, 1, H, W)`` tensors (``fake`` is detached here).
        labels: ``(B,)`` target indices, passed on to the critic (routing for per-target critics).

    Returns:
        scalar tensor, differentiable with respect to the critic's parameters.
    """
    alpha = torch.rand(real.shape[0], 1, 1, 1, device=real.device, dtype=real.dtype)
    x_hat = (alpha * real.detach() + (1 - alpha) * fake.detach()).requires_grad_(True)
    src, _ = critic(source, x_hat, labels)
    (grad,) = torch.autograd.grad(src.sum(), x_hat, create_graph=True)
    return ((grad.flatten(1).norm(2, dim=1) - 1) ** 2).mean()
