"""The any-missing task: any available subset of FLAIR, T1, T1ce, T2 -> the missing modalities (BraTS "BraSyn").

Not one of the paper's variants: it extends the paper's idea (one generator steered by a label) with a second
label, which modalities are present. The network is :class:`scripts.runtime.networks.AnyMissingNet`; this module
holds what the task adds around it:

- :class:`AvailabilityDraw`: step 1 of a GAN iteration (:class:`scripts.runtime.trainer.TCMGANTrainer`'s ``draw``):
  a target modality and an availability subset per sample;
- :func:`t2_only_batch`: ``prepare_batch`` of the training-time validation (the paper's T2-only scenario);
- :data:`SCENARIOS` and :func:`scenario_mask`: the evaluation scenarios (each modality missing given the other
  three, and T2 alone).

Modality order everywhere: :data:`scripts.runtime.conventions.CHANNELS` (FLAIR, T1, T1ce, T2), for the slots, the
availability mask and the labels.
"""

from __future__ import annotations

import itertools

import torch

from .conventions import CHANNELS, SOURCE, TARGETS
from .networks import any_missing_input, t2_only

#: Every non-empty subset of the four modalities, as a ``(15, 4)`` bool table in :data:`CHANNELS` order.
SUBSETS = torch.tensor([bits for bits in itertools.product((False, True), repeat=len(CHANNELS)) if any(bits)])

#: The evaluation scenarios, name -> (available modalities, missing modality); BraSyn's four (one missing, three
#: present) and the paper's T2-only task (one row per target).
SCENARIOS = {
    **{f"missing_{m}": (tuple(c for c in CHANNELS if c != m), m) for m in CHANNELS},
    **{f"t2_only_{t}": ((SOURCE,), t) for t in TARGETS},
}


def scenario_mask(available, device=None) -> torch.Tensor:
    """``(4,)`` bool availability of the modality names ``available`` (:data:`CHANNELS` order)."""
    unknown = [m for m in available if m not in CHANNELS]
    if unknown:
        raise ValueError(f"unknown modalities {unknown}; expected some of {CHANNELS}")
    return torch.tensor([c in available for c in CHANNELS], dtype=torch.bool, device=device)


class AvailabilityDraw:
    """A target modality and the modalities available to synthesise it, per sample.

    The target is uniform over the four modalities. The available subset never holds the target and is never
    empty: with probability ``three`` all three others (BraSyn's scenario), with probability ``t2_alone`` T2 alone
    (the paper's; for a T2 target this share goes to the other subsets), otherwise uniform over the remaining
    subsets. Over many draws every non-empty subset of the other modalities occurs for every target.

    ``draw(image, label, source)`` (the trainer's step 1): ``image`` ``(B, 4, H, W)`` in :data:`CHANNELS` order,
    ``label`` ``(B, 1, H, W)``, ``source`` ``(B, 4 * context, H, W)`` (each modality's neighbouring slices,
    augmented; ``SliceDataset(source="all")``) or None (``image`` itself is the input). Returns
    ``((source, available), condition, k, y, tumour, seg_rows)``: G is called as ``G(source, available, labels=k)``;
    the critic's condition is :func:`any_missing_input` of the centre slices (target slot masked); ``seg_rows`` the
    samples whose target the frozen segmenter knows (FLAIR, T1, T1ce).
    """

    def __init__(self, three: float = 0.35, t2_alone: float = 0.35):
        if min(three, t2_alone) < 0 or three + t2_alone >= 1:
            raise ValueError("three and t2_alone must be >= 0 with a sum below 1")
        m = len(CHANNELS)
        t2 = CHANNELS.index(SOURCE)
        weights = torch.zeros(m, len(SUBSETS))
        for k in range(m):
            valid = ~SUBSETS[:, k]
            others = valid & (SUBSETS.sum(1) == m - 1)
            alone = valid & (SUBSETS.sum(1) == 1) & SUBSETS[:, t2] if k != t2 else torch.zeros_like(valid)
            rest = valid & ~others & ~alone
            weights[k, others] = three
            weights[k, alone] = t2_alone
            weights[k, rest] = (1 - three - weights[k, alone].sum()) / rest.sum()
        self.weights = weights  # (targets, subsets): each row sums to 1

    def subsets(self, k: torch.Tensor) -> torch.Tensor:
        """``(B, 4)`` bool availability for targets ``k`` ``(B,)`` (one ``torch.multinomial`` draw)."""
        choice = torch.multinomial(self.weights.to(k.device)[k], 1).flatten()
        return SUBSETS.to(k.device)[choice]

    def __call__(self, image: torch.Tensor, label: torch.Tensor, source: torch.Tensor | None):
        b, m = image.shape[0], len(CHANNELS)
        k = torch.randint(0, m, (b,), device=image.device)
        available = self.subsets(k)
        x = image if source is None else source
        context = x.shape[1] // m
        centre = x[:, context // 2 :: context]  # each modality's centre slice
        condition = any_missing_input(centre, available, 1)
        y = image[torch.arange(b, device=image.device), k].unsqueeze(1)
        tumour = (label > 0).to(image.dtype)
        return (x, available), condition, k, y, tumour, k < len(TARGETS)


def t2_only_batch(batchdata: dict, device=None, non_blocking: bool = False, **kwargs):
    """``prepare_batch`` of the any-missing generator's validation during training: the paper's scenario (T2
    alone -> FLAIR, T1, T1ce), so that its validation PSNR/SSIM read like the paper variants'.

    Returns ``(slots, real targets (B, 3, H, W), (available,), {"outputs": target indices})``."""
    image = batchdata["image"].to(device=device, non_blocking=non_blocking)
    x = batchdata["source"].to(device=device, non_blocking=non_blocking) if "source" in batchdata else image
    outputs = [CHANNELS.index(t) for t in TARGETS]
    return x, image[:, outputs], (t2_only(x.shape[0], x.device),), {"outputs": outputs}
