"""The three slice orientations of a volume, for a 2D generator trained and run on axial, coronal and sagittal
slices (tri-planar synthesis, ``--views``).

Volumes are channel-first ``(C, H, W, D)`` on the RAS grid of the preprocessing (``Orientationd("RAS")``): ``H`` runs
right-left, ``W`` anterior-posterior, ``D`` inferior-superior, and ``H`` and ``W`` are already the network's square
in-plane size while ``D`` keeps the scan's slice count. A view is the volume with its slicing axis last and its two
in-plane axes square:

- ``axial``: the volume itself, slices along ``D``, ``(C, H, W, D)``;
- ``coronal``: slices along ``W``, in-plane ``(H, D)``, with ``D`` resized to ``H``: ``(C, H, H, W)``;
- ``sagittal``: slices along ``H``, in-plane ``(W, D)``, with ``D`` resized to ``W``: ``(C, W, W, H)``.

Training and inference slice the same whole-depth volume (``train.json`` keeps every axial slice in its cache when
the views are more than the axial one), so a training slice and the slice inference runs at the same index are the
same pixels. Resizing along one axis: area averaging when it shrinks, linear interpolation when it grows, nearest
for labels. :func:`to_view` and :func:`from_view` are inverse up to that interpolation (exact for the axial view,
and for the others when the depth equals the in-plane size); :func:`view_slice` gives one slice of :func:`to_view`
without the whole volume (training draws slices one by one).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

#: The slice orientations, in the order the fused synthesis runs them.
VIEWS = ("axial", "coronal", "sagittal")
#: Fraction of a coronal or sagittal slice's pixels that must be brain for training to draw it (the paper's 2000 of
#: 240 x 240 pixels for an axial slice).
MIN_BRAIN_FRACTION = 2000 / (240 * 240)


def parse_views(value) -> tuple[str, ...]:
    """The views named by ``value``: a name, a comma-separated string, a list of names, ``"all"``, or a number of
    views (1: axial; 3: all three). Returns them in :data:`VIEWS` order.

    Raises:
        ValueError: an unknown name, no view, or a number other than 1 or 3.
    """
    if isinstance(value, bool):
        raise ValueError(f"views must be names from {VIEWS}, 'all', 1 or 3; got {value!r}")
    if isinstance(value, (int, np.integer)):
        if int(value) not in (1, 3):
            raise ValueError(f"views as a number must be 1 (axial) or 3 (all three), got {value}")
        return VIEWS[: int(value)] if int(value) == 1 else VIEWS
    names = value.split(",") if isinstance(value, str) else list(value)
    names = [str(n).strip().lower() for n in names if str(n).strip()]
    if names == ["all"]:
        return VIEWS
    unknown = [n for n in names if n not in VIEWS]
    if unknown or not names:
        raise ValueError(f"unknown view(s) {unknown or value!r}; expected names from {VIEWS}, or 'all'")
    return tuple(v for v in VIEWS if v in names)


def resize_axis(x: torch.Tensor, axis: int, size: int, mode: str = "linear") -> torch.Tensor:
    """``x`` with its axis ``axis`` resized to ``size``: ``mode="linear"`` averages areas when it shrinks and
    interpolates linearly (half-pixel centres) when it grows; ``mode="nearest"`` picks the nearest (labels)."""
    axis = axis % x.ndim
    length = x.shape[axis]
    if length == size:
        return x
    moved = x.movedim(axis, -1)
    flat = moved.reshape(-1, 1, length)
    work = flat if flat.is_floating_point() else flat.float()
    if mode == "nearest":
        out = F.interpolate(work, size=size, mode="nearest-exact")
    elif mode == "linear":
        out = F.adaptive_avg_pool1d(work, size) if size < length else F.interpolate(work, size=size, mode="linear")
    else:
        raise ValueError(f"mode must be 'linear' or 'nearest', got {mode!r}")
    return out.to(x.dtype).reshape(*moved.shape[:-1], size).movedim(-1, axis)


def _check(volume, view: str) -> None:
    if view not in VIEWS:
        raise ValueError(f"unknown view {view!r}; expected one of {VIEWS}")
    if volume.ndim != 4:
        raise ValueError(f"expected a channel-first (C, H, W, D) volume, got shape {tuple(volume.shape)}")


def to_view(volume: torch.Tensor, view: str, mode: str = "linear") -> torch.Tensor:
    """The ``view`` of ``volume`` ``(C, H, W, D)``: its slices along the last axis, square in-plane (see the module
    docstring). ``mode`` as :func:`resize_axis`."""
    _check(volume, view)
    if view == "axial":
        return volume
    if view == "coronal":  # (C, H, D, W), D -> H
        return resize_axis(volume.permute(0, 1, 3, 2), 2, volume.shape[1], mode)
    return resize_axis(volume.permute(0, 2, 3, 1), 2, volume.shape[2], mode)  # sagittal: (C, W, D, H), D -> W


def from_view(x: torch.Tensor, view: str, depth: int, mode: str = "linear") -> torch.Tensor:
    """Back from a ``view`` ``(C, A, A, N)`` (e.g. the network's output over :func:`to_view`'s slices) to the volume
    layout ``(C, H, W, D)`` with ``depth`` slices along ``D``."""
    _check(x, view)
    if view == "axial":
        return x
    back = resize_axis(x, 2, int(depth), mode)
    return back.permute(0, 1, 3, 2) if view == "coronal" else back.permute(0, 3, 1, 2)


def view_length(shape: Sequence[int], view: str) -> int:
    """The number of slices of ``view`` for a volume of ``shape`` ``(C, H, W, D)``."""
    return int(shape[{"axial": 3, "coronal": 2, "sagittal": 1}[view]])


def view_slice(volume, view: str, index: int, mode: str = "linear") -> torch.Tensor:
    """Slice ``index`` of ``to_view(volume, view, mode)`` ``(C, A, A)``, reading only that slice of ``volume``
    (a tensor, or a read-only, memory-mapped numpy array)."""
    _check(volume, view)
    cut = {"axial": (Ellipsis, index), "coronal": (slice(None), slice(None), index),
           "sagittal": (slice(None), index)}[view]  # fmt: skip
    part = volume[cut]
    part = torch.from_numpy(np.array(part)) if isinstance(part, np.ndarray) else torch.as_tensor(part)
    if view == "axial":
        return part
    return resize_axis(part, 2, int(volume.shape[1 if view == "coronal" else 2]), mode)  # (C, H|W, D) -> square
