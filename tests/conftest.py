"""Shared test fixtures and helpers, defined once for every test file.

Fixtures: a small phantom data set made once per session (``phantom_dir``), tiny untrained generators of width 4
(``generator_ckpt``: MGAN, ``tcmgan_ckpt``: TC-MGAN), a pre-trained tiny segmenter (``segmenter_run``).

Helpers (``from conftest import ...``): an in-process bundle runner (:func:`run_workflow`,
:func:`train_workflow`), checkpoint and NIfTI writers (:func:`save_generator`, :func:`save_nifti`,
:func:`brain`, :func:`truncated`), and what the tests read back (:func:`files_in`, :func:`root_cause`,
:func:`error_chain`).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundle"
CONFIGS = BUNDLE / "configs"
TOOLS = REPO / "tools"  # the maintainers' tools (benchmark, reproduce, figures, tables), outside the bundle
if str(BUNDLE) not in sys.path:
    sys.path.insert(0, str(BUNDLE))
if str(TOOLS) not in sys.path:
    sys.path.append(str(TOOLS))

# small volumes keep the suite fast; the brain filter threshold is scaled with the slice area
SMALL_SHAPE = (96, 96, 40)
SMALL_MIN_PIXELS = 400
#: overrides that make any training config tiny
TINY = {
    "features": 4,
    "batch_size": 8,
    "max_epochs": 1,
    "epoch_length": 2,
    "min_brain_pixels": SMALL_MIN_PIXELS,
    "val_num_cases": 1,
    "cache_num_workers": 0,
}


# --- running the bundle ------------------------------------------------------------------------------------------


def overlay_bases(overlay: str) -> list[str]:
    """The configs an overlay stacks on, as its guard (``command_line.require_base`` in ``+initialize``) names them:
    ``["train.json"]`` for most, ``["train.json", "train_segmenter.json"]`` for ``train_downstream.json``."""
    import json

    guard = [x for x in json.loads((CONFIGS / overlay).read_text())["+initialize"] if isinstance(x, dict)]
    base = guard[0]["base"]
    return [base] if isinstance(base, str) else list(base)


def config_stack(config: str | list[str]) -> list[str]:
    """The config files of a workflow: ``train.json`` or ``inference.json`` alone, an overlay name on the configs
    its guard names (the model zoo's list form, :func:`overlay_bases`), or an explicit list."""
    if isinstance(config, str):
        config = [config] if config in ("train.json", "inference.json") else [*overlay_bases(config), config]
    return [str(CONFIGS / c) for c in config]


def run_workflow(config: str | list[str], workflow_type: str = "train", run: bool = True, **override):
    """Build a ``ConfigWorkflow`` like ``python -m monai.bundle run`` does (``config`` as in :func:`config_stack`),
    initialise it and optionally run it."""
    from monai.bundle import ConfigWorkflow

    files = config_stack(config)
    wf = ConfigWorkflow(
        config_file=files,
        meta_file=str(CONFIGS / "metadata.json") if (CONFIGS / "metadata.json").exists() else None,
        logging_file=str(CONFIGS / "logging.conf"),
        workflow_type=workflow_type,
        **{"bundle_root": str(BUNDLE), **override},
    )
    wf.initialize()
    if run:
        wf.run()
        wf.finalize()
    return wf


def train_workflow(dataset_dir, output_dir, variant: str = "mgan", run: bool = False, **extra):
    """``train.json`` made tiny (:data:`TINY`, then ``extra``) on ``dataset_dir``, initialised and optionally run."""
    return run_workflow("train.json", run=run, dataset_dir=str(dataset_dir), output_dir=str(output_dir),
                        variant=variant, **{**TINY, **extra})  # fmt: skip


# --- files the tests write ---------------------------------------------------------------------------------------


def save_generator(path, variant: str = "tcmgan", features: int = 4, seed: int | None = 0, **settings) -> Path:
    """An untrained generator saved as training writes ``model.pt`` (``SynthesisNet.state_dict()``, with its
    ``arch`` buffer and self-description); ``settings``: other ``SynthesisNet`` arguments (``in_channels``, ...)."""
    import torch
    from scripts.runtime.networks import SynthesisNet

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if seed is not None:
        torch.manual_seed(seed)
    torch.save(SynthesisNet(variant, features=features, **settings).state_dict(), path)
    return path


def save_nifti(path, array: np.ndarray, affine=None) -> Path:
    """``array`` as a NIfTI file at ``path`` (identity affine unless given); its folder is created."""
    import nibabel as nib

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, np.eye(4) if affine is None else affine), str(path))
    return path


def brain(shape, seed: int = 0, empty_top: bool = True) -> np.ndarray:
    """T2-like float32 volume: a textured ellipsoid of positive values in a zero background, with one octant
    cut away (so that any flip or axis swap shows) and no brain on the first two axial slices (and, with
    ``empty_top``, the last two)."""
    rng = np.random.default_rng(seed)
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    inside = (x / 0.85) ** 2 + (y / 0.8) ** 2 + (z / 0.9) ** 2 < 1
    inside &= ~((x > 0.3) & (y > 0.3))
    vol = np.where(inside, 300 + 200 * x + 100 * y**2 + 50 * rng.random(shape), 0).astype(np.float32)
    vol[..., :2] = 0
    if empty_top:
        vol[..., -2:] = 0
    return vol


def truncated(src, dst=None) -> Path:
    """The first half of the file ``src`` written to ``dst`` (default: ``src`` itself), as a cut-off copy leaves it."""
    src = Path(src)
    dst = src if dst is None else Path(dst)
    content = src.read_bytes()
    dst.write_bytes(content[: len(content) // 2])
    return dst


# --- reading back ------------------------------------------------------------------------------------------------


def files_in(folder) -> list[str]:
    """Every entry of ``folder``, sorted, hidden temporary files included ([] when the folder does not exist)."""
    return sorted(os.listdir(folder)) if os.path.exists(folder) else []


def root_cause(error: BaseException) -> BaseException:
    """The innermost exception (following ``__cause__``) under MONAI's config, transform and engine wrappers."""
    while error.__cause__ is not None:
        error = error.__cause__
    return error


def error_chain(error: BaseException | None, context: bool = True) -> Iterator[BaseException]:
    """``error`` and every exception under it: its ``__cause__``, or (with ``context``) its ``__context__``."""
    while error is not None:
        yield error
        error = error.__cause__ or (error.__context__ if context else None)


# --- session fixtures --------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def phantom_dir(tmp_path_factory) -> Path:
    """Six small BraTS-2021-layout phantom cases with a datalist (2 gan / 2 seg / 2 test)."""
    from scripts.phantom import generate
    from scripts.prepare_datalist import prepare_datalist

    root = tmp_path_factory.mktemp("phantom")
    generate(str(root), num_cases=6, seed=0, layout="brats2021", shape=SMALL_SHAPE)
    prepare_datalist(str(root), seed=0)
    return root


@pytest.fixture(scope="session")
def generator_ckpt(tmp_path_factory) -> Path:
    """A tiny untrained MGAN generator (features 4) saved as train.json's ModelSaver does (a state dict with its
    'arch' buffer)."""
    return save_generator(tmp_path_factory.mktemp("generator") / "model.pt", "mgan")


@pytest.fixture(scope="session")
def tcmgan_ckpt(tmp_path_factory) -> Path:
    """A tiny untrained TC-MGAN generator (features 4, seed 0), a plain state dict as training writes model.pt."""
    return save_generator(tmp_path_factory.mktemp("tcmgan") / "model.pt", "tcmgan")


@pytest.fixture(scope="session")
def recommended_ckpt(tmp_path_factory) -> Path:
    """A tiny untrained generator shaped like the recommended model, which is also the shipped one (metadata.json
    describes its input): TC-MGAN, 3 T2 slices in, resize-convolution upsampling."""
    return save_generator(tmp_path_factory.mktemp("recommended") / "model.pt", "tcmgan", in_channels=3,
                          upsample="resize")  # fmt: skip


@pytest.fixture(scope="session")
def segmenter_run(phantom_dir, tmp_path_factory) -> Path:
    """Output folder holding a segmenter pre-trained by train_segmenter.json (tiny)."""
    out = tmp_path_factory.mktemp("runs")
    run_workflow("train_segmenter.json", dataset_dir=str(phantom_dir), output_dir=str(out), **TINY)
    assert (out / "segmenter" / "model.pt").is_file()
    return out


os.environ.setdefault("OMP_NUM_THREADS", "2")
