"""The output calibration of a trained generator (:class:`~scripts.runtime.networks.IntensityCalibration`),
fitted on cases with real targets and written into its ``model.pt``.

A generator trained with an L1 term renders each tissue near its conditional mean: its brightest tissue stays
below the real image's upper tail (noise, bias field), so a volume normalised by its own brain percentiles, as the
quality protocol (``docs/evaluation.md``) and most pipelines normalise, shows the synthesis's whole brain too
bright. :func:`fit_calibration` synthesises each fitting case, takes the brain quantiles
(:data:`~scripts.runtime.networks.CALIBRATION_QUANTILES`) of the synthesis and of the real target, both in the
[-1, 1] training scale (``ScaleBrainIntensityd``), averages each over the cases, and sets the generator's map from
the one to the other (the first and last knots pinned at -1 and 1). Fit it on cases of the training data's
domain that the generator did not train on (the ``seg`` split of the training datalist), never on a test set.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Callable

import numpy as np
import torch

from .checkpoints import cpu_weights, load_model, save_atomic
from .data import ScaleBrainIntensityd, load_split
from .evaluation import synthesise_volume
from .inference import BrainSliceInferer
from .metrics import protocol_brain
from .networks import CALIBRATION_QUANTILES, TARGETS, SynthesisNet

logger = logging.getLogger(__name__)

T2_INDEX = 3  # the T2's channel in the loaded image (FLAIR, T1, T1ce, T2)


def _increasing(knots: np.ndarray, gap: float = 1e-4) -> np.ndarray:
    """``knots`` (rows) made strictly increasing: a running maximum plus ``gap`` per step where it is flat."""
    out = np.maximum.accumulate(knots, axis=1)
    for j in range(1, out.shape[1]):
        out[:, j] = np.maximum(out[:, j], out[:, j - 1] + gap)
    return out


def fit_calibration(checkpoint: str, dataset_dir: str, split: str, load_transform: Callable,
                    volume_transform: Callable, output: str | None = None, num_cases: int = 8,
                    device="cpu", views="axial") -> dict:  # fmt: skip
    """Fit the output calibration of the generator in ``checkpoint`` on up to ``num_cases`` cases (evenly spread)
    of ``split`` in ``dataset_dir``'s ``datalist.json``, and write the generator with it to ``output`` (default:
    ``checkpoint`` itself, replaced atomically). An earlier calibration is discarded first.

    ``load_transform``: full-resolution loading (``train.json``'s ``load_transforms``); ``volume_transform``: the
    inference preprocessing of the T2 (``image_transforms``); ``views``: the synthesis fitted (``BrainSliceInferer``'s
    ``views``: ``all`` for a tri-planar generator, whose fused output is what inference writes).

    Returns:
        ``{"cases": n, "quantiles": [...], "<target>": {"synthesis": [...], "real": [...]}}``, the averaged brain
        quantiles in the [-1, 1] scale (also logged: the median and the 99.5th percentile of each).

    Raises:
        ValueError: the checkpoint is not a paper generator scaled per volume, or the split has no cases.
    """
    network = load_model(checkpoint, device)
    if not isinstance(network, SynthesisNet) or network.intensity_scaling != "volume":
        raise ValueError(f"{checkpoint}: the output calibration is fitted for T2 -> FLAIR/T1/T1ce generators scaled "
                         "per volume (intensity_scaling 'volume')")
    cases = list(load_split(os.path.join(dataset_dir, "datalist.json"), split, base_dir=dataset_dir))
    if not cases:
        raise ValueError(f"{dataset_dir}/datalist.json: no cases in split {split!r} to fit the calibration on")
    cases = [cases[i] for i in np.unique(np.linspace(0, len(cases) - 1, min(num_cases, len(cases))).round().astype(int))]
    calibration = network.calibration
    calibration.set_knots(*[torch.linspace(-1.0, 1.0, calibration.source.shape[1]).repeat(len(TARGETS), 1)] * 2)
    scale = ScaleBrainIntensityd(keys="image", mode="volume")
    q = np.asarray(CALIBRATION_QUANTILES, dtype=float)
    synthesis_q, real_q = [], []
    inferer = BrainSliceInferer(sw_batch_size=32, views=views)  # one for all cases (an engine is built once)
    start = time.time()
    for i, case in enumerate(cases):
        data = load_transform(dict(case))
        image = torch.as_tensor(data["image"]).float()
        brain = protocol_brain(image[T2_INDEX]).cpu().numpy()
        pred = synthesise_volume(network, image[T2_INDEX : T2_INDEX + 1], volume_transform,
                                 inferer, torch.device(device)).numpy() * 2 - 1
        real = torch.as_tensor(scale({"image": image})["image"]).numpy()
        synthesis_q.append([np.percentile(pred[k][brain], q) for k in range(len(TARGETS))])
        real_q.append([np.percentile(real[k][brain], q) for k in range(len(TARGETS))])
        logger.info(f"calibration: case {i + 1}/{len(cases)} synthesised ({time.time() - start:.0f} s)")
    source, target = np.mean(synthesis_q, axis=0), np.maximum.accumulate(np.mean(real_q, axis=0), axis=1)
    source[:, 0], source[:, -1], target[:, 0], target[:, -1] = -1.0, 1.0, -1.0, 1.0
    source = _increasing(np.clip(source, -1.0, 1.0))
    calibration.set_knots(torch.as_tensor(source), torch.as_tensor(target))
    save_atomic(cpu_weights(network), output or checkpoint)
    report = {"cases": len(cases), "split": split, "quantiles": q.tolist()}
    median, top = int(np.argmin(abs(q - 50))), int(np.argmin(abs(q - 99.5)))
    for k, name in enumerate(TARGETS):
        s, r = np.mean(synthesis_q, axis=0)[k], np.mean(real_q, axis=0)[k]
        report[name] = {"synthesis": s.round(4).tolist(), "real": r.round(4).tolist()}
        logger.info(f"calibration {name}: brain median {s[median]:+.3f} -> {r[median]:+.3f}, 99.5th percentile "
                    f"{s[top]:+.3f} -> {r[top]:+.3f} (synthesis -> real, [-1, 1] scale)")
    logger.info(f"calibration fitted on {len(cases)} cases of split {split!r} of {dataset_dir} in "
                f"{time.time() - start:.0f} s; written to {output or checkpoint}")
    return report
