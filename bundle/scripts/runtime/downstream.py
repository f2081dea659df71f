"""Downstream segmentation (the paper's Table 2): does adding synthesised modalities to T2 help a tumour segmenter?

A 2D MONAI ``UNet`` is trained on the ``seg`` split (``configs/train_downstream.json``) with one of three inputs
(:data:`INPUTS`) and scored on the ``test`` split (``configs/evaluate_downstream.json``). This module holds only the
pieces MONAI lacks:

- :func:`downstream_network` (MONAI's ``UNet`` as Table 2 configures it) and :func:`downstream_transforms` (the
  volume transforms after the bundle's shared ones), the pieces both overlays build;
- :class:`DownstreamInputsd`: the last volume transform; picks the input channels, running a trained generator for
  ``"synth"``;
- :func:`downstream_record` / :func:`downstream_info` / :func:`load_downstream_weights` /
  :func:`check_downstream_ckpt`: a model file that records which inputs it was trained on, so evaluation can refuse
  a mismatch;
- :func:`slice_wt_dice` (the reference code's per-slice whole-tumour Dice) and :func:`case_dice_3d` (BraTS-style
  per-case 3D Dice, MONAI ``DiceMetric``);
- :class:`DownstreamScorer`: runs a trained segmenter over the test cases, writes ``per_case.csv`` and
  ``scores.json``;
- :func:`write_table2`: gathers several ``scores.json`` into ``table2.md`` / ``table2.csv``.

Label / prediction channels are the BraTS regions in MONAI's ``ConvertToMultiChannelBasedOnBratsClasses`` order,
declared once in :data:`REGIONS`: (TC, WT, ET). With the internal labels (1 necrosis, 2 oedema, 3 enhancing):
WT = {1, 2, 3}, TC = {1, 3}, ET = {3}.

Command line: ``python tools/tables.py write_table2 --rows '{"T2 only": "O/downstream/t2/scores.json"}'
--output_dir O``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import threading
from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.metrics import DiceMetric
from monai.networks.nets import UNet
from monai.transforms import ConvertToMultiChannelBasedOnBratsClassesd, EnsureTyped, MapTransform

from .checkpoints import describe, load_checkpoint, load_model, read_model
from .conventions import CHANNELS, T2_INDEX
from .data import case_name
from .files import write_csv, write_json, write_text
from .inference import SliceRunner
from .metrics import summarise
from .networks import SynthesisNet

logger = logging.getLogger(__name__)

#: Input options -> number of segmenter input channels.
#: ``t2``: the real T2 only; ``synth``: synthesised (FLAIR, T1, T1ce) + real T2; ``real``: the four real modalities.
INPUTS = {"t2": 1, "synth": 4, "real": 4}
#: Channel order of the labels and of the segmenter's output (MONAI's ConvertToMultiChannelBasedOnBratsClasses).
REGIONS = ("tc", "wt", "et")
#: Internal label of the enhancing tumour (``et_label`` of ConvertToMultiChannelBasedOnBratsClassesd).
ET_LABEL = 3
#: Marker stored in the downstream model file.
CKPT_FORMAT = "brainsynth-downstream-1"
#: Columns of table2.md: (header, key in scores.json).
TABLE2_COLUMNS = (
    ("WT Dice per slice (reference)", "slice_wt_dice"),
    ("WT 3D", "dice_wt"),
    ("TC 3D", "dice_tc"),
    ("ET 3D", "dice_et"),
)


# --- inputs -----------------------------------------------------------------------------------------------------------


def check_inputs(inputs: str, synth_ckpt: str | None) -> None:
    """Validate the ``inputs`` option and its generator checkpoint.

    Raises:
        ValueError: unknown ``inputs``, or ``inputs="synth"`` without ``synth_ckpt``.
        FileNotFoundError: ``synth_ckpt`` given for ``"synth"`` but no such file.
    """
    if inputs not in INPUTS:
        raise ValueError(f"unknown inputs {inputs!r}; expected one of {list(INPUTS)}")
    if inputs == "synth":
        if not synth_ckpt:
            raise ValueError("inputs 'synth' needs a generator checkpoint: set synth_ckpt (e.g. out/tcmgan/model.pt)")
        if not os.path.isfile(synth_ckpt):
            raise FileNotFoundError(f"synth_ckpt: no generator checkpoint at {synth_ckpt}")


def file_sha1(path: str) -> str:
    """Hex SHA-1 of a file's bytes (identifies a generator checkpoint wherever it is moved)."""
    digest = hashlib.sha1()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def synthesise_volume(generator: torch.nn.Module, t2: torch.Tensor, batch_size: int = 64, device=None) -> torch.Tensor:
    """Run the generator on every axial slice of a T2 volume.

    Args:
        generator: T2 ``(B, 1, H, W)`` -> targets ``(B, 3, H, W)``, both in [-1, 1].
        t2: ``(1, H, W, D)`` T2 volume in [-1, 1].
        batch_size: slices per forward pass.
        device: where the generator runs (default: where its weights are).

    Returns:
        ``(3, H, W, D)`` synthesised (FLAIR, T1, T1ce) on ``t2``'s device, float32.
    """
    device = device if device is not None else next(generator.parameters()).device
    slices = t2.permute(3, 0, 1, 2).to(device=device, dtype=torch.float32)  # (D, 1, H, W)
    synth = SliceRunner(batch_size)(slices, generator)
    return synth.float().to(t2.device).permute(1, 2, 3, 0).contiguous()  # (3, H, W, D)


def check_generator_settings(path: str, **settings) -> None:
    """Check that the volumes given to the generator at ``path`` are prepared as it was trained.

    Args:
        path: a generator ``model.pt``.
        settings: the pipeline's ``intensity_scaling`` / ``image_size`` (None: not checked).

    Raises:
        ValueError: a setting differs from what the checkpoint records (the message names both values).
        FileNotFoundError: as :func:`scripts.runtime.checkpoints.read_model`.
    """
    arch = read_model(path, "generator")
    wrong = [f"{k} {v!r} (the generator was trained with {arch[k]!r})" for k, v in settings.items()
             if v is not None and v != arch[k]]  # fmt: skip
    if wrong:
        raise ValueError(f"{path}: the downstream volumes are prepared with " + ", ".join(wrong)
                         + "; use the generator's settings")  # fmt: skip


#: Generators loaded by :func:`cached_generator`, by (path, SHA-1, device).
_GENERATORS: dict[tuple, SynthesisNet] = {}
_GENERATORS_LOCK = threading.Lock()  # CacheDataset fills its cache from several threads


def cached_generator(path: str, sha1: str | None, device) -> SynthesisNet:
    """:func:`scripts.runtime.checkpoints.load_model`, once per process for a given file content and device. The generator is kept out of
    the transform object, so that the transform stays picklable and its on-disk cache fingerprint
    (:func:`scripts.runtime.data.transform_fingerprint`) holds only its settings. It stays loaded for the process's life."""
    key = (path, sha1, str(device))
    with _GENERATORS_LOCK:
        if key not in _GENERATORS:
            logger.info(f"downstream inputs: loading generator {path} on {device}")
            _GENERATORS[key] = load_model(path, device)
        return _GENERATORS[key]


def downstream_network(inputs: str = "t2", features: int = 16) -> UNet:
    """The Table 2 segmenter: MONAI's 2D ``UNet``, five levels of ``features`` x (1, 2, 4, 8, 16) channels, strides 2,
    two residual units, batch norm; :data:`INPUTS` ``[inputs]`` channels in, the three :data:`REGIONS` out."""
    if inputs not in INPUTS:
        raise ValueError(f"inputs {inputs!r}: expected one of {', '.join(INPUTS)}")
    f = int(features)
    return UNet(spatial_dims=2, in_channels=INPUTS[inputs], out_channels=len(REGIONS),
                channels=(f, 2 * f, 4 * f, 8 * f, 16 * f), strides=(2, 2, 2, 2), num_res_units=2, norm="batch")  # fmt: skip


def downstream_transforms(inputs: str = "t2", synth_ckpt: str | None = None, device="cpu", batch_size: int = 64,
                          intensity_scaling: str | None = None, image_size: int | None = None) -> list:  # fmt: skip
    """The volume transforms of the downstream overlays after ``train.json``'s shared ones: the labels as the three
    BraTS regions (MONAI ``ConvertToMultiChannelBasedOnBratsClassesd``), float32 tensors, then the input channels
    (:class:`DownstreamInputsd`, whose arguments these are)."""
    return [
        ConvertToMultiChannelBasedOnBratsClassesd(keys="label", et_label=ET_LABEL),
        EnsureTyped(keys=["image", "label"], data_type="tensor", track_meta=False, dtype=torch.float32),
        DownstreamInputsd("image", inputs, synth_ckpt, device, batch_size, intensity_scaling, image_size),
    ]


class DownstreamInputsd(MapTransform):
    """Choose the segmenter's input channels from a 4-channel (FLAIR, T1, T1ce, T2) volume.

    ``inputs``: ``"t2"`` keeps the T2 channel (1 channel); ``"real"`` keeps the 4 real channels; ``"synth"`` replaces
    FLAIR, T1 and T1ce by the generator's output from the T2 channel: (synth FLAIR, synth T1, synth T1ce, T2).

    Works on channel-first ``(4, H, W, D)`` volumes in [-1, 1] (the end of the bundle's volume pipeline). The
    generator is loaded from ``synth_ckpt`` on first use (:func:`cached_generator`) and runs under
    ``torch.inference_mode`` on ``device``, ``batch_size`` slices at a time; it expects the intensity scaling it was
    trained with: ``intensity_scaling`` and ``image_size``, the settings of the volume pipeline in front of this
    transform, must be the generator's (:func:`check_generator_settings`). The output stays on the input's device,
    float32.

    Raises:
        ValueError: unknown ``inputs``, ``"synth"`` without ``synth_ckpt`` (at construction); an input volume that
            does not have 4 channels (when called).
        FileNotFoundError: ``synth_ckpt`` does not exist (at construction).
        ValueError: the pipeline's ``intensity_scaling`` or ``image_size`` is not the generator's (at construction).
    """

    def __init__(
        self,
        keys: KeysCollection = "image",
        inputs: str = "t2",
        synth_ckpt: str | None = None,
        device="cpu",
        batch_size: int = 64,
        intensity_scaling: str | None = None,
        image_size: int | None = None,
    ):
        super().__init__(keys)
        check_inputs(inputs, synth_ckpt)
        self.inputs = inputs
        self.synth_ckpt = os.path.abspath(synth_ckpt) if inputs == "synth" else None
        if self.synth_ckpt is not None:
            check_generator_settings(self.synth_ckpt, intensity_scaling=intensity_scaling, image_size=image_size)
        # part of the on-disk cache fingerprint (scripts.runtime.data.transform_fingerprint): a retrained generator is new data
        self.synth_sha1 = file_sha1(self.synth_ckpt) if self.synth_ckpt else None
        self.device = torch.device(device)
        self.batch_size = int(batch_size)

    def generator(self) -> SynthesisNet:
        """The generator of ``synth_ckpt`` on ``device`` (loaded once per process, see :func:`cached_generator`)."""
        return cached_generator(self.synth_ckpt, self.synth_sha1, self.device)

    def _select(self, image: torch.Tensor) -> torch.Tensor:
        if image.shape[0] != len(CHANNELS):
            raise ValueError(f"expected a {len(CHANNELS)}-channel {CHANNELS} volume, got shape {tuple(image.shape)}")
        t2 = image[T2_INDEX : T2_INDEX + 1]
        if self.inputs == "t2":
            return t2
        if self.inputs == "real":
            return image
        synth = synthesise_volume(self.generator(), t2, self.batch_size, self.device)
        return torch.cat([synth.to(image.dtype), t2], dim=0)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self._select(torch.as_tensor(d[key]))
        return d


# --- the model file ---------------------------------------------------------------------------------------------------


def downstream_record(inputs: str, features: int, synth_ckpt: str | None = None) -> dict:
    """What a downstream segmenter's ``model.pt`` records besides its weights (``ModelSaver(record=...)`` in
    ``train_downstream.json``). With the weights and the epoch the file (loadable with
    ``torch.load(weights_only=True)``) holds::

        {"format": CKPT_FORMAT, "state_dict": {name: CPU tensor}, "inputs": "t2" | "synth" | "real",
         "synth_ckpt": absolute path or None, "synth_sha1": hex SHA-1 of that file or None,
         "features": int, "in_channels": int, "regions": ["tc", "wt", "et"], "epoch": int}

    Raises:
        ValueError, FileNotFoundError: as :func:`check_inputs`.
    """
    check_inputs(inputs, synth_ckpt)
    synth_ckpt = os.path.abspath(synth_ckpt) if inputs == "synth" else None
    return {
        "format": CKPT_FORMAT,
        "inputs": inputs,
        "synth_ckpt": synth_ckpt,
        "synth_sha1": file_sha1(synth_ckpt) if synth_ckpt else None,
        "features": int(features),
        "in_channels": INPUTS[inputs],
        "regions": list(REGIONS),
    }


def _downstream_state(path: str, map_location="cpu") -> dict:
    """The whole content of a downstream model file, checked to be one (see :func:`downstream_info`)."""
    state = load_checkpoint(path, map_location=map_location)
    if state.get("format") != CKPT_FORMAT or "state_dict" not in state:
        hint = f"it holds a {describe(state)}" if "state_dict" not in state else f"format {state.get('format')!r}"
        raise ValueError(
            f"{path} is not a downstream segmenter written by train_downstream.json ({hint}); train one with "
            "python -m monai.bundle run --config_file \"['bundle/configs/train.json','bundle/configs/train_segmenter.json','bundle/configs/train_downstream.json']\" ..."
        )
    return state


def downstream_info(path: str) -> dict:
    """What a downstream model file records: ``{"format", "inputs", "synth_ckpt", "synth_sha1", "features",
    "in_channels", "regions", "epoch"}``.

    Raises:
        FileNotFoundError, ValueError: as :func:`scripts.runtime.checkpoints.load_checkpoint`; or the file is not a downstream
            segmenter written by ``train_downstream.json`` (the message says what it holds).
    """
    return {k: v for k, v in _downstream_state(path).items() if k != "state_dict"}


def load_downstream_weights(network: torch.nn.Module, path: str) -> torch.nn.Module:
    """Load the segmenter weights of a downstream model file into ``network`` (built with the recorded
    ``in_channels`` and ``features``). Raises ``ValueError`` if they do not fit, as :func:`downstream_info`
    otherwise."""
    state = _downstream_state(path, map_location=next(network.parameters()).device)
    try:
        network.load_state_dict(state["state_dict"])
    except RuntimeError as e:
        raise ValueError(f"{path}: its weights do not fit the configured segmenter ({e})") from None
    return network


def check_downstream_ckpt(path: str, inputs: str, synth_ckpt: str | None = None) -> dict:
    """Check that the evaluation inputs are those the segmenter at ``path`` was trained on; returns its record.

    ``synth_ckpt`` may sit at another path than at training, but must be the same file (same SHA-1).

    Raises:
        ValueError: ``inputs`` differ, or the generator file differs (both values named), or as :func:`downstream_info`.
        FileNotFoundError: as :func:`check_inputs`.
    """
    info = downstream_info(path)
    check_inputs(inputs, synth_ckpt)
    if inputs != info["inputs"]:
        raise ValueError(f"{path} was trained on inputs {info['inputs']!r}; this evaluation asks for {inputs!r}")
    if inputs == "synth" and file_sha1(synth_ckpt) != info["synth_sha1"]:
        raise ValueError(
            f"{path} was trained on inputs synthesised by {info['synth_ckpt']} (sha1 {info['synth_sha1']}); "
            f"synth_ckpt {synth_ckpt} is another file (sha1 {file_sha1(synth_ckpt)})"
        )
    return info


# --- metrics ----------------------------------------------------------------------------------------------------------


def slice_wt_dice(pred_wt: torch.Tensor, true_wt: torch.Tensor) -> torch.Tensor:
    """The reference code's whole-tumour Dice of each 2D slice, with +1 smoothing.

    ``(2|P ∩ G| + 1) / (|P| + |G| + 1)`` per slice, where P = ``pred_wt > 0.5`` and G = ``true_wt > 0``: an empty
    prediction on an empty slice scores 1.

    Args:
        pred_wt: ``(N, H, W)`` (any trailing dims) predicted probabilities or 0/1 masks.
        true_wt: same shape, ground-truth whole-tumour masks.

    Returns:
        ``(N,)`` float64 Dice values in (0, 1].
    """
    if pred_wt.shape != true_wt.shape:
        raise ValueError(f"shapes differ: prediction {tuple(pred_wt.shape)}, truth {tuple(true_wt.shape)}")
    p = (pred_wt > 0.5).flatten(1).double()
    g = (true_wt > 0).flatten(1).double()
    return (2 * (p * g).sum(1) + 1) / (p.sum(1) + g.sum(1) + 1)


def case_dice_3d(pred: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """3D Dice of each region of one case, with MONAI's ``DiceMetric`` (no smoothing).

    An empty truth with an empty prediction scores 1, an empty truth with a non-empty prediction 0
    (``ignore_empty=False``).

    Args:
        pred: ``(R, H, W, D)`` binary prediction, R regions in :data:`REGIONS` order.
        label: ``(R, H, W, D)`` binary truth.

    Returns:
        ``(R,)`` float Dice values in [0, 1].
    """
    metric = DiceMetric(include_background=True, reduction="none", ignore_empty=False)
    return metric(y_pred=pred[None].float(), y=label[None].float())[0].cpu()


def summary(values: Sequence[float]) -> dict:
    """``{"mean", "std"}`` of the values (population std, ddof 0; :func:`scripts.runtime.metrics.summarise`); NaN for
    none."""
    stats = summarise(values)
    return {"mean": stats["mean"], "std": stats["std"]}


# --- scoring ----------------------------------------------------------------------------------------------------------


def _tensor(volume) -> torch.Tensor:
    """A cached volume as a tensor; a (read-only, memory-mapped) numpy array is copied."""
    return torch.from_numpy(np.array(volume)) if isinstance(volume, np.ndarray) else torch.as_tensor(volume)


def predict_volume(network: torch.nn.Module, image: torch.Tensor, device, batch_size: int = 64) -> torch.Tensor:
    """Segment every axial slice of a volume.

    Args:
        network: ``(B, C, H, W)`` -> ``(B, R, H, W)`` logits.
        image: ``(C, H, W, D)`` segmenter input.
        device: where the network runs.
        batch_size: slices per forward pass.

    Returns:
        ``(R, H, W, D)`` bool prediction (sigmoid > 0.5, i.e. logit > 0), on the CPU.
    """
    slices = _tensor(image).permute(3, 0, 1, 2).to(device=device, dtype=torch.float32)  # (D, C, H, W)
    logits = SliceRunner(batch_size)(slices, network)
    return (torch.sigmoid(logits) > 0.5).cpu().permute(1, 2, 3, 0)


class DownstreamScorer:
    """Score a trained downstream segmenter on the test cases.

    For each case (its brain-filtered, resized 128x128 slices, as in training): the per-slice whole-tumour Dice of
    the reference code (:func:`slice_wt_dice`) and the per-case 3D Dice of WT, TC and ET (:func:`case_dice_3d`).

    Writes ``<output_dir>/per_case.csv`` (case, n_slices, slice_wt_dice = that case's mean, dice_wt, dice_tc,
    dice_et) and ``<output_dir>/scores.json`` (``inputs``, ``synth_ckpt``, ``ckpt``, ``n_cases``, ``n_slices``,
    and ``{"mean", "std"}`` for ``slice_wt_dice`` over all test slices and for ``dice_wt``, ``dice_tc``, ``dice_et``
    over cases).

    Args:
        network: the segmenter (weights loaded); put in eval mode.
        volumes: cases as dicts with ``image`` ``(C, H, W, D)`` and ``label`` ``(3, H, W, D)`` in :data:`REGIONS`
            order (a :class:`scripts.runtime.data.VolumeCache`).
        output_dir: folder for the two files (created).
        ckpt_path: the segmenter's model file; checked against ``inputs`` / ``synth_ckpt``
            (:func:`check_downstream_ckpt`).
        inputs, synth_ckpt: what the volumes hold (see :class:`DownstreamInputsd`).
        device: where the network runs.
        batch_size: slices per forward pass.
    """

    def __init__(self, network: torch.nn.Module, volumes: Sequence[Mapping], output_dir: str, ckpt_path: str,
                 inputs: str, synth_ckpt: str | None = None, device="cpu", batch_size: int = 64):
        self.network, self.volumes, self.output_dir = network, volumes, output_dir
        self.ckpt_path, self.inputs, self.synth_ckpt = ckpt_path, inputs, synth_ckpt
        self.device, self.batch_size = device, batch_size

    def score_case(self, case: Mapping) -> tuple[dict, torch.Tensor]:
        """One case's ``per_case.csv`` row and its ``(D,)`` per-slice WT Dice values."""
        label = _tensor(case["label"]) > 0.5
        if label.shape[0] != len(REGIONS):
            shape = tuple(label.shape)
            raise ValueError(f"case {case_name(case)}: label has shape {shape}; expected {REGIONS} channels first")
        pred = predict_volume(self.network, case["image"], self.device, self.batch_size)
        wt = REGIONS.index("wt")
        per_slice = slice_wt_dice(pred[wt].permute(2, 0, 1), label[wt].permute(2, 0, 1))
        dice = case_dice_3d(pred, label)
        row = {"case": case_name(case), "n_slices": int(per_slice.numel()), "slice_wt_dice": float(per_slice.mean())}
        row.update({f"dice_{r}": float(dice[REGIONS.index(r)]) for r in ("wt", "tc", "et")})
        return row, per_slice

    def run(self) -> dict:
        """Score every case, write the files and return the ``scores.json`` content."""
        check_downstream_ckpt(self.ckpt_path, self.inputs, self.synth_ckpt)
        self.network.eval()
        rows, slices = [], []
        for i in range(len(self.volumes)):
            row, per_slice = self.score_case(self.volumes[i])
            rows.append(row)
            slices.append(per_slice)
            logger.info(
                f"[{i + 1}/{len(self.volumes)}] {row['case']}: {row['n_slices']} slices, slice WT Dice "
                f"{row['slice_wt_dice']:.3f}; 3D Dice WT {row['dice_wt']:.3f} TC {row['dice_tc']:.3f} "
                f"ET {row['dice_et']:.3f}"
            )
        all_slices = torch.cat(slices).tolist()
        scores = {
            "inputs": self.inputs,
            "synth_ckpt": os.path.abspath(self.synth_ckpt) if self.synth_ckpt else None,
            "ckpt": os.path.abspath(self.ckpt_path),
            "n_cases": len(rows),
            "n_slices": len(all_slices),
            "slice_wt_dice": summary(all_slices),
            **{f"dice_{r}": summary([row[f"dice_{r}"] for row in rows]) for r in ("wt", "tc", "et")},
        }
        self.write(rows, scores)
        return scores

    def write(self, rows: list[dict], scores: dict) -> None:
        """Write ``per_case.csv`` (``rows``) and ``scores.json`` (``scores``) atomically to ``output_dir``."""
        write_csv(os.path.join(self.output_dir, "per_case.csv"), rows)
        write_json(os.path.join(self.output_dir, "scores.json"), scores, indent=2)
        s = scores
        logger.info(
            f"{s['n_cases']} cases, {s['n_slices']} slices: slice WT Dice {_cell(s['slice_wt_dice'])}; 3D Dice "
            f"WT {_cell(s['dice_wt'])}, TC {_cell(s['dice_tc'])}, ET {_cell(s['dice_et'])}; "
            f"written to {self.output_dir}"
        )


# --- Table 2 ----------------------------------------------------------------------------------------------------------


def sanity_check(t2_only: Mapping, real: Mapping, key: str = "dice_wt") -> tuple[bool, str]:
    """Whether a Table 2 can be read: the segmenter on the 4 real modalities must beat the one on T2 alone by more
    than the spread between training seeds (the root sum of squares of the two rows' standard deviations over
    seeds, :func:`scripts.runtime.metrics.merge_over_seeds`). With one seed there is no such spread, and the check
    cannot pass.

    Args:
        t2_only, real: the two rows' scores (``scores.json`` content, merged over seeds or not).
        key: the score compared (3D whole-tumour Dice).

    Returns:
        ``(interpretable, sentence)``: the sentence states the comparison and the verdict, for the report.
    """
    a, b = t2_only[key], real[key]
    diff = float(b["mean"]) - float(a["mean"])
    seeds = int(min(a.get("n", 1), b.get("n", 1))) if "n_seeds" in a and "n_seeds" in b else 1  # finite seeds
    if seeds < 2:
        return False, (f"**Sanity check**: 4 real modalities {b['mean']:.3f} vs T2 only {a['mean']:.3f} (3D WT Dice; "
                       f"difference {diff:+.3f}) from one training seed: no seed spread to compare with, so the "
                       "downstream numbers are not interpretable (run with --seeds 3).")  # fmt: skip
    spread = math.sqrt(float(a["std"]) ** 2 + float(b["std"]) ** 2)
    ok = bool(diff > spread)  # False when the spread is nan
    verdict = ("passed: the downstream protocol separates its inputs" if ok else
               "FAILED: the downstream numbers are not interpretable (the real modalities do not beat T2 alone "
               "by more than the seed spread)")  # fmt: skip
    return ok, (f"**Sanity check** {verdict}. 4 real modalities {b['mean']:.3f} vs T2 only {a['mean']:.3f} "
                f"(3D WT Dice, mean over {seeds} seeds): difference {diff:+.3f}, seed spread {spread:.3f}.")


def _cell(stat: Mapping) -> str:
    return f"{stat['mean']:.3f} ± {stat['std']:.3f}"


def _load_scores(value) -> dict:
    if isinstance(value, Mapping):
        return dict(value)
    if not os.path.isfile(str(value)):
        raise FileNotFoundError(f"no scores.json at {value} (evaluate_downstream.json writes it)")
    with open(value) as f:
        return json.load(f)


def write_table2(rows: dict, output_dir: str, note: str = "", footer: str = "") -> str:
    """Write the paper's Table 2 from several evaluations.

    Args:
        rows: row name (e.g. ``"T2 only"``, ``"T2 + TC-MGAN synthesised"``, ``"4 real"``) -> a ``scores.json``
            path or its loaded dict, in display order.
        output_dir: folder for ``table2.md`` (Markdown, "mean ± std" with 3 decimals) and ``table2.csv``
            (means and stds as numbers, plus n_cases and n_slices); created.
        note, footer: paragraphs put before and after the table (e.g. the spread's meaning, :func:`sanity_check`).

    Returns:
        The Markdown table.

    Raises:
        FileNotFoundError: a path has no file. ValueError: no rows, or a scores dict lacks a column.
    """
    if not rows:
        raise ValueError("write_table2: rows is empty; give {row name: scores.json path}")
    scores = {str(name): _load_scores(value) for name, value in rows.items()}
    for name, s in scores.items():
        missing = [key for _, key in TABLE2_COLUMNS if key not in s]
        if missing:
            raise ValueError(f"row {name!r}: its scores lack {missing} (not a scores.json of evaluate_downstream.json)")
    header = ["Input"] + [title for title, _ in TABLE2_COLUMNS]
    lines = [note, ""] if note else []
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, s in scores.items():
        lines.append("| " + " | ".join([name] + [_cell(s[key]) for _, key in TABLE2_COLUMNS]) + " |")
    lines += ["", footer] if footer else []
    markdown = "\n".join(lines) + "\n"
    write_text(os.path.join(output_dir, "table2.md"), markdown)
    stats = [f"{key}_{stat}" for _, key in TABLE2_COLUMNS for stat in ("mean", "std")]
    table = [
        [name, *[s[key][stat] for _, key in TABLE2_COLUMNS for stat in ("mean", "std")], s.get("n_cases", ""),
         s.get("n_slices", "")]
        for name, s in scores.items()
    ]  # fmt: skip
    write_csv(os.path.join(output_dir, "table2.csv"), table, header=["input", *stats, "n_cases", "n_slices"])
    return markdown
