"""The any-missing task's training: any available subset of FLAIR, T1, T1ce, T2 -> the missing modalities (BraTS
"BraSyn").

Not one of the paper's variants: it extends the paper's idea (one generator steered by a label) with a second
label, which modalities are present. The network is :class:`scripts.runtime.networks.AnyMissingNet`; this module
holds what its training adds: :class:`AvailabilityDraw`, step 1 of a GAN iteration
(:class:`scripts.runtime.trainer.TCMGANTrainer`'s ``draw``), a target modality and an availability subset per
sample, over :data:`SUBSETS`.

Everything else goes the one way every generator's does: inference (:func:`scripts.runtime.cases.inference_cases`,
:class:`scripts.runtime.inference.LoadInputsd`), validation (:func:`scripts.runtime.data.synthesis_batch`) and
evaluation (``evaluate.json``: :func:`scripts.runtime.evaluation.evaluation_for` gives this generator the
scenario tables, :class:`scripts.runtime.evaluation.ScenarioEvaluation`).

Modality order everywhere: :data:`scripts.runtime.conventions.CHANNELS` (FLAIR, T1, T1ce, T2), for the slots, the
availability mask and the labels.
"""

from __future__ import annotations

import itertools
import logging

import torch

from .conventions import CHANNELS, SOURCE, TARGETS
from .networks import any_missing_input

logger = logging.getLogger(__name__)

#: Every non-empty subset of the four modalities, as a ``(15, 4)`` bool table in :data:`CHANNELS` order.
SUBSETS = torch.tensor([bits for bits in itertools.product((False, True), repeat=len(CHANNELS)) if any(bits)])

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
        self.table = SUBSETS

    def subsets(self, k: torch.Tensor) -> torch.Tensor:
        """``(B, 4)`` bool availability for targets ``k`` ``(B,)`` (one ``torch.multinomial`` draw)."""
        if self.weights.device != k.device:  # moved once, not every iteration
            self.weights, self.table = self.weights.to(k.device), self.table.to(k.device)
        return self.table[torch.multinomial(self.weights[k], 1).flatten()]

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
