"""Specification of the bundle as the MONAI model zoo's CI checks it (bundle/configs/metadata.json, inference.json,
train.json), run the way the zoo CI runs them.

The command-line checks (``verify_metadata``, ``verify_net_in_out``, ``ckpt_export``) run as subprocesses in
the bundle folder with that folder on ``PYTHONPATH``; the workflow property checks run in this process through
``ConfigWorkflow`` as the zoo's unit tests do. The metadata schema is a byte-exact copy of the release file,
kept in tests/data so that no network (and no shared/ folder) is needed. No shipped model.pt is needed: a
features-4 generator checkpoint is made by the tests (``tcmgan_ckpt``).
"""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import BUNDLE, CONFIGS, REPO, save_nifti
from monai.bundle import ConfigWorkflow

from scripts.prepare_datalist import prepare_datalist
from scripts.runtime.networks import SynthesisNet, TumourSegmenter

META = CONFIGS / "metadata.json"
INFERENCE = CONFIGS / "inference.json"
TRAIN = CONFIGS / "train.json"
SCHEMA = REPO / "tests" / "data" / "meta_schema_20240725.json"
SCHEMA_MD5 = "06954cad2cc5d3784e72077ac76f0fc8"


def bundle_cli(*args: str) -> subprocess.CompletedProcess:
    """``python -m monai.bundle <args>`` in the bundle folder with it on PYTHONPATH (as the zoo CI runs it)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(BUNDLE), os.environ.get("PYTHONPATH")]))}
    command = [sys.executable, "-m", "monai.bundle", *args]
    result = subprocess.run(command, cwd=BUNDLE, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


# --- metadata -----------------------------------------------------------------------------------------------------


def test_schema_copy_is_the_release_file():
    assert hashlib.md5(SCHEMA.read_bytes()).hexdigest() == SCHEMA_MD5


def test_verify_metadata_passes(tmp_path):
    schema = tmp_path / "schema.json"  # verify_metadata downloads only when this file is absent
    shutil.copy(SCHEMA, schema)
    meta = str(META.relative_to(BUNDLE))
    result = bundle_cli("verify_metadata", "--meta_file", meta, "--filepath", str(schema), "--hash_val", SCHEMA_MD5)
    assert "metadata is verified with no error" in result.stdout + result.stderr


def test_metadata_version_is_in_the_changelog_and_pins_are_the_installed_versions():
    meta = json.loads(META.read_text())
    assert meta["version"] in meta["changelog"]
    assert meta["monai_version"] == version("monai")
    assert meta["pytorch_version"] == version("torch").split("+")[0]
    assert meta["numpy_version"] == version("numpy")
    assert {name: version(name) for name in meta["required_packages_version"]} == meta["required_packages_version"]


def test_metadata_describes_the_network_io():
    io = json.loads(META.read_text())["network_data_format"]
    image, pred = io["inputs"]["image"], io["outputs"]["pred"]
    # the shipped model's input: the T2 slice with its two neighbours (tests/test_shipped_model.py checks the file)
    assert (image["num_channels"], image["spatial_shape"], image["dtype"], image["value_range"]) == (
        3,
        [128, 128],
        "float32",
        [-1, 1],
    )
    assert (pred["num_channels"], pred["dtype"], pred["value_range"]) == (3, "float32", [-1, 1])
    assert pred["channel_def"] == {"0": "FLAIR", "1": "T1", "2": "T1ce"}


# --- network checks -----------------------------------------------------------------------------------------------


def test_verify_net_in_out_passes(recommended_ckpt):
    result = bundle_cli(
        "verify_net_in_out",
        "network_def",
        "--meta_file",
        "configs/metadata.json",
        "--config_file",
        "configs/inference.json",
        "--device",
        "cpu",
        "--ckpt_path",
        str(recommended_ckpt),
    )
    assert "data shape of network is verified with no error" in result.stdout + result.stderr


def test_ckpt_export_gives_torchscript_equal_to_the_eager_network(tmp_path, recommended_ckpt):
    exported = tmp_path / "model.ts"
    bundle_cli(
        "ckpt_export",
        "network_def",
        "--filepath",
        str(exported),
        "--ckpt_file",
        str(recommended_ckpt),
        "--meta_file",
        "configs/metadata.json",
        "--config_file",
        "configs/inference.json",
        "--ckpt_path",
        str(recommended_ckpt),  # network_def is built at the checkpoint's width
    )
    extra = {"metadata.json": ""}
    scripted = torch.jit.load(str(exported), _extra_files=extra)
    eager = SynthesisNet("tcmgan", features=4, in_channels=3, upsample="resize")
    eager.load_state_dict(torch.load(recommended_ckpt, weights_only=True))
    eager.eval()
    x = torch.rand(2, 3, 128, 128) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), eager(x))
    assert json.loads(extra["metadata.json"])["version"] == json.loads(META.read_text())["version"]


# --- workflow properties ------------------------------------------------------------------------------------------


def _fake_brats(root: Path, n: int = 4) -> Path:
    """n BraTS-2021-layout cases of 64x64x8 volumes and their datalist.json."""
    rng = np.random.default_rng(0)
    for i in range(n):
        case = f"BraTS2021_{i:05d}"
        for channel in ("flair", "t1", "t1ce", "t2"):
            volume = np.zeros((64, 64, 8), np.float32)
            volume[8:56, 8:56] = 20 + 100 * rng.random((48, 48, 8))
            save_nifti(root / case / f"{case}_{channel}.nii.gz", volume)
        seg = np.zeros((64, 64, 8), np.uint8)
        seg[20:30, 20:30, 2:6] = 2
        seg[22:26, 22:26, 3:5] = 4
        save_nifti(root / case / f"{case}_seg.nii.gz", seg)
    prepare_datalist(str(root), fractions=[0.5, 0.25, 0.25])
    return root


def test_inference_config_has_the_infer_properties(tmp_path, tcmgan_ckpt):
    workflow = ConfigWorkflow(
        config_file=str(INFERENCE),
        meta_file=str(META),
        workflow_type="infer",
        bundle_root=str(BUNDLE),
        dataset_dir=str(_fake_brats(tmp_path / "data")),
        ckpt_path=str(tcmgan_ckpt),
    )
    workflow.initialize()
    assert workflow.check_properties() == []


def test_train_config_has_the_train_properties(tmp_path):
    output_dir = tmp_path / "eval"
    (output_dir / "segmenter").mkdir(parents=True)
    torch.save(TumourSegmenter(features=4).state_dict(), output_dir / "segmenter" / "model.pt")
    workflow = ConfigWorkflow(
        config_file=str(TRAIN),
        meta_file=str(META),
        workflow_type="train",
        bundle_root=str(BUNDLE),
        dataset_dir=str(_fake_brats(tmp_path / "data")),
        output_dir=str(output_dir),
        features=4,
        min_brain_pixels=10,
        cache_num_workers=0,
        **{"train#trainer#max_epochs": 1},
    )
    workflow.initialize()
    assert workflow.check_properties() == []


@pytest.mark.parametrize("config", [INFERENCE, TRAIN], ids=["inference", "train"])
def test_config_reaches_bundle_code_only_through_target(config):
    """``monai.bundle run`` evaluates ``imports`` before the bundle folder is on sys.path, so ``$import scripts``
    fails there; bundle code must be named by ``_target_`` only."""
    content = config.read_text()
    assert not any("scripts" in item for item in json.loads(content)["imports"])
    assert "$scripts." not in content and "@scripts" not in content


def test_metadata_has_no_deprecated_key_and_requires_what_the_runtime_imports():
    """MONAI renames a deprecated key on load (``optional_packages_version`` would replace the required list), and
    every third-party package the runtime modules import is MONAI's own, required, or optional with a fallback."""
    import ast
    import sys

    from monai.bundle.utils import DEPRECATED_ID_MAPPING

    meta = json.loads(META.read_text())
    assert not set(meta) & set(DEPRECATED_ID_MAPPING)
    imported = set()
    for path in (BUNDLE / "scripts" / "runtime").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                imported.add(node.module.split(".")[0])
    third_party = imported - set(sys.stdlib_module_names) - {"__future__"}
    distribution = {"ignite": "pytorch-ignite"}
    base = {"monai", "torch", "numpy"}  # monai_version, pytorch_version, numpy_version
    optional = {"onnx", "onnxruntime"}  # backend "auto" falls back to torch without them
    needed = {distribution.get(m, m) for m in third_party - base - optional}
    assert needed <= set(meta["required_packages_version"]), needed - set(meta["required_packages_version"])
