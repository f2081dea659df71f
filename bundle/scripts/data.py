"""Data pieces MONAI lacks: the datalist loader with clear errors, the brain-slice filter, the intensity
scaling to [-1, 1], and a dataset of 2D axial slices drawn from cached 3D volumes.

Channel order everywhere (declared once, in :data:`CHANNELS`): FLAIR, T1, T1ce, T2 — the targets first, in
the label order of :data:`scripts.networks.TARGETS`, then the source. Internal label convention (after
:func:`label_map`): 0 background, 1 necrosis / non-enhancing core, 2 oedema, 3 enhancing tumour.
"""

from __future__ import annotations

import json
import os
from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import load_decathlon_datalist
from monai.transforms import MapTransform

CHANNELS = ("flair", "t1", "t1ce", "t2")
INTERNAL_LABELS = {"necrosis": 1, "edema": 2, "enhancing": 3}

HOW_TO_MAKE_DATA = (
    "Make the phantom set with\n"
    "    python bundle/scripts/phantom.py --output_dir {d} --num_cases 12 --seed 0\n"
    "    python bundle/scripts/prepare_datalist.py --data_dir {d}\n"
    "or run prepare_datalist.py on a BraTS 2018/2021/2023 or MSD Task01 folder and pass it as --dataset_dir."
)


def _read_datalist(path: str) -> dict:
    if not os.path.isfile(path):
        d = os.path.dirname(path) or "."
        raise FileNotFoundError(f"No datalist at {path}. " + HOW_TO_MAKE_DATA.format(d=d))
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e


def load_split(datalist: str, split: str, base_dir: str | None = None, max_cases: int | None = None) -> list[dict]:
    """Cases of one split (``gan``, ``seg`` or ``test``) with absolute paths.

    Args:
        datalist: path of the JSON written by ``prepare_datalist.py``.
        split: key of the split.
        base_dir: folder the relative paths start from (default: the datalist's folder).
        max_cases: keep only the first cases (None: all).

    Raises:
        FileNotFoundError: no datalist (the message says how to make one).
        ValueError: the split is missing or empty.
    """
    content = _read_datalist(datalist)
    if not content.get(split):
        raise ValueError(f"{datalist} has no cases in split {split!r} (splits present: {list(content)})")
    base_dir = base_dir if base_dir is not None else os.path.dirname(os.path.abspath(datalist))
    cases = load_decathlon_datalist(datalist, is_segmentation=True, data_list_key=split, base_dir=base_dir)
    return cases[:max_cases] if max_cases else cases


def label_map(datalist: str) -> list[int]:
    """Source label values of (necrosis, oedema, enhancing) in the datalist's layout, for ``MapLabelValued``
    with ``target_labels=[1, 2, 3]``. BraTS 2018/2021: [1, 2, 4]; BraTS 2023: [1, 2, 3]; MSD: [2, 1, 3]."""
    labels = _read_datalist(datalist).get("labels", {"necrosis": 1, "edema": 2, "enhancing": 4})
    return [int(labels[name]) for name in INTERNAL_LABELS]


class SelectBrainSlicesd(MapTransform):
    """Keep the axial slices (last axis) on which every channel of ``source_key`` has more than ``min_pixels``
    non-zero voxels (paper: 2000 on the 240x240 grid). The same slices are kept for all ``keys``.

    Works on channel-first ``(C, H, W, D)`` arrays; raises ``ValueError`` naming the file when no slice passes.
    """

    def __init__(self, keys: KeysCollection, source_key: str = "image", min_pixels: int = 2000):
        super().__init__(keys)
        self.source_key = source_key
        self.min_pixels = min_pixels

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        img = d[self.source_key]
        counts = (img != 0).sum(dim=(1, 2))  # (C, D)
        keep = torch.nonzero((counts > self.min_pixels).all(dim=0)).flatten()
        if keep.numel() == 0:
            name = getattr(img, "meta", {}).get("filename_or_obj", "<input>")
            raise ValueError(f"{name}: no axial slice has more than {self.min_pixels} brain pixels in every channel")
        for key in self.key_iterator(d):
            d[key] = d[key].index_select(-1, keep.to(d[key].device))
        return d


class ScaleBrainIntensityd(MapTransform):
    """Scale each channel linearly to [-1, 1] with background (0) at -1.

    ``mode="volume"`` (default): divide by the ``upper`` percentile of the channel's brain (non-zero) voxels over
    the whole volume and clip to [0, 1] — robust to a few hot voxels and consistent across slices.
    ``mode="slice"``: divide every axial slice by its own maximum (the reference code).
    Then ``x -> 2x - 1``. Input channel-first ``(C, H, W[, D])``; output float32.
    """

    def __init__(self, keys: KeysCollection, mode: str = "volume", upper: float = 99.5):
        super().__init__(keys)
        if mode not in ("volume", "slice"):
            raise ValueError(f"unknown scaling mode {mode!r}; expected 'volume' or 'slice'")
        self.mode = mode
        self.upper = upper

    def _scale(self, img: torch.Tensor) -> torch.Tensor:
        img = img.float().clamp_min(0)
        if self.mode == "slice":
            top = img.amax(dim=(1, 2), keepdim=True)
        else:
            top = torch.stack([_brain_percentile(c, self.upper) for c in img]).reshape(-1, *[1] * (img.ndim - 1))
        return (img / top.clamp_min(1e-8)).clamp(0, 1) * 2 - 1

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self._scale(d[key])
        return d


def _brain_percentile(channel: torch.Tensor, q: float) -> torch.Tensor:
    brain = channel[channel > 0]
    if brain.numel() == 0:
        return torch.ones((), dtype=channel.dtype, device=channel.device)
    # numpy's percentile has no element limit (torch.quantile has one)
    return torch.as_tensor(np.percentile(brain.cpu().numpy(), q), dtype=channel.dtype, device=channel.device)


class SliceDataset(torch.utils.data.Dataset):
    """2D axial slices of preprocessed 3D volumes, one item per (case, slice).

    ``volumes`` is a sequence of dicts whose ``keys`` hold channel-first ``(C, H, W, D)`` tensors, typically a
    ``CacheDataset(copy_cache=False)`` so that each volume is loaded and preprocessed once and slices are views
    of the cached tensors (no volume is re-read per slice). Item ``i`` is
    ``{key: (C, H, W) slice for key in keys, "case": case index, "slice": slice index}``.
    """

    def __init__(self, volumes: Sequence[Mapping], keys: Sequence[str] = ("image", "label")):
        self.volumes = volumes
        self.keys = tuple(keys)
        self.index = [(c, z) for c in range(len(volumes)) for z in range(volumes[c][self.keys[0]].shape[-1])]
        if not self.index:
            raise ValueError("no slices: the dataset has no cases or every case was filtered out")

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict:
        c, z = self.index[i]
        vol = self.volumes[c]
        item = {key: torch.as_tensor(vol[key][..., z]) for key in self.keys}
        item.update(case=c, slice=z)
        return item


def synthesis_batch(batchdata: dict, device=None, non_blocking: bool = False, **kwargs):
    """``prepare_batch`` for synthesis evaluation: (T2 ``(B, 1, H, W)``, real targets ``(B, 3, H, W)``)."""
    image = batchdata["image"].to(device=device, non_blocking=non_blocking)
    return image[:, -1:], image[:, :-1]


def segmenter_batch(batchdata: dict, device=None, non_blocking: bool = False, **kwargs):
    """``prepare_batch`` for pre-training S: a real target slice of a random modality per sample.

    Returns ``(y (B, 1, H, W), whole tumour (B, 1, H, W), (labels (B,),), {})`` so that the trainer calls
    ``S(y, labels)``.
    """
    image = batchdata["image"].to(device=device, non_blocking=non_blocking)
    label = batchdata["label"].to(device=device, non_blocking=non_blocking)
    b, n_targets = image.shape[0], image.shape[1] - 1
    k = torch.randint(0, n_targets, (b,), device=image.device)
    y = image[torch.arange(b, device=image.device), k].unsqueeze(1)
    return y, (label > 0).to(y.dtype), (k,), {}
