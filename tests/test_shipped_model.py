"""Specification of the shipped generator, bundle/models/model.pt: it describes itself, fits the zoo's size limit,
and its synthesis of a fixed volume is pinned, so that a refactor that changes a result is caught.

The pinned output (``tests/data/shipped_synthesis.npz``) was made by ``inference.json`` (torch backend) from
``tests/data/pinned_t2.nii.gz`` (a phantom T2 on a coarse 80x80x24 grid). Regenerate both only when the shipped
model is retrained:

    python -m monai.bundle run inference --bundle_root bundle --config_file bundle/configs/inference.json \\
        --input tests/data/pinned_t2.nii.gz --output_dir /tmp/pinned --backend torch --precision fp32
    python -c "import numpy as np, nibabel as nib; np.savez_compressed('tests/data/shipped_synthesis.npz', \\
        **{t: np.asarray(nib.load(f'/tmp/pinned/pinned_{t}.nii.gz').dataobj, dtype=np.float32) \\
        for t in ('flair', 't1', 't1ce')})"
"""

from __future__ import annotations

import nibabel as nib
import numpy as np
from conftest import BUNDLE, REPO, run_workflow
from scripts.runtime.checkpoints import read_model
from scripts.runtime.networks import TARGETS

SHIPPED = BUNDLE / "models" / "model.pt"
PINNED_INPUT = REPO / "tests" / "data" / "pinned_t2.nii.gz"
PINNED_OUTPUT = REPO / "tests" / "data" / "shipped_synthesis.npz"


def test_shipped_model_describes_how_to_use_it():
    arch = read_model(str(SHIPPED), "generator")
    assert not arch["legacy"]
    assert arch["targets"] == list(TARGETS) and arch["in_channels"] == 3  # the recommended model, 2.5D input
    assert (arch["variant"], arch["features"], arch["upsample"]) == ("tcmgan", 16, "resize")
    assert arch["intensity_scaling"] in ("volume", "slice") and arch["image_size"] == 128


def test_shipped_model_fits_the_zoo_file_limit():
    assert SHIPPED.stat().st_size <= 25 * 1024 * 1024


def test_shipped_synthesis_of_the_pinned_volume_is_unchanged(tmp_path):
    run_workflow("inference.json", workflow_type="infer", input=str(PINNED_INPUT), output_dir=str(tmp_path),
                 backend="torch", precision="fp32")  # fmt: skip  (the pinned outputs are fp32's)
    expected = np.load(PINNED_OUTPUT)
    for target in TARGETS:
        got = nib.load(str(tmp_path / f"pinned_{target}.nii.gz"))
        assert np.allclose(got.affine, nib.load(str(PINNED_INPUT)).affine)
        assert np.abs(np.asarray(got.dataobj, dtype=np.float32) - expected[target]).max() <= 1e-5, target
