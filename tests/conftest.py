"""Shared fixtures: a small phantom data set made once per test session, and an in-process bundle runner."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundle"
CONFIGS = BUNDLE / "configs"
if str(BUNDLE) not in sys.path:
    sys.path.insert(0, str(BUNDLE))

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


@pytest.fixture(scope="session")
def phantom_dir(tmp_path_factory) -> Path:
    """Six small BraTS-2021-layout phantom cases with a datalist (2 gan / 2 seg / 2 test)."""
    from scripts.phantom import generate
    from scripts.prepare_datalist import prepare_datalist

    root = tmp_path_factory.mktemp("phantom")
    generate(str(root), num_cases=6, seed=0, layout="brats2021", shape=SMALL_SHAPE)
    prepare_datalist(str(root), seed=0)
    return root


def config_stack(config: str | list[str]) -> list[str]:
    """The config files of a workflow: ``train.json`` or ``inference.json`` alone, an overlay name on
    ``train.json`` (the model zoo's list form), or an explicit list."""
    if isinstance(config, str):
        config = [config] if config in ("train.json", "inference.json") else ["train.json", config]
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


@pytest.fixture(scope="session")
def generator_ckpt(tmp_path_factory) -> Path:
    """A tiny untrained MGAN generator (features 4) saved as train.json's ModelSaver does (a state dict with its
    'arch' buffer)."""
    import torch
    from scripts.runtime.networks import SynthesisNet

    path = tmp_path_factory.mktemp("generator") / "model.pt"
    torch.manual_seed(0)
    torch.save(SynthesisNet("mgan", features=4).state_dict(), path)
    return path


@pytest.fixture(scope="session")
def segmenter_run(phantom_dir, tmp_path_factory) -> Path:
    """Output folder holding a segmenter pre-trained by train_segmenter.json (tiny)."""
    out = tmp_path_factory.mktemp("runs")
    run_workflow("train_segmenter.json", dataset_dir=str(phantom_dir), output_dir=str(out), **TINY)
    assert (out / "segmenter" / "model.pt").is_file()
    return out


os.environ.setdefault("OMP_NUM_THREADS", "2")
