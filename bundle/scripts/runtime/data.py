"""Data pieces MONAI lacks: the datalist loader with clear errors, the brain-slice filter, the intensity
scaling to [-1, 1], a cache of preprocessed volumes (in memory or memory-mapped from disk) that names a bad case
before training starts, and a dataset of 2D slices (axial, or of all three orientations) drawn from the cached 3D volumes.

Channel order everywhere (declared once, in :data:`scripts.runtime.conventions.CHANNELS`): FLAIR, T1, T1ce, T2 —
the targets first, in the label order of :data:`scripts.runtime.conventions.TARGETS`, then the source. Internal
label convention (after :func:`label_map`): 0 background, 1 necrosis / non-enhancing core, 2 oedema, 3 enhancing
tumour (:data:`scripts.runtime.conventions.INTERNAL_LABELS`).
"""

from __future__ import annotations

import gzip
import hashlib
import inspect
import json
import logging
import os
import struct
import threading
from collections.abc import Hashable, Mapping, Sequence
from enum import Enum

import nibabel as nib
import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import CacheDataset, NibabelReader, load_decathlon_datalist
from monai.transforms import Flipd, MapTransform, RandomizableTransform

from .conventions import CHANNELS, INTERNAL_LABELS, LAYOUT_LABELS, T2_INDEX, TARGETS  # noqa: F401 (re-exported)
from .files import write_atomic
from .views import MIN_BRAIN_FRACTION, parse_views, to_view, view_length, view_slice

logger = logging.getLogger(__name__)

HOW_TO_MAKE_DATA = (
    "Make the phantom set with\n"
    "    python bundle/scripts/phantom.py --output_dir {d} --num_cases 12 --seed 0\n"
    "    python bundle/scripts/prepare_datalist.py --data_dir {d}\n"
    "or run prepare_datalist.py on a BraTS 2018/2021/2023 or MSD Task01 folder and pass it as --dataset_dir."
)


def read_datalist(path: str) -> dict:
    """The content of the datalist JSON at ``path`` (as ``prepare_datalist.py`` writes it).

    Raises:
        FileNotFoundError: no file at ``path`` (the message says how to make one).
        ValueError: the file is not valid JSON.
    """
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
    content = read_datalist(datalist)
    if not content.get(split):
        splits = [k for k, v in content.items() if isinstance(v, list) and v and isinstance(v[0], dict)]
        raise ValueError(f"{datalist} has no cases in split {split!r} (splits present: {splits})")
    base_dir = base_dir if base_dir is not None else os.path.dirname(os.path.abspath(datalist))
    cases = load_decathlon_datalist(datalist, is_segmentation=True, data_list_key=split, base_dir=base_dir)
    return cases[:max_cases] if max_cases else cases


class ThreadSafeNibabelReader(NibabelReader):
    """MONAI's ``NibabelReader``, safe to share between threads (``CacheDataset``'s ``num_workers`` threads).

    ``NibabelReader.read`` keeps the file names it opened on the reader and ``get_data`` pairs the images with
    them, so two threads loading through one ``LoadImaged`` mix their cases: measured with 16 cache threads,
    several 4-modality cases came out as one channel. Here the names are kept per thread.
    """

    def __init__(self, *args, **kwargs):
        self._local = threading.local()
        super().__init__(*args, **kwargs)

    @property
    def filenames(self):
        return getattr(self._local, "filenames", ())

    @filenames.setter
    def filenames(self, value) -> None:
        self._local.filenames = value


def label_map(datalist: str) -> list[int]:
    """Source label values of (necrosis, oedema, enhancing) in the datalist's layout, for ``MapLabelValued``
    with ``target_labels=[1, 2, 3]``. BraTS 2018/2021: [1, 2, 4]; BraTS 2023: [1, 2, 3]; MSD: [2, 1, 3]
    (:data:`scripts.runtime.conventions.LAYOUT_LABELS`; a datalist without ``labels`` gets BraTS 2021's)."""
    labels = read_datalist(datalist).get("labels", LAYOUT_LABELS["brats2021"])
    return [int(labels[name]) for name in INTERNAL_LABELS]


class SelectBrainSlicesd(MapTransform):
    """Keep the axial slices (last axis) on which every channel of ``source_key`` has more than ``min_pixels``
    non-zero voxels (paper: 2000 on the 240x240 grid). The same slices are kept for all ``keys``.

    With ``margin`` > 0 (through-plane context of ``2 * margin + 1`` slices), the kept range is widened by
    ``margin`` slices on each side (within the volume, interior gaps filled), so that every kept slice has its
    true neighbours; ``centre_key`` (``"centre"``) then marks, as a ``(D',)`` bool tensor, the slices that passed the
    filter, the only ones :class:`SliceDataset` draws. Without a margin the mark is all true.

    With ``views`` other than the axial one alone (tri-planar training, :mod:`scripts.runtime.views`), every slice
    is kept (the coronal and sagittal views are of the whole depth, as in inference) and ``centre`` marks those
    that passed.

    Works on channel-first ``(C, H, W, D)`` arrays; raises ``ValueError`` naming the file when no slice passes.
    """

    def __init__(self, keys: KeysCollection, source_key: str = "image", min_pixels: int = 2000, margin: int = 0,
                 centre_key: str | None = None, views="axial"):
        super().__init__(keys)
        self.source_key = source_key
        self.min_pixels = min_pixels
        self.margin = int(margin)
        self.centre_key = centre_key
        self.whole = parse_views(views) != ("axial",)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        img = d[self.source_key]
        counts = (img != 0).sum(dim=(1, 2))  # (C, D)
        keep = torch.nonzero((counts > self.min_pixels).all(dim=0)).flatten()
        if keep.numel() == 0:
            name = getattr(img, "meta", {}).get("filename_or_obj", "<input>")
            raise ValueError(f"{name}: no axial slice has more than {self.min_pixels} brain pixels in every channel")
        centre = torch.ones(keep.numel(), dtype=torch.bool)
        if self.margin > 0 or self.whole:
            lo, hi = max(int(keep[0]) - self.margin, 0), min(int(keep[-1]) + self.margin, counts.shape[1] - 1)
            if self.whole:
                lo, hi = 0, counts.shape[1] - 1
            centre = torch.zeros(hi - lo + 1, dtype=torch.bool)
            centre[keep - lo] = True
            keep = torch.arange(lo, hi + 1)
        for key in self.key_iterator(d):
            d[key] = d[key].index_select(-1, keep.to(d[key].device))
        if self.centre_key:
            d[self.centre_key] = centre
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
    """2D slices of preprocessed 3D volumes, one item per (case, view, slice); axial slices only by default.

    ``volumes`` is a sequence of dicts whose ``keys`` hold channel-first ``(C, H, W, D)`` tensors, typically a
    ``CacheDataset(copy_cache=False)`` or a :class:`VolumeCache` so that each volume is loaded and preprocessed once
    and slices are views of the cached tensors (no volume is re-read per slice); a memory-mapped numpy volume
    (``VolumeCache(cache_dir=...)``) gives copies of its slices. Item ``i`` is
    ``{key: (C, H, W) slice for key in keys, "case": case index, "slice": slice index}``.

    A volume with a ``"centre"`` mark (:class:`SelectBrainSlicesd` with a margin) gives only its marked slices.
    With ``context`` > 1 or a ``transform``, each item also has ``"source"``: the ``context`` T2 slices centred on
    the item's slice (the indices of :func:`neighbour_index`, as inference's :func:`neighbour_slices`; edges
    clamped), ``(context, H, W)``; then ``transform`` (e.g. the training augmentation) is applied to the item.
    With ``source="all"`` (the any-missing generator) ``"source"`` holds every channel's ``context`` slices,
    channel by channel, ``(4 * context, H, W)``, and is always there.

    ``views`` (:func:`scripts.runtime.views.parse_views`; tri-planar training: ``"all"``) adds coronal and sagittal
    slices: those of :func:`scripts.runtime.views.to_view` of the whole volume, the slices inference runs (the
    volumes must then hold every axial slice: :class:`SelectBrainSlicesd` with ``views``), each kept when more than
    ``min_fraction`` of its pixels are brain (not -1) in a source channel; the label is resized with nearest
    neighbours. Items then carry ``"view"`` (its name) too.
    """

    def __init__(self, volumes: Sequence[Mapping], keys: Sequence[str] = ("image", "label"), context: int = 1,
                 transform=None, source: str = "t2", views="axial", min_fraction: float = MIN_BRAIN_FRACTION):
        if int(context) < 1 or int(context) % 2 == 0:
            raise ValueError(f"context must be an odd number of slices >= 1, got {context}")
        if source not in ("t2", "all"):
            raise ValueError(f"source must be 't2' (the T2 channel) or 'all' (every channel), got {source!r}")
        self.source = source
        self.volumes = volumes
        self.keys = tuple(keys)
        self.context = int(context)
        self.transform = transform
        self.views = parse_views(views)
        self.min_fraction = float(min_fraction)
        self.index = []
        for c in range(len(volumes)):
            if "axial" in self.views:
                centre = volumes[c].get("centre") if isinstance(volumes[c], Mapping) else None
                n = volumes[c][self.keys[0]].shape[-1]
                slices = range(n) if centre is None else np.flatnonzero(np.asarray(centre)).tolist()
                self.index += [(c, "axial", int(z)) for z in slices]
            others = [v for v in self.views if v != "axial"]
            if others:
                self.index += self._view_index(c, others)
        if not self.index:
            raise ValueError("no slices: the dataset has no cases or every case was filtered out")

    def _source_channels(self) -> list[int] | None:
        return [T2_INDEX] if self.source == "t2" else None

    def _view_index(self, c: int, views: Sequence[str]) -> list[tuple]:
        """The coronal / sagittal slices of case ``c`` with enough brain in a source channel."""
        image = self.volumes[c]["image"]
        source = image[self._source_channels() or slice(None)]
        source = torch.from_numpy(np.array(source)) if isinstance(source, np.ndarray) else torch.as_tensor(source)
        index = []
        for view in views:
            fraction = (to_view(source, view) != -1.0).float().mean(dim=(1, 2)).amax(dim=0)  # per slice of the view
            index += [(c, view, int(s)) for s in torch.nonzero(fraction > self.min_fraction).flatten()]
        return index

    def __len__(self) -> int:
        return len(self.index)

    @staticmethod
    def _get(vol, view: str, key: str, s: int) -> torch.Tensor:
        if view == "axial":
            return _slice(vol[key], s)
        return view_slice(vol[key], view, s, "nearest" if key == "label" else "linear")

    def __getitem__(self, i: int) -> dict:
        c, view, z = self.index[i]
        vol = self.volumes[c]
        item = {key: self._get(vol, view, key, z) for key in self.keys}
        if self.context > 1 or self.transform is not None or self.source == "all":  # only the k slices are read
            depth = view_length(vol["image"].shape, view)
            index = neighbour_index(torch.tensor([z]), self.context, depth)[0].tolist()
            stack = torch.stack([self._get(vol, view, "image", j) for j in index], dim=1)  # (C, k, H, W)
            item["source"] = stack[T2_INDEX] if self.source == "t2" else stack.flatten(0, 1)
        if self.views != ("axial",):
            item["view"] = view  # before the transform: the augmentation's mirror leaves sagittal slices alone
        if self.transform is not None:
            item = dict(self.transform(item))
        item.update(case=c, slice=z)
        return item


class RandMirrord(RandomizableTransform, MapTransform):
    """The training augmentation's mirror: MONAI's ``Flipd`` on a slice's first in-plane axis (right-left in an
    axial or coronal slice, :mod:`scripts.runtime.views`) with probability ``prob``, as ``RandFlipd(spatial_axis=0)``
    does, except on a sagittal slice (an item whose ``"view"`` is ``"sagittal"``, :class:`SliceDataset` with
    ``views``): its in-plane axes are anterior-posterior and inferior-superior, and a brain facing backwards is not
    one that inference will meet. ``RandFlipd`` cannot tell the views apart."""

    def __init__(self, keys: KeysCollection, prob: float = 0.5, allow_missing_keys: bool = False):
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob)
        self.flip = Flipd(keys, spatial_axis=0, allow_missing_keys=allow_missing_keys)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        self.randomize(None)
        if self._do_transform and d.get("view", "axial") != "sagittal":
            d = dict(self.flip(d))
        return d


def neighbour_slices(volume: torch.Tensor, centres: torch.Tensor, context: int) -> torch.Tensor:
    """The 2.5D input: for each centre slice ``z`` of ``volume`` ``(H, W, D)``, the ``context`` axial slices
    ``z - h .. z + h`` (``h = context // 2``), an index beyond the volume clamped to its first or last slice.

    Returns ``(N, context, H, W)`` for ``centres`` ``(N,)``. Training (:class:`SliceDataset`), inference
    (:class:`scripts.runtime.inference.BrainSliceInferer`) and evaluation all stack neighbours with this function.
    """
    index = neighbour_index(centres, context, volume.shape[-1])
    return volume[..., index.to(volume.device)].permute(2, 3, 0, 1)


def neighbour_index(centres: torch.Tensor, context: int, depth: int) -> torch.Tensor:
    """``(N, context)`` slice indices ``z - h .. z + h`` of each centre, clamped to ``[0, depth - 1]``."""
    h = int(context) // 2
    offsets = torch.arange(-h, h + 1, device=centres.device)
    return (centres.long()[:, None] + offsets[None]).clamp(0, depth - 1)


def _slice(volume, z: int) -> torch.Tensor:
    """Slice ``z`` of the last axis: a view of a tensor, a copy out of a (read-only, memory-mapped) numpy array."""
    if isinstance(volume, np.ndarray):
        return torch.from_numpy(np.array(volume[..., z]))
    return torch.as_tensor(volume[..., z])


def synthesis_batch(batchdata: dict, device=None, non_blocking: bool = False, **kwargs):
    """``prepare_batch`` of the validation in training (and ``validate.json``): the paper's task, the T2 -> the three
    targets, asked the same way of every generator: ``(input, real targets (B, 3, H, W), (), {"available": the T2
    alone, "outputs": the targets})``. The input is the ``"source"`` stack when the batch has one (2.5D context; the
    four slots of the any-missing generator), else the T2 ``(B, 1, H, W)``."""
    image = batchdata["image"].to(device=device, non_blocking=non_blocking)
    if "source" in batchdata:
        x = batchdata["source"].to(device=device, non_blocking=non_blocking)
    else:
        x = image[:, T2_INDEX : T2_INDEX + 1]
    available = torch.tensor([c == CHANNELS[T2_INDEX] for c in CHANNELS], device=x.device).expand(x.shape[0], -1)
    return x, image[:, : len(TARGETS)], (), {"available": available, "outputs": list(TARGETS)}  # CHANNELS: targets, T2


def draw_targets(image: torch.Tensor, label: torch.Tensor, num_targets: int = 3):
    """A random target per sample (one ``torch.randint`` draw): step 1 of a GAN iteration
    (:class:`scripts.runtime.trainer.TCMGANTrainer`) and the batch of S's pre-training (:func:`segmenter_batch`).

    Args:
        image: ``(B, 4, H, W)`` in :data:`scripts.runtime.conventions.CHANNELS` order.
        label: ``(B, 1, H, W)`` internal labels.
        num_targets: targets to draw from (the first channels).

    Returns:
        ``(x, k, y, tumour)``: the T2 ``(B, 1, H, W)``, the target indices ``(B,)``, the real targets
        ``(B, 1, H, W)`` and the whole-tumour mask ``(B, 1, H, W)`` in ``x``'s dtype.
    """
    b = image.shape[0]
    x = image[:, T2_INDEX : T2_INDEX + 1]
    k = torch.randint(0, num_targets, (b,), device=x.device)
    y = image[torch.arange(b, device=x.device), k].unsqueeze(1)
    return x, k, y, (label > 0).to(x.dtype)


def segmenter_batch(batchdata: dict, device=None, non_blocking: bool = False, **kwargs):
    """``prepare_batch`` for pre-training S: a real target slice of a random modality per sample
    (:func:`draw_targets`).

    Returns ``(y (B, 1, H, W), whole tumour (B, 1, H, W), (labels (B,),), {})`` so that the trainer calls
    ``S(y, labels)``.
    """
    image = batchdata["image"].to(device=device, non_blocking=non_blocking)
    label = batchdata["label"].to(device=device, non_blocking=non_blocking)
    _, k, y, tumour = draw_targets(image, label, len(TARGETS))
    return y, tumour, (k,), {}


# --- the volume cache: checked cases, bad cases named or skipped, in memory or memory-mapped from disk ---------------

#: Bump when the on-disk cache layout changes (old files are then ignored).
CACHE_VERSION = 1


def case_name(item: Mapping) -> str:
    """Readable id of a datalist entry: its ``case`` (the folder name when it is a path), else its first file's name."""
    case = item.get("case")
    if case:
        return os.path.basename(os.path.normpath(str(case)))
    files = _case_files(item, ("image",))
    return os.path.basename(files[0]) if files else "<unnamed case>"


def _case_files(item: Mapping, keys: Sequence[str]) -> list[str]:
    files = []
    for key in keys:
        value = item.get(key)
        files += [f for f in (value if isinstance(value, (list, tuple)) else [value]) if isinstance(f, str)]
    return files


def _nifti_header_shape(path: str) -> tuple:
    """Shape from a NIfTI header (only the header is read). A ``.nii`` shorter than header + voxel data is truncated;
    a ``.nii.gz`` whose gzip trailer disagrees with that length is decompressed in full to decide (a file written as
    several gzip members is fine). Raises ``ValueError`` with the reason."""
    try:
        image = nib.load(path)
    except Exception as e:
        raise ValueError(f"header cannot be read ({type(e).__name__}: {e})") from None
    shape = tuple(int(n) for n in image.header.get_data_shape())
    offset = int(getattr(image.dataobj, "offset", 0))  # where the voxels start (a loaded header's own says 0)
    expected = offset + int(np.prod(shape)) * image.header.get_data_dtype().itemsize
    if not path.endswith(".gz") and os.path.getsize(path) < expected:
        raise ValueError(f"holds {os.path.getsize(path)} bytes; its header needs {expected} (truncated)")
    if path.endswith(".gz"):
        with open(path, "rb") as f:
            f.seek(-4, os.SEEK_END)
            (isize,) = struct.unpack("<I", f.read(4))  # uncompressed length mod 2**32 (of the last gzip member)
        if isize != expected % 2**32:  # truncated, or written as several members: read it all to decide
            total = 0
            try:
                with gzip.open(path, "rb") as g:
                    while chunk := g.read(1 << 24):
                        total += len(chunk)
            except Exception as e:
                raise ValueError(f"corrupt or truncated gzip ({type(e).__name__}: {e})") from None
            if total < expected:
                raise ValueError(f"holds {total} bytes; its header needs {expected} (truncated)")
    return shape


def check_case_files(item: Mapping, keys: Sequence[str] = ("image", "label")) -> None:
    """Cheap check of one datalist entry, before any volume is decoded (~1 ms per file).

    Every file listed under ``keys`` exists; a NIfTI file's header reads and says 3 or 4 dimensions; a ``.nii.gz``
    is complete (see :func:`_nifti_header_shape`); all of the case's NIfTI files share one 3D grid. Other formats are
    only checked to exist (the cache fill reads them fully and names the case if that fails).

    Raises:
        FileNotFoundError: a file is missing (the message names the case and the file).
        ValueError: a file is unreadable, truncated or on another grid (the message names the case and the file).
    """
    name = case_name(item)
    grids = {}
    for path in _case_files(item, keys):
        if not os.path.exists(path):
            raise FileNotFoundError(f"case {name}: {path}: no such file")
        if path.endswith((".nii", ".nii.gz")):
            try:
                shape = _nifti_header_shape(path)
            except ValueError as e:
                raise ValueError(f"case {name}: {path}: {e}") from None
            if len(shape) not in (3, 4):
                raise ValueError(f"case {name}: {path}: image has shape {shape}; expected a 3D (or 4D) volume")
            grids[path] = shape[:3]
    if len(set(grids.values())) > 1:
        raise ValueError(f"case {name}: its files are on different grids: {grids}")


def _root_message(error: BaseException) -> str:
    """The innermost error under MONAI's ``applying transform ...`` wrappers, as ``Type: message``."""
    while error.__cause__ is not None:
        error = error.__cause__
    return f"{type(error).__name__}: {error}"


def _describe(obj, depth: int = 0):
    """JSON-able description of a transform's settings: class names and attribute values, recursively into MONAI
    and bundle objects (other objects give their class name)."""
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, (list, tuple)):
        return [_describe(v, depth) for v in obj]
    if isinstance(obj, Mapping):
        return {str(k): _describe(v, depth) for k, v in sorted(obj.items(), key=lambda kv: str(kv[0]))}
    if isinstance(obj, (Enum, torch.dtype, np.dtype, np.generic, type)):
        return str(obj)
    name = f"{type(obj).__module__}.{type(obj).__qualname__}"
    if depth >= 4 or not type(obj).__module__.startswith(("monai.", "scripts.")) or not hasattr(obj, "__dict__"):
        return name
    attrs = {k: v for k, v in vars(obj).items() if not k.startswith("__") and k != "R" and not inspect.isroutine(v)}
    return {"class": name, **{k: _describe(v, depth + 1) for k, v in sorted(attrs.items())}}


def transform_fingerprint(transform) -> str:
    """A hash of a transform chain's classes and settings; part of each on-disk cache file's name, so that a cache
    made with other preprocessing (another size, threshold or scaling) is not reused."""
    text = json.dumps(_describe(transform), sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:16]


class _Failed:
    """Placeholder in the cache for a case left out (``skip_bad_cases``)."""

    def __init__(self, name: str, reason: str):
        self.name, self.reason = name, reason


class VolumeCache(CacheDataset):
    """Preprocessed volumes of a datalist split, computed once per case before training starts.

    A MONAI ``CacheDataset`` (its arguments apply; ``copy_cache`` defaults to False, as nothing random follows) that:

    1. checks every case's files cheaply before decoding any (:func:`check_case_files`: missing, unreadable,
       truncated ``.nii.gz``, mismatched grids), and wraps any preprocessing failure in a ``ValueError`` naming the
       case (and the file, when the reader's message has it): a bad case stops the run before the first iteration,
       never mid-epoch;
    2. with ``skip_bad_cases=True`` leaves such cases out instead, logging a warning naming each (``skipped`` lists
       them; an error if no case is left);
    3. with ``cache_dir`` keeps the preprocessed arrays on disk instead of in the process: each case's ``keys``
       arrays are written once (atomically) as slice-major ``.npy`` files named by case, source files (path, size,
       mtime) and :func:`transform_fingerprint`, and memory-mapped read-only. The process then holds no copy (its
       anonymous memory stays flat in the number of cases, and so does that of every data-loader worker and every
       distributed rank, which share the operating system's page cache); the OS keeps in RAM what fits. A later run
       with the same files and preprocessing reuses the cache without reading the sources. Costs: disk space (as
       much as the in-memory cache: ~0.33 MB per 128x128 slice of 5 float32 channels) and, when the cache is larger
       than free RAM, a disk read per slice drawn.

    Items are dicts whose ``keys`` hold channel-first ``(C, H, W, D)`` arrays stored slice-major (each axial slice
    one contiguous block, so drawing random slices reads no more memory than it returns): tensors in memory,
    read-only ``numpy.memmap`` views with ``cache_dir``. Use them through :class:`SliceDataset`.
    """

    def __init__(
        self,
        data: Sequence,
        transform,
        cache_dir: str | None = None,
        skip_bad_cases: bool = False,
        keys: Sequence[str] = ("image", "label"),
        **kwargs,
    ):
        self.cache_dir = str(cache_dir) if cache_dir else None
        self.skip_bad_cases = bool(skip_bad_cases)
        self.array_keys = tuple(keys)
        self.skipped: list[str] = []
        kwargs.setdefault("copy_cache", False)
        if self.cache_dir:
            os.makedirs(self.cache_dir, exist_ok=True)
            self.fingerprint = transform_fingerprint(transform)
        super().__init__(data=self._checked(list(data)), transform=transform, **kwargs)

    def _checked(self, data: list) -> list:
        kept = []
        for item in data:
            try:
                check_case_files(item, self.array_keys)
            except (OSError, ValueError) as e:
                if not self.skip_bad_cases:
                    raise
                self._skip(case_name(item), str(e))
                continue
            kept.append(item)
        if not kept:
            raise ValueError(f"no usable case left: every case was skipped ({self.skipped})")
        return kept

    def _skip(self, name: str, reason: str) -> None:
        self.skipped.append(name)
        logger.warning(f"skipping case {name} (skip_bad_cases is set): {reason}")

    def set_data(self, data: Sequence) -> None:
        super().set_data(data)
        failed = {i for i, item in enumerate(self._cache) if isinstance(item, _Failed)}
        if failed:
            for i in sorted(failed):
                self._skip(self._cache[i].name, self._cache[i].reason)
            self.data = [d for i, d in enumerate(self.data) if i not in failed]
            self._cache = [c for i, c in enumerate(self._cache) if i not in failed]
            self.cache_num = len(self._cache)
            if not self.data:
                raise ValueError(f"no usable case left: every case was skipped ({self.skipped})")

    def _load_cache_item(self, idx: int):
        item = self.data[idx]
        name = case_name(item)
        stem = self._stem(item) if self.cache_dir else None
        if stem and all(os.path.isfile(f"{stem}.{k}.npy") for k in self.array_keys):
            return self._open(item, stem)
        try:
            out = super()._load_cache_item(idx)
        except Exception as e:
            files = _case_files(item, self.array_keys)
            message = f"case {name}: preprocessing failed ({_root_message(e)}); its files: {files}"
            if self.skip_bad_cases:
                return _Failed(name, message)
            logger.debug(f"case {name}: preprocessing failed", exc_info=e)
            raise ValueError(message) from None  # the message carries the reason; one error, naming the case
        if not stem:
            for key in self.array_keys:  # same (C, H, W, D) shape and values; slice z becomes one contiguous block
                out[key] = _slice_major(torch.as_tensor(out[key]))
            return out
        if "centre" in out and not bool(torch.as_tensor(out["centre"]).all()):  # the filter kept neighbours too
            _save_npy_atomic(np.asarray(torch.as_tensor(out["centre"]).cpu()), f"{stem}.centre.npy")
        for key in self.array_keys:
            _save_npy_atomic(np.moveaxis(np.asarray(torch.as_tensor(out[key]).cpu()), -1, 0), f"{stem}.{key}.npy")
        return self._open(item, stem)

    def _stem(self, item: Mapping) -> str:
        files = [(f, os.stat(f).st_size, os.stat(f).st_mtime_ns) for f in _case_files(item, self.array_keys)]
        text = json.dumps({"version": CACHE_VERSION, "files": files, "transform": self.fingerprint}, default=str)
        return os.path.join(self.cache_dir, f"{case_name(item)}_{hashlib.sha1(text.encode()).hexdigest()[:16]}")

    def _open(self, item: Mapping, stem: str) -> dict:
        d = {k: v for k, v in item.items() if k not in self.array_keys}
        for key in self.array_keys:  # (D, C, H, W) on disk -> (C, H, W, D) view; slice z is one contiguous block
            d[key] = np.moveaxis(np.load(f"{stem}.{key}.npy", mmap_mode="r"), 0, -1)
        if os.path.isfile(f"{stem}.centre.npy"):
            d["centre"] = torch.from_numpy(np.load(f"{stem}.centre.npy"))
        return d


def _slice_major(volume: torch.Tensor) -> torch.Tensor:
    """``(C, H, W, D)`` view of a ``(D, C, H, W)`` contiguous copy: ``volume[..., z]`` reads one block instead of
    ``C*H*W`` elements ``D`` apart (the slice loader got ~10-20x faster on 128x128x~115 volumes)."""
    return volume.permute(-1, *range(volume.ndim - 1)).contiguous().permute(*range(1, volume.ndim), 0)


def _save_npy_atomic(array: np.ndarray, path: str) -> None:
    """``np.save`` to ``path`` atomically (:func:`scripts.runtime.files.write_atomic`: no half-written cache file)."""
    write_atomic(path, lambda tmp: np.save(tmp, np.ascontiguousarray(array)))
