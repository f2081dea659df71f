"""The TC-MGAN losses, one function per equation of the paper (Xin et al., ISBI 2020):

- :func:`critic_loss`: the critic's objective L_D, eq. (6);
- :func:`generator_loss`: the generator's objective L_G, eq. (7);
- :func:`tumour_consistency_loss`: the multi-modality tumour-consistency term L_seg, eq. (4);
- :func:`segmenter_update_loss`: the joint segmenter update of TC-MGAN bw (reference code, not in the paper);

and the terms they are built from (critic score, L1, modality classification, gradient penalty eq. (5)). The Dice
loss itself is MONAI's ``DiceLoss``, declared in the configs and passed in. ``critic_loss``, ``generator_loss`` and
``segmenter_update_loss`` return ``(total, terms)``, ``terms`` keyed by the names the trainer reports
(``d_loss``, ``d_real`` ... ``s_loss``, see ``trainer.LOSS_KEYS``).

Reductions follow the reference code, for which the paper's weights (λl1 0.1, λcls 10, λseg 50, λgp 100) were
tuned: the critic score and the L1 term are *summed over each image* (the 4x4 critic map, the 128x128 pixels)
and then averaged over the batch. With ``reduction="mean"`` they are averaged over pixels instead; then λl1
must be about 16384x larger (128x128 pixels) to weigh the same.
"""

from __future__ import annotations

import torch
from torch import nn

REDUCTIONS = ("sum", "mean")

#: Weights of the synthesised and the real target in TC-MGAN bw's segmenter update (reference ``train_gan.py``).
SEGMENTER_FAKE_WEIGHT = 0.7
SEGMENTER_REAL_WEIGHT = 0.3


def _per_image(x: torch.Tensor, reduction: str) -> torch.Tensor:
    x = x.float()  # a bf16 map (autocast) is summed in fp32: a 128x128 sum in bf16 would keep 3 significant digits
    if reduction == "sum":
        return x.flatten(1).sum(1).mean()
    if reduction == "mean":
        return x.mean()
    raise ValueError(f"unknown reduction {reduction!r}; expected one of {REDUCTIONS}")


def critic_score(src: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
    """Mean critic value of a batch: ``src`` ``(B, 1, h, w)`` -> scalar (per-image sum or mean of the map)."""
    return _per_image(src, reduction)


def l1_loss(
    fake: torch.Tensor, real: torch.Tensor, reduction: str = "sum", tumour: torch.Tensor | None = None,
    tumour_weight: float = 0.0,
) -> torch.Tensor:
    """L1 between ``(B, 1, H, W)`` images in [-1, 1]: per-image sum (reference) or per-pixel mean.

    ``tumour_weight`` > 0 (the recommended model, not the paper's): each pixel of the ``tumour`` mask
    ``(B, 1, H, W)`` counts ``1 + tumour_weight`` times, so the few tumour pixels of a slice are not drowned by the
    brain's; 0 is the paper's plain L1.
    """
    diff = (fake - real).abs()
    if tumour_weight:
        if tumour is None:
            raise ValueError("tumour_weight > 0 needs the tumour mask")
        diff = diff * (1.0 + tumour_weight * tumour.to(diff.dtype))
    return _per_image(diff, reduction)


def modality_classification_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of ``(B, num_targets)`` logits against ``(B,)`` target indices (modalities are exclusive)."""
    return nn.functional.cross_entropy(logits.float(), labels.long())


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
    (grad,) = torch.autograd.grad(src.float().sum(), x_hat, create_graph=True)
    # x_hat is fp32, so is its gradient (under bf16 autocast too); the norm and the penalty are taken in fp32
    return ((grad.float().flatten(1).norm(2, dim=1) - 1) ** 2).mean()


def critic_loss(
    critic: nn.Module,
    source: torch.Tensor,
    real: torch.Tensor,
    fake: torch.Tensor,
    labels: torch.Tensor,
    lambda_cls: float,
    lambda_gp: float,
    reduction: str = "sum",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The critic's objective, eq. (6) of the paper:
    ``L_D = -D_src(x, y) + D_src(x, G(x, c)) + λcls·L_cls^r + λgp·L_gp``.

    Args:
        critic: ``critic(source, target, labels) -> (src, cls)``; ``src`` ``(B, 1, h, w)``, ``cls``
            ``(B, num_targets)`` logits or None (no classification head: the term is 0).
        source: the T2 condition x, ``(B, 1, H, W)``.
        real: the real target y, ``(B, 1, H, W)``.
        fake: the synthesised target G(x, c), ``(B, 1, H, W)``; detached here (only the critic learns).
        labels: ``(B,)`` target indices c.
        lambda_cls, lambda_gp: weights of the real-pair classification term (eq. 2) and the gradient penalty
            (eq. 5, one ``torch.rand`` draw per call).
        reduction: ``"sum"`` (per image) or ``"mean"`` for the critic score.

    Returns:
        ``(d_loss, terms)``, ``terms`` = ``d_loss``, ``d_real``, ``d_fake``, ``d_cls``, ``d_gp`` (scalar tensors;
        ``d_real`` already carries its minus sign).
    """
    fake = fake.detach()
    src_real, cls_real = critic(source, real, labels)
    src_fake, _ = critic(source, fake, labels)
    d_real = -critic_score(src_real, reduction)
    d_fake = critic_score(src_fake, reduction)
    d_cls = modality_classification_loss(cls_real, labels) if cls_real is not None else torch.zeros_like(d_real)
    d_gp = gradient_penalty(critic, source, real, fake, labels)
    d_loss = d_real + d_fake + lambda_cls * d_cls + lambda_gp * d_gp
    return d_loss, {"d_loss": d_loss, "d_real": d_real, "d_fake": d_fake, "d_cls": d_cls, "d_gp": d_gp}


def tumour_consistency_loss(
    segmenter: nn.Module, fake: torch.Tensor, labels: torch.Tensor, tumour: torch.Tensor, dice
) -> torch.Tensor:
    """The multi-modality tumour-consistency term, eq. (4) of the paper: ``L_seg = Dice(S(G(x, c), c), gt)``.

    The segmenter S sees the synthesised image with its target label; its Dice loss against the tumour mask is
    differentiable with respect to ``fake``, so it reaches the generator whether or not S itself is trained.

    Args:
        segmenter: ``segmenter(image, labels) -> logits`` ``(B, 1, H, W)``.
        fake: synthesised targets ``(B, 1, H, W)``.
        labels: ``(B,)`` target indices.
        tumour: ``(B, 1, H, W)`` binary whole-tumour mask.
        dice: Dice loss on logits, ``dice(logits, tumour) -> scalar`` (MONAI ``DiceLoss(sigmoid=True)``).

    Returns:
        scalar tensor.
    """
    return dice(segmenter(fake, labels).float(), tumour)


def generator_loss(
    critic: nn.Module,
    source: torch.Tensor,
    real: torch.Tensor,
    fake: torch.Tensor,
    labels: torch.Tensor,
    lambda_cls: float,
    lambda_l1: float,
    lambda_seg: float,
    reduction: str = "sum",
    segmenter: nn.Module | None = None,
    tumour: torch.Tensor | None = None,
    dice=None,
    seg_rows: torch.Tensor | None = None,
    tumour_l1_weight: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The generator's objective, eq. (7) of the paper:
    ``L_G = -D_src(x, G(x, c)) + λcls·L_cls^f + λl1·L_l1 + λseg·L_seg``.

    Args:
        critic: as in :func:`critic_loss` (its parameters' gradients are the caller's business: the trainer
            turns them off during the generator step).
        source: the T2 condition x, ``(B, 1, H, W)``.
        real: the real target y, ``(B, 1, H, W)``.
        fake: G(x, c) ``(B, 1, H, W)``, attached to the generator's graph.
        labels: ``(B,)`` target indices c.
        lambda_cls, lambda_l1, lambda_seg: weights of the fake-pair classification term (eq. 3), the L1 term and
            the tumour-consistency term.
        reduction: ``"sum"`` (per image) or ``"mean"`` for the critic score and the L1 term.
        segmenter, tumour, dice: for the tumour-consistency term L_seg, :func:`tumour_consistency_loss` (eq. 4);
            ``segmenter=None`` (pix2pix, MGAN): the term is 0.
        seg_rows: ``(B,)`` bool, the samples the term covers (None: all). The any-missing generator leaves out
            the samples whose target S was not trained on (T2); the term is the Dice loss over the others, 0 if none.
        tumour_l1_weight: extra weight of the tumour's pixels in the L1 term (:func:`l1_loss`; 0: the paper).

    Returns:
        ``(g_loss, terms)``, ``terms`` = ``g_loss``, ``g_adv``, ``g_cls``, ``g_l1``, ``g_seg`` (scalar tensors;
        ``g_adv`` already carries its minus sign).
    """
    src_fake, cls_fake = critic(source, fake, labels)
    g_adv = -critic_score(src_fake, reduction)
    g_cls = modality_classification_loss(cls_fake, labels) if cls_fake is not None else torch.zeros_like(g_adv)
    g_l1 = l1_loss(fake, real, reduction, tumour, tumour_l1_weight)
    # L_seg last: the order in which the terms are built fixes how autograd sums their gradients into ``fake``
    if segmenter is not None and seg_rows is not None:
        rows = seg_rows.nonzero().flatten()  # (the any-missing generator only: a host sync per iteration)
        g_seg = (tumour_consistency_loss(segmenter, fake[rows], labels[rows], tumour[rows], dice) if rows.numel()
                 else fake.sum() * 0)  # fmt: skip
    elif segmenter is not None:
        g_seg = tumour_consistency_loss(segmenter, fake, labels, tumour, dice)
    else:
        g_seg = torch.zeros_like(g_adv)
    g_loss = g_adv + lambda_cls * g_cls + lambda_l1 * g_l1 + lambda_seg * g_seg
    return g_loss, {"g_loss": g_loss, "g_adv": g_adv, "g_cls": g_cls, "g_l1": g_l1, "g_seg": g_seg}


def segmenter_update_loss(
    segmenter: nn.Module,
    fake: torch.Tensor,
    real: torch.Tensor,
    labels: torch.Tensor,
    tumour: torch.Tensor,
    dice,
    fake_weight: float = SEGMENTER_FAKE_WEIGHT,
    real_weight: float = SEGMENTER_REAL_WEIGHT,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The joint segmenter update of TC-MGAN bw (the reference code's; the paper keeps S fixed for TC-MGAN):
    ``L_S = 0.7·Dice(S(G(x, c), c), gt) + 0.3·Dice(S(y, c), gt)``.

    ``fake`` is detached here, so only S learns from this loss. Arguments as in
    :func:`tumour_consistency_loss`, plus ``real`` ``(B, 1, H, W)`` (the real target y) and the two weights.

    Returns:
        ``(s_loss, terms)``, ``terms`` = ``s_loss``, ``s_fake``, ``s_real`` (the two unweighted Dice losses).
    """
    s_fake = tumour_consistency_loss(segmenter, fake.detach(), labels, tumour, dice)
    s_real = tumour_consistency_loss(segmenter, real, labels, tumour, dice)
    s_loss = fake_weight * s_fake + real_weight * s_real
    return s_loss, {"s_loss": s_loss, "s_fake": s_fake, "s_real": s_real}
