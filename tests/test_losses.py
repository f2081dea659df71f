"""The paper's losses (``scripts.runtime.losses``), each against a hand computation on 2x2 images.

The stand-in critic scores a target y as ``a·y`` at every pixel and gives fixed modality logits, so every term
of eq. (6) and (7) can be worked out on paper: for the batch below (real y = 1, fake = 0.5, four pixels each)

- D_src summed per image: real 4a, fake 2a; averaged per pixel: real a, fake a/2;
- its gradient with respect to y is ``a`` at every pixel, so ||∇|| = 2a for any interpolate and GP = (2a - 1)²;
- logits (ln 2, 0, 0) give CE = ln 2 for label 0 and ln 4 for label 1, mean 1.5·ln 2;
- L1 per image = 4·0.5 = 2, per pixel 0.5.

The building blocks those losses are made of (gradient penalty, reductions, modality classification) are checked on
their own at the end.
"""

from __future__ import annotations

import math

import pytest
import torch
from monai.losses import DiceLoss
from torch import nn

from scripts.runtime.losses import (
    SEGMENTER_FAKE_WEIGHT,
    SEGMENTER_REAL_WEIGHT,
    critic_loss,
    critic_score,
    generator_loss,
    gradient_penalty,
    l1_loss,
    modality_classification_loss,
    segmenter_update_loss,
    tumour_consistency_loss,
)
from scripts.runtime.trainer import LOSS_KEYS

A = 0.25  # critic slope: GP = (2·0.25 - 1)² = 0.25
CE = 1.5 * math.log(2)


class SlopeCritic(nn.Module):
    """``D_src(x, y) = a·y`` per pixel; ``D_cls`` = fixed logits (ln 2, 0, 0), or no head."""

    def __init__(self, a: float = A, cls_head: bool = True):
        super().__init__()
        self.a = nn.Parameter(torch.tensor(a))
        self.cls_head = cls_head

    def forward(self, source, target, labels=None):
        logits = torch.tensor([math.log(2), 0.0, 0.0]).expand(target.shape[0], 3) if self.cls_head else None
        return self.a * target, logits


class ScaleSegmenter(nn.Module):
    """``S(y, c)`` logits = w·y (the label is ignored)."""

    def __init__(self, w: float = 1.0):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(w))

    def forward(self, image, labels):
        return self.w * image


@pytest.fixture
def batch():
    source = torch.zeros(2, 1, 2, 2)
    real = torch.ones(2, 1, 2, 2)
    fake = torch.full((2, 1, 2, 2), 0.5, requires_grad=True)
    labels = torch.tensor([0, 1])
    return source, real, fake, labels


def test_segmenter_update_weights_are_the_reference_codes():
    assert (SEGMENTER_FAKE_WEIGHT, SEGMENTER_REAL_WEIGHT) == (0.7, 0.3)


@pytest.mark.parametrize(
    "reduction, d_real, d_fake", [("sum", -4 * A, 2 * A), ("mean", -A, A / 2)], ids=["sum", "mean"]
)
def test_critic_loss_is_equation_6(batch, reduction, d_real, d_fake):
    source, real, fake, labels = batch
    critic = SlopeCritic()
    total, terms = critic_loss(critic, source, real, fake, labels, lambda_cls=10.0, lambda_gp=100.0,
                               reduction=reduction)  # fmt: skip
    expected = {"d_real": d_real, "d_fake": d_fake, "d_cls": CE, "d_gp": (2 * A - 1) ** 2}
    expected["d_loss"] = d_real + d_fake + 10.0 * CE + 100.0 * (2 * A - 1) ** 2
    assert set(terms) == set(expected) and set(terms) <= set(LOSS_KEYS)
    for name, value in expected.items():
        assert terms[name].item() == pytest.approx(value, rel=1e-6), name
    assert total is terms["d_loss"]
    total.backward()
    assert critic.a.grad is not None  # the critic learns ...
    assert fake.grad is None  # ... and nothing reaches the generator


def test_critic_loss_without_a_classification_head_has_a_zero_cls_term(batch):
    total, terms = critic_loss(SlopeCritic(cls_head=False), *batch, lambda_cls=10.0, lambda_gp=0.0)
    assert terms["d_cls"].item() == 0.0
    assert total.item() == pytest.approx(-4 * A + 2 * A)


@pytest.mark.parametrize("reduction, g_adv, g_l1", [("sum", -2 * A, 2.0), ("mean", -A / 2, 0.5)], ids=["sum", "mean"])
def test_generator_loss_is_equation_7(batch, reduction, g_adv, g_l1):
    source, real, fake, labels = batch
    tumour = torch.zeros(2, 1, 2, 2)
    tumour[0, 0, 0] = 1  # two tumour pixels in the first image, none in the second
    dice = DiceLoss(sigmoid=True, smooth_nr=1, smooth_dr=1)
    seg = ScaleSegmenter(w=0.0)  # logits 0: p = 0.5 everywhere
    # per image 1 - (2·Σpg + 1) / (Σp + Σg + 1): first (2 + 1) / (2 + 2 + 1) -> 0.4, second 1 / (2 + 0 + 1) -> 2/3
    g_seg = (0.4 + 2 / 3) / 2
    total, terms = generator_loss(
        SlopeCritic(), source, real, fake, labels, lambda_cls=10.0, lambda_l1=0.1, lambda_seg=50.0,
        reduction=reduction, segmenter=seg, tumour=tumour, dice=dice,
    )  # fmt: skip
    expected = {"g_adv": g_adv, "g_cls": CE, "g_l1": g_l1, "g_seg": g_seg}
    expected["g_loss"] = g_adv + 10.0 * CE + 0.1 * g_l1 + 50.0 * g_seg
    assert set(terms) == set(expected) and set(terms) <= set(LOSS_KEYS)
    for name, value in expected.items():
        assert terms[name].item() == pytest.approx(value, rel=1e-6), name
    assert total is terms["g_loss"]
    total.backward()
    assert fake.grad is not None and fake.grad.abs().sum() > 0  # the generator learns from every term


def test_generator_loss_without_a_segmenter_has_a_zero_tumour_consistency_term(batch):
    total, terms = generator_loss(SlopeCritic(), *batch, lambda_cls=10.0, lambda_l1=0.1, lambda_seg=50.0)
    assert terms["g_seg"].item() == 0.0
    assert total.item() == pytest.approx(-2 * A + 10.0 * CE + 0.1 * 2.0, rel=1e-6)


def test_tumour_consistency_loss_is_equation_4_and_reaches_the_generator():
    fake = torch.zeros(1, 1, 2, 2, requires_grad=True)
    tumour = torch.tensor([[[[1.0, 1.0], [0.0, 0.0]]]])
    seen = []

    class RecordingSegmenter(ScaleSegmenter):
        def forward(self, image, labels):
            seen.append(labels)
            return super().forward(image, labels)

    seg = RecordingSegmenter().requires_grad_(False)  # frozen S, as in TC-MGAN
    dice = DiceLoss(sigmoid=True, smooth_nr=1, smooth_dr=1)
    loss = tumour_consistency_loss(seg, fake, torch.tensor([2]), tumour, dice)
    assert loss.item() == pytest.approx(1 - 3 / 5)  # p = 0.5: (2·1 + 1) / (2 + 2 + 1)
    assert seen[0].tolist() == [2]  # S is told the target modality
    loss.backward()
    assert fake.grad is not None and fake.grad.abs().sum() > 0


def test_segmenter_update_is_the_weighted_dice_on_fake_and_real():
    fake = torch.full((1, 1, 2, 2), 0.5, requires_grad=True)
    real = torch.full((1, 1, 2, 2), 2.0)
    tumour = torch.ones(1, 1, 2, 2)

    def dice(logits, target):  # a stand-in "Dice" that is easy to do by hand
        return (logits * target).mean()

    seg = ScaleSegmenter(w=3.0)
    total, terms = segmenter_update_loss(seg, fake, real, torch.tensor([0]), tumour, dice)
    assert terms["s_fake"].item() == pytest.approx(1.5)  # 3·0.5
    assert terms["s_real"].item() == pytest.approx(6.0)  # 3·2
    assert total.item() == pytest.approx(0.7 * 1.5 + 0.3 * 6.0)
    assert total is terms["s_loss"] and "s_loss" in LOSS_KEYS
    total.backward()
    assert seg.w.grad.item() == pytest.approx(0.7 * 0.5 + 0.3 * 2.0)  # S learns ...
    assert fake.grad is None  # ... the generator does not
    other, _ = segmenter_update_loss(seg, fake, real, torch.tensor([0]), tumour, dice, fake_weight=1.0, real_weight=0.0)
    assert other.item() == pytest.approx(1.5)


# --- the building blocks: gradient penalty, reductions, modality classification ------------------------------------


class LinearCritic(nn.Module):
    """D_src(x, y) = Σ w·y: its gradient with respect to y is w everywhere."""

    def __init__(self, w: torch.Tensor):
        super().__init__()
        self.w = nn.Parameter(w)

    def forward(self, source, target, labels=None):
        return (self.w * target).flatten(1).sum(1).view(-1, 1, 1, 1), None


def test_gradient_penalty_equals_squared_norm_deviation():
    w = torch.full((1, 1, 4, 4), 0.5)  # ||w||_2 = sqrt(16 * 0.25) = 2
    critic = LinearCritic(w)
    x, real, fake = torch.zeros(3, 1, 4, 4), torch.rand(3, 1, 4, 4), torch.rand(3, 1, 4, 4)
    gp = gradient_penalty(critic, x, real, fake)
    assert gp.item() == pytest.approx((2.0 - 1.0) ** 2)
    gp.backward()  # differentiable with respect to the critic's parameters
    assert critic.w.grad is not None and critic.w.grad.abs().sum() > 0


def test_gradient_penalty_is_zero_for_unit_gradient():
    critic = LinearCritic(torch.full((1, 1, 2, 2), 0.5))  # ||w|| = 1
    assert gradient_penalty(critic, *torch.rand(3, 2, 1, 2, 2)).item() == pytest.approx(0.0, abs=1e-10)


def test_reductions_sum_per_image_or_mean_per_pixel():
    fake, real = torch.zeros(2, 1, 8, 8), torch.ones(2, 1, 8, 8)
    assert l1_loss(fake, real, "sum").item() == pytest.approx(64.0)  # the reference code's per-image sum
    assert l1_loss(fake, real, "mean").item() == pytest.approx(1.0)
    assert critic_score(torch.ones(2, 1, 4, 4), "sum").item() == pytest.approx(16.0)
    with pytest.raises(ValueError, match="reduction"):
        l1_loss(fake, real, "max")


def test_tumour_weight_counts_the_tumour_pixels_more_and_zero_is_the_paper():
    fake, real = torch.zeros(2, 1, 8, 8), torch.ones(2, 1, 8, 8)
    tumour = torch.zeros(2, 1, 8, 8)
    tumour[:, :, :2, :2] = 1  # 4 of 64 pixels
    assert l1_loss(fake, real, "sum", tumour, 0.0).item() == pytest.approx(64.0)
    assert l1_loss(fake, real, "sum", tumour, 5.0).item() == pytest.approx(60 + 4 * 6.0)
    assert l1_loss(fake, real, "mean", tumour, 5.0).item() == pytest.approx((60 + 4 * 6.0) / 64)
    with pytest.raises(ValueError, match="tumour mask"):
        l1_loss(fake, real, "sum", None, 1.0)


def test_classification_loss_is_cross_entropy_over_modalities():
    logits = torch.tensor([[10.0, 0.0, 0.0], [0.0, 0.0, 10.0]])
    assert modality_classification_loss(logits, torch.tensor([0, 2])).item() < 1e-3
    assert modality_classification_loss(logits, torch.tensor([1, 1])).item() > 5
