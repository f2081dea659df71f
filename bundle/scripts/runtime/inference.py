"""Inference pieces MONAI lacks, used by ``configs/inference.json``: loading, running and writing a case (the
cases themselves, what is read and what is written, are :mod:`scripts.runtime.cases`).

- :class:`LoadInputsd`: the input of a case (the modalities it has that the generator reads, stacked) and its mask,
  whatever the generator.
- :func:`inference_batch`: ``prepare_batch`` of inference (a case's available and wanted modalities to the
  generator).
- :class:`LoadVolumed`: ``LoadImaged`` for one input volume whose every failure (unreadable file, not 3D, NaN/Inf,
  constant, negative intensities; for a T2, a contrast that is not a T2's) is one error naming the file, raised
  before anything is written.
- :class:`SliceRunner`: a 2D network over a stack of slices in equal batches, eager, compiled, with ONNX
  Runtime or in bfloat16; the one slice loop of the bundle (inference, evaluation, the downstream inputs and segmenter, the
  benchmark).
- :class:`BrainSliceInferer`: the 2D generator over the axial slices of a volume that hold brain (the result of
  MONAI's ``SliceInferer`` without running the all-background slices, nor stitching one-slice windows), through
  a :class:`SliceRunner`; with ``views`` / ``flip`` it fuses the axial, coronal and sagittal passes (and those of
  the mirrored volume), and with ``uncertainty`` appends their per-voxel spread (:class:`SplitSpreadd` splits it off).
- :class:`SaveTargetsd`: one NIfTI per target, written atomically (:func:`scripts.runtime.files.atomic_paths`), in
  parallel, optionally in the background (:class:`scripts.runtime.throughput.BackgroundWriter`).
- :class:`CaseProgress`: an engine handler that logs one line per finished case (its name and seconds).
- :class:`UnwrapTransformErrors`: an engine handler that re-raises the input error itself instead of MONAI's
  ``RuntimeError("applying transform ...")`` wrappers around it.

Intensity convention of the written volumes: float32 in [0, 1] (``(pred + 1) / 2``), 0 in the background (where no
given modality is > 0), on exactly the input's voxel grid
(shape and affine). An uncertainty map (``--uncertainty true``) is written beside each volume as
``<case>_<target>_uncertainty``: the spread of the fused passes, in the same [0, 1] units, 0 in the background.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
import warnings
from collections.abc import Callable, Hashable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import nibabel as nib
import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.inferers import Inferer
from monai.transforms import LoadImaged, MapTransform

from .cases import case_output_paths
from .conventions import SOURCE, TARGETS
from .data import neighbour_slices
from .networks import output_indices
from .files import atomic_paths
from .precision import check_precision, native_bf16, resolve_precision
from .throughput import process_shard
from .views import from_view, parse_views, to_view

logger = logging.getLogger(__name__)

#: NIfTI ``descrip`` of each written volume (at most 80 characters).
DESCRIP = "brainsynth synthetic {target}, intensity [0,1]"
#: Share of non-zero voxels that may be negative before the T2 is rejected as not raw MR intensities.
MAX_NEGATIVE_FRACTION = 0.01


class LoadVolumed(LoadImaged):
    """``LoadImaged`` for one input volume (any modality), with its checks.

    Reads any format MONAI's readers open (NIfTI with nibabel; NRRD, MHA, DICOM series folders and others with
    ITK) into a ``(H, W, D)`` MetaTensor (no channel dimension). When the item has ``channel_key`` (a 4D
    multi-channel file listed in a datalist), that channel of the last axis is kept. Trailing singleton dimensions
    are dropped.

    Raises (each message starts with the file name):
        FileNotFoundError: the file does not exist.
        ValueError: the file cannot be read as an image (not an image, corrupt or truncated), it is not a 3D
            volume (2D, or 4D given as a single input), it holds NaN or Inf, it is constant, or more than
            :data:`MAX_NEGATIVE_FRACTION` of its non-zero voxels are negative (not raw MR intensities with
            background 0, e.g. z-scored); with ``check_contrast`` (for a T2), it does not look like a T2
            (:func:`scripts.runtime.contrast.t2_probability` below 0.5: CSF not bright; a volume with too little
            brain to judge is let through with a warning).
    """

    def __init__(self, keys: KeysCollection = "image", channel_key: str = "channel", check_contrast: bool = False,
                 **kwargs):  # fmt: skip
        kwargs.setdefault("image_only", True)
        super().__init__(keys, **kwargs)
        self.channel_key = channel_key
        self.check_contrast = bool(check_contrast)

    def __call__(self, data: Mapping[Hashable, object], reader=None) -> dict:
        d = dict(data)
        channel = d.pop(self.channel_key, None)
        for key in self.key_iterator(d):
            path = str(d[key])
            if not os.path.exists(path):
                raise FileNotFoundError(f"{path}: no such file or folder")
            try:
                img = super().__call__({key: path}, reader)[key]
            except Exception as e:  # every reader error becomes one message naming the file (with the reason)
                raise ValueError(f"{path}: cannot be read as an image ({type(e).__name__}: {e})") from None
            d[key] = _checked_volume(img, path, channel)
            if self.check_contrast:
                _check_t2_contrast(d[key], path)
        return d


class LoadInputsd(LoadVolumed):
    """The first step of ``inference.json``: a case's input ``image`` and its ``mask`` (the voxels the written
    volumes keep), both channel-first, on the input's grid.

    A case (:func:`scripts.runtime.cases.synthesis_case`) names its files, ``{"modalities": {modality: path}}``
    (and ``"channels"``: ``{modality: index}`` for a 4D multi-channel file); a bare ``{"image": path}`` item (as
    MONAI Label sends) is a T2-only case. Each file is read and checked by :class:`LoadVolumed` (the T2 contrast
    check, ``check_contrast``, on the T2 only); ``image`` stacks the modalities the generator reads (``inputs``, its
    ``inputs``: one channel for a paper generator, four for the any-missing one), a missing one all zeros;
    ``mask`` ``(1, H, W, D)`` is where any given modality is > 0 (the written volumes are 0 elsewhere).

    A ``LoadImaged``, so that MONAI Label recognises the loading step of the exported bundles.

    Raises:
        ValueError: a file fails its checks, the case gives a modality the generator does not read, or the files
            are not on one voxel grid (shape and affine; the message names them).
    """

    def __init__(self, keys: KeysCollection = "image", inputs=(SOURCE,), check_contrast: bool = False, **kwargs):
        super().__init__(keys, check_contrast=check_contrast, **kwargs)
        self.inputs = tuple(inputs)
        self.load_t2 = LoadVolumed("image", check_contrast=self.check_contrast, **kwargs)
        self.load = LoadVolumed("image", check_contrast=False, **kwargs)

    def __call__(self, data: Mapping[Hashable, object], reader=None) -> dict:
        d = dict(data)
        key = self.keys[0]
        if "modalities" not in d:  # a bare item: its image is the T2 (a 4D file's T2 channel: "t2_channel")
            d["modalities"] = {SOURCE: d[key]}
            if "t2_channel" in d:
                d["channels"] = {SOURCE: d.pop("t2_channel")}
        modalities, channels = d.pop("modalities"), d.pop("channels", None) or {}
        unread = [m for m in modalities if m not in self.inputs]
        if unread:
            raise ValueError(f"{modalities[unread[0]]}: this generator reads {', '.join(self.inputs)}, not the "
                             f"{unread[0]}")  # fmt: skip
        loaded, first = {}, None
        for m, path in modalities.items():
            item = {"image": path, "channel": channels[m]} if m in channels else {"image": path}
            img = (self.load_t2 if m == SOURCE else self.load)(item)["image"]
            if first is None:
                first = (path, img)
            elif tuple(img.shape) != tuple(first[1].shape) or not np.allclose(img.affine, first[1].affine, atol=1e-4):
                raise ValueError(f"{path} and {first[0]} are not on one voxel grid (shapes {tuple(img.shape)} and "
                                 f"{tuple(first[1].shape)}, or their affines differ)")  # fmt: skip
            loaded[m] = img
        ref = first[1]
        zeros = torch.zeros(ref.shape, dtype=torch.float32)
        stack = torch.stack([torch.as_tensor(loaded[m]).float() if m in loaded else zeros for m in self.inputs])
        image = MetaTensor(stack, meta=dict(ref.meta))
        image.meta["original_channel_dim"] = 0
        for k in self.keys:
            d[k] = image
        d["mask"] = MetaTensor((stack > 0).any(dim=0, keepdim=True).float(), meta=dict(ref.meta))
        d["mask"].meta["original_channel_dim"] = 0
        return d


def _check_t2_contrast(img: torch.Tensor, path: str) -> None:
    """Refuse a volume that does not look like a T2 (see :mod:`scripts.runtime.contrast`)."""
    from .contrast import t2_probability

    volume = (img.as_tensor() if isinstance(img, MetaTensor) else img).float().numpy()
    try:
        p = t2_probability(volume)
    except ValueError as e:  # too little brain to judge: other checks decide whether it is usable at all
        logger.warning(f"{path}: contrast not checked ({e})")
        return
    if p < 0.5:
        raise ValueError(
            f"{path}: does not look like a T2 (T2 probability {p:.2f}: its CSF is not bright; a T1, T1ce or FLAIR?); "
            "give --check_contrast false to synthesise from it anyway"
        )


def _checked_volume(img: torch.Tensor, path: str, channel: int | None) -> torch.Tensor:
    """The 3D volume of a loaded image (see :class:`LoadVolumed` for what is checked)."""
    if channel is not None and img.ndim == 4:
        img = img[..., channel]
    while img.ndim > 3 and img.shape[-1] == 1:
        img = img[..., 0]
    if img.ndim != 3:
        hint = " (one multi-channel volume: list it in a datalist to use its T2 channel)" if img.ndim == 4 else ""
        raise ValueError(f"{path}: image has shape {tuple(img.shape)}; a 3D volume is needed{hint}")
    t = img.as_tensor() if isinstance(img, MetaTensor) else img  # plain tensor: no metadata work per check
    bad = int((~torch.isfinite(t)).sum()) if t.is_floating_point() else 0
    if bad:
        raise ValueError(f"{path}: {bad} voxels are NaN or Inf")
    low, high = (v.item() for v in torch.aminmax(t))
    if low == high:
        raise ValueError(f"{path}: constant image (every voxel is {low}); there is no brain to synthesise from")
    negative = int((t < 0).sum()) if low < 0 else 0
    nonzero = int((t != 0).sum()) if negative else 0
    if negative > MAX_NEGATIVE_FRACTION * nonzero:
        raise ValueError(
            f"{path}: {negative} of {nonzero} non-zero voxels are negative; expected raw MR intensities with "
            "background 0 (not z-scored or otherwise shifted)"
        )
    return img


def inference_batch(batchdata: dict, device=None, non_blocking: bool = False, **kwargs):
    """``prepare_batch`` of inference: ``(image, None, (), {"available": ..., "outputs": [names]})``, so that the
    generator (any kind: each takes these keywords) synthesises the case's wanted modalities (its ``missing``)
    from those it has (``available``); a bare item without them: ``(image, None)``, every output."""
    image = batchdata["image"].to(device=device, non_blocking=non_blocking)
    asked = {}
    if "available" in batchdata:
        asked["available"] = batchdata["available"].to(device)
    if "missing" in batchdata:
        missing = batchdata["missing"]
        asked["outputs"] = str(missing[0] if isinstance(missing, (list, tuple)) else missing).split(",")
    return (image, None, (), asked) if asked else (image, None)


class SaveTargetsd:
    """Write each channel of ``d[key]`` as ``output_dir/<case>_<target>.nii.gz``, all of a case or none.

    A case (an item with ``missing`` and ``output_names``, :func:`scripts.runtime.cases.synthesis_case`) has one
    channel per wanted modality, written under its ``output_names``; an item without them, one per ``targets``
    (which modalities a run writes is the case's choice, ``--targets``: :func:`scripts.runtime.cases.synthesis_case`).

    Args:
        key: the prediction, ``(len(targets), H, W, D)`` on the input's voxel grid (after ``Invertd``), float.
        output_dir: destination folder (created if needed).
        ref_key: a MetaTensor ``(1, H, W, D)`` on the input's grid that was never resampled; its affine is
            written, so the outputs have exactly the input's shape and affine.
        case_key: the case id, used in the file names.
        targets: channel names, in channel order.
        writer: a :class:`scripts.runtime.throughput.BackgroundWriter` that writes while the next case is
            synthesised (attach it to the engine too, so the run ends when all is written); None writes here.
        descrip: NIfTI ``descrip`` template (``{target}`` is filled in; at most 80 characters).
        uncertainty_key: the key of the uncertainty maps (:class:`SplitSpreadd`), one channel per channel of
            ``key``; when the item has it, each is written beside its volume as ``<case>_<target>_uncertainty``
            (:func:`uncertainty_path`), in the same all-or-none group.
        output_ext: ``".nii.gz"`` (default: gzip level 1, ~3x smaller) or ``".nii"`` (uncompressed: 36 MB per
            BraTS-size volume, written several times faster; for large batches on a GPU, where compressing
            costs more than the network).

    Each volume is saved as float32 to a hidden temporary name in ``output_dir``
    (``.<case>_<target>.<pid>.<token>.tmp.nii.gz``; the targets in parallel threads: gzip releases the GIL); only
    when all targets of the case are saved are they renamed into place (:func:`scripts.runtime.files.atomic_paths`),
    so a failure or a kill leaves no partial output under a final name. Temporary files of the case left by a
    killed process (whose pid no longer runs) are removed the next time the case is written.

    Raises:
        RuntimeError: the prediction is not on the reference grid (a bug, not an input error).
    """

    def __init__(
        self,
        key: str = "pred",
        output_dir: str = ".",
        ref_key: str = "mask",
        case_key: str = "case",
        targets=TARGETS,
        descrip: str = DESCRIP,
        output_ext: str = ".nii.gz",
        writer=None,
        uncertainty_key: str = "uncertainty",
    ):
        if output_ext not in (".nii.gz", ".nii"):
            raise ValueError(f"output_ext must be '.nii.gz' or '.nii', got {output_ext!r}")
        self.writer = writer
        self.key, self.output_dir, self.ref_key, self.case_key = key, output_dir, ref_key, case_key
        self.targets, self.descrip, self.output_ext = tuple(targets), descrip, output_ext
        self.uncertainty_key = uncertainty_key

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        pred, ref, case = d[self.key], d[self.ref_key], str(d[self.case_key])
        channels = str(d["missing"]).split(",") if "missing" in d else list(self.targets)  # any-missing: per case
        if pred.shape[0] != len(channels) or tuple(pred.shape[1:]) != tuple(ref.shape[1:]):
            raise RuntimeError(
                f"case {case}: prediction of shape {tuple(pred.shape)} is not {len(channels)} channels on "
                f"the input grid {tuple(ref.shape[1:])}"
            )
        volumes = torch.as_tensor(pred).detach().to("cpu", torch.float32).numpy().copy()  # a copy: pred may change
        targets = channels
        affine = np.asarray(ref.affine, dtype=np.float64)
        finals = case_output_paths(self.output_dir, case, self.output_ext, targets, d.get("output_names"))
        spread = d.get(self.uncertainty_key) if self.uncertainty_key else None
        if spread is not None:  # <output>_uncertainty beside each output, written with them
            spread = torch.as_tensor(spread).detach().to("cpu", torch.float32).numpy()
            volumes = np.concatenate([volumes, spread])
            finals = finals + [uncertainty_path(f, self.output_ext) for f in finals]
            targets = targets + [f"{t} uncertainty" for t in targets]
        if self.writer is None:
            self._write(volumes, targets, affine, finals)
        else:
            self.writer.submit(self._write, volumes, targets, affine, finals)
        return d

    def _write(self, volumes: np.ndarray, targets: list[str], affine: np.ndarray, finals: list[str]) -> None:
        """Write one case's volumes: all of ``finals`` or none."""
        with atomic_paths(finals) as temporaries:
            with ThreadPoolExecutor(max_workers=len(targets)) as pool:  # waits for every write, failed or not
                jobs = [
                    pool.submit(nib.save, self._nifti(volume, affine, target), tmp)
                    for volume, target, tmp in zip(volumes, targets, temporaries)
                ]
            for job in jobs:
                job.result()  # re-raise the first failure
        logger.debug(f"wrote {', '.join(finals)}")

    def _nifti(self, volume: np.ndarray, affine: np.ndarray, target: str) -> nib.Nifti1Image:
        img = nib.Nifti1Image(volume, affine)
        img.set_qform(affine, code=1)
        img.set_sform(affine, code=1)
        img.header.set_xyzt_units("mm", "sec")
        img.header["descrip"] = self.descrip.format(target=target)[:80].encode()
        return img


def uncertainty_path(path: str, output_ext: str = ".nii.gz") -> str:
    """The uncertainty map's file beside the synthesised volume ``path``: ``<stem>_uncertainty<ext>``."""
    return path[: -len(output_ext)] + "_uncertainty" + output_ext


#: Ways :class:`BrainSliceInferer` can run the network.
BACKENDS = ("auto", "torch", "onnxruntime")
def onnxruntime_available() -> bool:
    """Whether ``onnx`` (needed by ``torch.onnx.export``) and ``onnxruntime`` can be imported."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(backend: str, device_type: str) -> str:
    """The engine ``backend`` means for slices on a ``device_type`` device: ``"torch"`` or ``"onnxruntime"``.

    ``auto`` is ONNX Runtime on the CPU when ``onnx`` and ``onnxruntime`` are installed, torch otherwise; an explicit
    ``onnxruntime`` off the CPU, or without the packages, is an error saying so."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return "torch"
    if backend == "auto":
        return "onnxruntime" if device_type == "cpu" and onnxruntime_available() else "torch"
    if device_type != "cpu":
        raise ValueError(
            f"backend 'onnxruntime' runs on the CPU, but the slices are on {device_type}: "
            "use backend 'torch' or 'auto' (or device cpu)"
        )
    if not onnxruntime_available():
        raise ImportError("backend 'onnxruntime' needs the onnx and onnxruntime packages (requirements.txt)")
    return "onnxruntime"


class SliceRunner:
    """Run a 2D network over a stack of slices ``(N, C_in, H, W)`` -> ``(N, C_out, H, W)``, in equal batches of at
    most ``batch_size`` (e.g. 137 slices at 64 -> 46, 46, 45, not 64, 64, 9), under ``torch.inference_mode``.

    The one slice loop of the bundle: :class:`BrainSliceInferer` (inference and the volume convention of Table 1),
    the paper-convention slices of :class:`scripts.runtime.evaluation.SynthesisEvaluation`, the downstream inputs
    and segmenter (:mod:`scripts.runtime.downstream`) and the benchmark's bare forward all call it.

    Engines (:attr:`last_engine` says which one the last call used):

    - ``"eager"``: the network itself (``backend="torch"``);
    - ``"compiled"``: the network through ``torch.compile`` (``backend="torch"`` with ``compile``; inductor, frozen
      weights, a dynamic batch size so that other numbers of slices reuse the compiled code). The first call
      compiles; later forwards cost less CPU, with outputs equal up to float rounding. If compiling fails (e.g. no
      C++ compiler), a warning says so and the runner stays eager from then on;
    - ``"onnxruntime"``: the network exported once with ``torch.onnx.export`` (in memory, a dynamic batch size) and
      run by ONNX Runtime on the CPU with as many threads as torch uses, outputs equal up to float rounding; CPU
      slices only. The export is redone when the network's weights change (another network, ``load_state_dict``,
      an optimizer step); :attr:`exports` counts them. If the export or the session fails, a warning says so and
      the runner uses torch from then on.
    - ``"bf16"``: the network under ``torch.autocast`` with bfloat16 (``precision="bf16"``, or ``"auto"`` on a CPU
      with native bf16): convolutions in bfloat16, normalisations in float32, the output returned as float32.
      Takes precedence over ``backend`` (ONNX Runtime runs fp32 here) and ``compile``.

    What each engine costs and how close its outputs are, as measured: ``docs/performance.md``.

    Args:
        batch_size: most slices per network call.
        backend: ``"torch"`` (eager or compiled), ``"onnxruntime"``, or ``"auto"``: ONNX Runtime for slices on the
            CPU when ``onnx`` and ``onnxruntime`` are installed, torch otherwise (:func:`resolve_backend`).
        compile: compile the network for the torch backend.
        background: the value of an empty pixel; the ONNX export traces the network on a slice of it.
        precision: ``"fp32"`` (default), ``"bf16"`` or ``"auto"`` (:func:`resolve_precision`).

    Raises:
        ValueError: ``batch_size < 1``, an unknown backend or precision.
    """

    def __init__(self, batch_size: int = 64, backend: str = "torch", compile: bool = False, background: float = -1.0,
                 precision: str = "fp32"):  # fmt: skip
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.precision = check_precision(precision)
        self._warned = False
        self.batch_size = int(batch_size)
        self.backend = backend
        self.compile = bool(compile)
        self.background = float(background)
        self.last_engine: str | None = None
        self.exports = 0
        self._compiled: dict[int, Callable] = {}
        self._onnx: tuple | None = None  # (network, weights stamp, session) of the last exported network

    @property
    def session(self):
        """The ONNX Runtime session of the last exported network (None before any export, or with torch)."""
        return self._onnx[2] if self._onnx is not None else None

    def _compiled_network(self, network: Callable) -> Callable:
        if id(network) not in self._compiled:
            self._compiled[id(network)] = torch.compile(network, dynamic=True, options={"freezing": True})
        return self._compiled[id(network)]

    def _onnx_session(self, network: torch.nn.Module, slices: torch.Tensor):
        """An ONNX Runtime session of ``network`` (exported now unless the cached one has the same weights)."""
        weights = [*network.parameters(), *network.buffers()]
        stamp = tuple((t.data_ptr(), t._version) for t in weights)
        if self._onnx is not None and self._onnx[0] is network and self._onnx[1] == stamp:
            return self._onnx[2]
        import io

        import onnxruntime

        sample = torch.full((2, *slices.shape[1:]), self.background, dtype=slices.dtype)
        buffer = io.BytesIO()
        with torch.no_grad(), warnings.catch_warnings():
            # the legacy exporter's deprecation notice, and its InstanceNorm note (no running statistics here)
            warnings.simplefilter("ignore")
            torch.onnx.export(
                network, (sample,), buffer, input_names=["slices"], output_names=["targets"],
                dynamic_axes={"slices": {0: "n"}, "targets": {0: "n"}}, dynamo=False,
            )  # fmt: skip
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        options.log_severity_level = 3  # errors only
        # idle threads sleep instead of spinning between calls: the NIfTI writer threads need those cores
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        session = onnxruntime.InferenceSession(buffer.getvalue(), options, providers=["CPUExecutionProvider"])
        self._onnx = (network, stamp, session)
        self.exports += 1
        return session

    def __call__(self, slices: torch.Tensor, network: Callable, *args, **kwargs) -> torch.Tensor:
        """``network(batch, *args, **kwargs)`` over ``slices`` ``(N, ...)`` in equal batches -> the outputs
        concatenated along the first axis (ONNX Runtime: float32 on the CPU; torch: as the network returns them).
        Extra ``args``/``kwargs`` or a network that is not an ``nn.Module`` run with torch.

        Raises:
            Whatever the network raises (eager); ``ImportError``/``ValueError`` as :func:`resolve_backend`.
        """
        n = slices.shape[0]
        n_batches = max(-(-n // self.batch_size), 1)
        size = max(-(-n // n_batches), 1)
        session = None
        bf16 = resolve_precision(self.precision, slices.device.type) == "bf16"
        exportable = not args and not kwargs and isinstance(network, torch.nn.Module) and not bf16
        if exportable and resolve_backend(self.backend, slices.device.type) == "onnxruntime":
            try:
                session = self._onnx_session(network, slices)
            except Exception as e:  # an operator the exporter or ONNX Runtime lacks: say so, run with torch
                logger.warning(f"ONNX Runtime path failed ({type(e).__name__}: {str(e)[:200]}); running with torch")
                self.backend = "torch"
        if session is not None:
            self.last_engine, net = "onnxruntime", None
        elif bf16:
            self.last_engine, net = "bf16", network
        elif self.compile:
            self.last_engine, net = "compiled", self._compiled_network(network)
        else:
            self.last_engine, net = "eager", network
        outs = []
        # (a disabled autocast here would switch off the evaluator's own, --amp true)
        reduced = torch.autocast(slices.device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
        if bf16 and slices.device.type == "cpu" and not native_bf16() and not self._warned:
            logger.warning("precision bf16: this CPU has no native bfloat16 (AVX-512 BF16 or AMX); it will be slow")
            self._warned = True
        with torch.inference_mode(), reduced:
            for start in range(0, n, size):
                batch = slices[start : start + size]
                if session is not None:
                    array = batch.to(torch.float32).contiguous().numpy()
                    outs.append(torch.from_numpy(session.run(None, {"slices": array})[0]))
                    continue
                try:
                    outs.append(net(batch, *args, **kwargs).float() if bf16 else net(batch, *args, **kwargs))
                except Exception as e:
                    if net is network:
                        raise
                    # compilation needs a working C++ toolchain; without one, say so and run eagerly
                    logger.warning(f"torch.compile failed ({type(e).__name__}: {str(e)[:200]}); running eagerly")
                    self.compile, self.last_engine, net = False, "eager", network
                    outs.append(net(batch, *args, **kwargs))
        return torch.cat(outs)


class BrainSliceInferer(Inferer):
    """Run a 2D network over the axial slices of a volume (optionally the coronal and sagittal ones too, and the
    mirrored volume's, fused), sending only the slices that hold brain.

    ``inputs`` ``(B, 1, H, W, D)`` in [-1, 1] with background exactly ``background`` (what
    :class:`scripts.runtime.data.ScaleBrainIntensityd` gives voxels <= 0) -> ``(B, C_out, H, W, D)``, where the network maps
    ``(N, 1, H, W)`` to ``(N, C_out, H, W)`` (all targets of a slice in one batched call). A network with
    ``in_channels`` (or ``context``) k > 1 (2.5D) gets each slice with its neighbours, ``(N, k, H, W)``, stacked by
    :func:`scripts.runtime.data.neighbour_slices` exactly as in training (edges clamped); a C-channel volume (the
    any-missing generator's four modality slots) gives ``(N, C * k, H, W)``, channel by channel. Extra tensor
    arguments (the any-missing availability) are passed on per case.

    A slice whose every voxel equals ``background`` is not sent through the network: the network's output for one
    all-background slice is computed once (as one more sample of the last batch) and copied to every such slice. The
    network is per-sample (InstanceNorm, no batch statistics), so the result equals running every slice, up to
    float rounding (max abs difference ~1e-6), while a BraTS-like volume costs ~130-145 slices instead of 155. The
    output has the input's dtype (float32 under AMP too). The slices go through :attr:`runner`, a
    :class:`SliceRunner`.

    Args:
        sw_batch_size: most slices per network call.
        background: the value of a voxel without brain.
        compile: run the network through ``torch.compile`` (see :class:`SliceRunner`). Worth it for many volumes,
            not one (``inference.json`` turns it on from 16 volumes). Only for the ``torch`` backend.
        backend: ``"torch"``, ``"onnxruntime"`` or ``"auto"`` (see :class:`SliceRunner`; ``auto``: ONNX Runtime on
            the CPU when installed, torch on a GPU, where the network is a few percent of the time).
        precision: ``"fp32"``, ``"bf16"`` or ``"auto"`` (bf16 on a CPU that computes it natively; see
            :class:`SliceRunner`).
        views: the slice orientations run (:func:`scripts.runtime.views.parse_views`: ``"axial"``, the default and
            the paper's; ``"all"`` or a comma-separated list for tri-planar synthesis): each view's slices of the
            whole volume (:func:`scripts.runtime.views.to_view`), as training draws them
            (:class:`scripts.runtime.data.SliceDataset` with ``views``); the output is the mean of the passes.
        flip: also run every view on the left-right mirrored volume and mirror its output back (test-time
            augmentation; twice the passes, less the mirrored sagittal pass of a one-slice generator, which would
            see the same slices).
        uncertainty: append, as ``C_out`` further channels, each voxel's spread over the passes (population
            standard deviation, in the network's [-1, 1] units; 0 with a single pass).
            :class:`SplitSpreadd` separates it from the synthesis.

    Every forward runs under ``torch.inference_mode``; the returned tensor is an ordinary tensor (a ``MetaTensor``
    with the input's metadata when the input is one), so the inverse transforms may modify it.
    """

    def __init__(self, sw_batch_size: int = 64, background: float = -1.0, compile: bool = False, backend="torch",
                 precision: str = "fp32", views="axial", flip: bool = False, uncertainty: bool = False):  # fmt: skip
        super().__init__()
        if sw_batch_size < 1:
            raise ValueError(f"sw_batch_size must be >= 1, got {sw_batch_size}")
        self.sw_batch_size = int(sw_batch_size)
        self.background = float(background)
        self.runner = SliceRunner(self.sw_batch_size, backend, compile, self.background, precision)
        self.views = parse_views(views)
        self.flip = bool(flip)
        self.uncertainty = bool(uncertainty)

    @property
    def compile(self) -> bool:
        """Whether the runner compiles the network (False after compiling failed)."""
        return self.runner.compile

    @property
    def backend(self) -> str:
        """The runner's backend (``"torch"`` after the ONNX Runtime path failed)."""
        return self.runner.backend

    def brain_slices(self, volume: torch.Tensor, context: int = 1) -> torch.Tensor:
        """Indices of the slices (last axis) of ``volume`` ``(C, H, W, D)`` with a voxel other than background, or,
        for a ``context`` of k slices, whose k-slice neighbourhood has one."""
        has = (volume != self.background).flatten(0, 2).any(dim=0)
        if context > 1:
            has = torch.nn.functional.max_pool1d(has[None, None].float(), context, 1, context // 2)[0, 0] > 0
        return torch.nonzero(has).flatten()

    def slices_to_run(self, volume: torch.Tensor, context: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """``(brain, run)`` for a volume ``(C, H, W, D)``: the indices of its brain slices (:meth:`brain_slices`), and
        of the slices sent through the network (the brain slices, then the first other slice when there is one)."""
        brain = self.brain_slices(volume, context)
        empty = torch.ones(volume.shape[-1], dtype=torch.bool, device=volume.device)
        empty[brain] = False
        return brain, torch.cat([brain, torch.nonzero(empty).flatten()[:1]])

    @staticmethod
    def network_input(volume: torch.Tensor, run: torch.Tensor, context: int = 1) -> torch.Tensor:
        """The network's input for the slices ``run`` of a ``(C, H, W, D)`` volume: ``(N, C, H, W)``, or with a 2.5D
        ``context`` > 1 each channel's ``context`` neighbouring slices, ``(N, C * context, H, W)``."""
        if context > 1:
            return torch.cat([neighbour_slices(channel, run, context) for channel in volume], dim=1)
        return volume[..., run].permute(3, 0, 1, 2)

    def _slices(self, volume: torch.Tensor, network: Callable, context: int, args, kwargs) -> torch.Tensor:
        """One pass over the slices (last axis) of ``volume`` ``(C, H, W, D)`` -> ``(C_out, H, W, D)``."""
        brain, run = self.slices_to_run(volume, context)
        pred = self.runner(self.network_input(volume, run, context).contiguous(), network, *args, **kwargs)
        pred = pred.to(volume.dtype)  # under autocast the network answers in float16 / bfloat16
        out = torch.empty((pred.shape[1], *volume.shape[1:]), dtype=volume.dtype, device=pred.device)
        if run.numel() > brain.numel():  # the one all-background slice run stands for every such slice
            out[...] = pred[brain.numel() :].permute(1, 2, 3, 0)
        out[..., brain] = pred[: brain.numel()].permute(1, 2, 3, 0)
        return out

    def passes(self, volume: torch.Tensor, network: Callable, context: int = 1, args=(), kwargs=None):
        """Each pass of :attr:`views` (and, with :attr:`flip`, of the left-right mirrored volume) over ``volume``
        ``(C, H, W, D)``: yields ``(view, mirrored, output (C_out, H, W, D))``."""
        kwargs = kwargs or {}
        for mirrored in (False, True) if self.flip else (False,):
            v = volume.flip(1) if mirrored else volume  # H runs right-left on the RAS grid
            for view in self.views:
                if mirrored and view == "sagittal" and context == 1:
                    continue  # the same sagittal slices in the mirrored order: the same outputs
                out = from_view(self._slices(to_view(v, view), network, context, args, kwargs), view, v.shape[-1])
                yield view, mirrored, (out.flip(1) if mirrored else out)

    def _fused(self, volume: torch.Tensor, network: Callable, context: int, args, kwargs) -> torch.Tensor:
        """The mean of :meth:`passes` per voxel, with their spread (population standard deviation) appended as
        further channels when :attr:`uncertainty` is on."""
        if self.views == ("axial",) and not self.flip and not self.uncertainty:
            return self._slices(volume, network, context, args, kwargs)
        total = squares = None  # in float64: the spread is a difference of two near sums
        n = 0
        for _, _, out in self.passes(volume, network, context, args, kwargs):
            out = out.double()
            total = out.clone() if total is None else total + out
            squares = out * out if squares is None else squares + out * out
            n += 1
        mean = total / n
        if not self.uncertainty:
            return mean.to(volume.dtype)
        spread = (squares / n - mean * mean).clamp_min(0).sqrt()
        return torch.cat([mean, spread]).to(volume.dtype)

    def __call__(self, inputs: torch.Tensor, network: Callable, *args: Any, **kwargs: Any) -> torch.Tensor:
        if inputs.ndim != 5:
            raise ValueError(f"expected a (B, C, H, W, D) volume batch, got shape {tuple(inputs.shape)}")
        x = inputs.as_tensor() if isinstance(inputs, MetaTensor) else inputs
        # a 2.5D generator takes k neighbouring slices (of each channel: the any-missing generator's four slots)
        context = int(getattr(network, "context", getattr(network, "in_channels", 1)))
        kwargs, keep = _t2_generator_call(network, kwargs)
        results = []
        for i, volume in enumerate(x):
            case_args = [a[i : i + 1] if isinstance(a, torch.Tensor) else a for a in args]  # per-case inputs
            case_kwargs = {k: v[i : i + 1] if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
            results.append(self._fused(volume, network, context, case_args, case_kwargs))
        output = torch.stack(results)
        if keep is not None:  # the channels asked for, of the mean (and of the spread after it)
            total = len(getattr(network, "module", network).outputs)
            output = output[:, keep + ([total + k for k in keep] if self.uncertainty else [])]
        if isinstance(inputs, MetaTensor):
            output = MetaTensor(output).copy_meta_from(inputs, copy_attr=False)
        return output


def _t2_generator_call(network: Callable, kwargs: dict) -> tuple[dict, list[int] | None]:
    """The keywords a case asks of ``network`` (:func:`inference_batch`), and the output channels to keep after it
    ran. A generator that reads the T2 alone needs no ``available``, and runs with no keywords at all (every
    output, then the ``outputs`` asked for are kept): so it stays exportable (ONNX Runtime, ``torch.compile``,
    :class:`SliceRunner`)."""
    net = getattr(network, "module", network)
    if tuple(getattr(net, "inputs", ())) != (SOURCE,) or set(kwargs) - {"available", "outputs"}:
        return kwargs, None
    outputs = kwargs.get("outputs")
    return {}, (None if outputs is None else output_indices(outputs, tuple(net.outputs)))


class SplitSpreadd(MapTransform):
    """Split the output of a :class:`BrainSliceInferer` with ``uncertainty`` on (the fused synthesis, then its
    spread: ``2 * C`` channels) into ``key`` (the first ``C``) and ``spread_key`` (the spread, halved: in units of
    the written [0, 1] intensities, as ``pred`` is mapped from [-1, 1]), a MetaTensor with ``key``'s metadata so
    that ``Invertd`` brings both to the input's grid. With ``enabled`` False it does nothing; with ``keep="spread"``
    ``key`` becomes the spread and the synthesis is dropped (the MONAI Label uncertainty bundles)."""

    def __init__(self, keys: KeysCollection = "pred", spread_key: str = "uncertainty", enabled: bool = True,
                 keep: str = "both"):  # fmt: skip
        super().__init__(keys)
        if keep not in ("both", "spread"):
            raise ValueError(f"keep must be 'both' or 'spread', got {keep!r}")
        self.spread_key = spread_key
        self.enabled = bool(enabled)
        self.keep = keep

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        if not self.enabled:
            return d
        for key in self.key_iterator(d):
            pred = d[key]
            if pred.shape[0] % 2:
                raise RuntimeError(f"{key} has {pred.shape[0]} channels; with uncertainty it holds 2 x C")
            half = pred.shape[0] // 2
            d[key], spread = pred[:half], pred[half:] / 2
            if isinstance(pred, MetaTensor):
                spread = MetaTensor(spread.as_tensor()).copy_meta_from(pred, copy_attr=False)
            if self.keep == "spread":
                d[key] = spread
            else:
                d[self.spread_key] = spread
        return d


class CaseProgress:
    """Engine handler: one log line per finished case, ``[k/N] <case>: <seconds> s`` (the time from asking for the
    case to its outputs written, or handed to a background writer), instead of a bar that counts iterations
    without naming them; under ``torchrun`` the line starts with ``rank r/W``."""

    def __init__(self, case_key: str = "case"):
        self.case_key = case_key
        self._start = 0.0

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.GET_BATCH_STARTED, self._started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def _started(self, engine: Engine) -> None:
        self._start = time.perf_counter()

    def cases(self, batch) -> list[str]:
        """The case ids of a batch: a collated dict (``{"case": [...]}``) or a list of decollated items."""
        items = batch if isinstance(batch, (list, tuple)) else [batch]
        names = []
        for item in items:
            value = item.get(self.case_key, "?") if isinstance(item, Mapping) else "?"
            names += [str(v) for v in value] if isinstance(value, (list, tuple)) else [str(value)]
        return names

    def __call__(self, engine: Engine) -> None:
        seconds = time.perf_counter() - self._start
        total = engine.state.epoch_length or "?"
        rank, world = process_shard()
        where = f"rank {rank}/{world} " if world > 1 else ""
        names = ", ".join(self.cases(engine.state.batch))
        logger.info(f"{where}[{engine.state.iteration}/{total}] {names}: {seconds:.1f} s")


class UnwrapTransformErrors:
    """Engine handler: re-raise the error a transform raised (e.g. :class:`LoadVolumed`'s message naming the file),
    not MONAI's ``RuntimeError("applying transform ...")`` wrappers around it. Other errors pass unchanged.

    Args:
        writers: :class:`scripts.runtime.throughput.BackgroundWriter` objects whose submitted writes are let
            finish (:meth:`~scripts.runtime.throughput.BackgroundWriter.wait`) before the error is raised, so that
            the cases done before the failure are on disk when the run stops.

    The error must reach the engine as itself: in the caller's thread, or from a
    :class:`scripts.runtime.throughput.Prefetcher` thread (a ``DataLoader`` worker process re-raises a copy
    without the chain, so ``num_workers`` stays 0).
    """

    def __init__(self, writers=()):
        self.writers = [w for w in (writers if isinstance(writers, (list, tuple)) else [writers]) if w is not None]

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EXCEPTION_RAISED, self)

    def __call__(self, engine: Engine, e: BaseException) -> None:
        for writer in self.writers:
            writer.wait()
        root = e
        while isinstance(root, RuntimeError) and str(root).startswith("applying transform") and root.__cause__:
            root = root.__cause__
        raise root.with_traceback(root.__traceback__) from root.__cause__
