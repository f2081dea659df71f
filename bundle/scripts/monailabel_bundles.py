"""MONAI Label bundles: one per synthesised target (FLAIR, T1, T1ce), made from this bundle.

    python bundle/scripts/monailabel_bundles.py --output_dir monailabel_models

MONAI Label (``monaibundle`` app, ``BundleInferTask``) builds ``network_def`` from ``configs/inference.json``,
loads ``models/model.pt`` into it (``strict=False``), runs the config's ``preprocessing``, calls
``inferer(image[None], network)`` with no other argument, runs ``postprocessing`` (less ``SaveImaged``), and
writes the result as a label: a multi-channel result becomes a segmentation, and the 3D Slicer and OHIF
clients ask for ``uint8``. So each bundle written here synthesises *one* target as *one* channel scaled to
[0, 255] on the input's voxel grid:

- ``configs/inference.json``: ``configs/inference.json`` of this bundle overlaid with
  ``configs/monailabel.json`` (``network_def`` = :class:`SingleTargetSynthesisNet` for ``target``;
  ``postprocessing`` = ``Invertd`` back to the input grid, [-1, 1] -> [0, 255], 0 outside the brain, rounded
  to whole grey levels so that the ``uint8`` cast is exact), without the batch-inference items (data list,
  evaluator, writer) that MONAI Label does not use;
- ``configs/metadata.json``: this bundle's, with a one-channel ``pred`` named after the target;
- with ``--uncertainty true`` (and ``--views all`` or ``--flip true``: several passes to disagree), a second bundle
  per target, ``<prefix>_<target>_uncertainty``, returning the synthesis's uncertainty map the same way (the spread
  of the passes, [0, 0.25] of the intensity range -> [0, 255]): MONAI Label shows one result per task, so the
  map is a task of its own;
- ``models/model.pt``, ``scripts/runtime/`` (the only code the configs import), ``LICENSE``, ``docs/``,
  ``configs/logging.conf`` copied. No training config is copied: MONAI Label's training task expects image/label
  pairs, not synthesis.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import sys

if __package__ in (None, ""):  # run as a script: make the bundle folder importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from monai.bundle import ConfigParser  # noqa: E402

from scripts.runtime.checkpoints import read_model  # noqa: E402
from scripts.runtime.command_line import flag  # noqa: E402
from scripts.runtime.conventions import TARGET_NAMES, TARGETS  # noqa: E402  (TARGET_NAMES: channel_def, bundle names)
from scripts.runtime.files import write_atomic, write_json  # noqa: E402
from scripts.runtime.views import parse_views  # noqa: E402

BUNDLE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: Items of configs/inference.json for batch inference from a data list, which MONAI Label does not use (the yes/no
#: options stay: the ``flags`` section reads them all).
BATCH_ITEMS = (
    "input",
    "dataset_dir",
    "datalist",
    "datalist_split",
    "output_dir",
    "output_check",
    "space_check",
    "num_workers",
    "prefetch",
    "dataset",
    "dataloader",
    "prefetcher",
    "writer",
    "handlers",
    "evaluator",
    "initialize",
    "run",
    "inference",
    "finalize",
)
#: Intensity range of the synthesised image MONAI Label receives.
VALUE_RANGE = (0, 255)


def target_config(target: str, bundle_dir: str = BUNDLE_DIR, views="axial", flip: bool = False,
                  uncertainty: bool = False) -> dict:  # fmt: skip
    """The ``configs/inference.json`` of the MONAI Label bundle of ``target`` (see the module docstring): its
    synthesis, or with ``uncertainty`` its uncertainty map (the spread over the passes of ``views`` and ``flip``)."""
    configs = os.path.join(bundle_dir, "configs")
    files = [os.path.join(configs, "inference.json"), os.path.join(configs, "monailabel.json")]
    config = ConfigParser.load_config_files(files)
    for key in BATCH_ITEMS:
        config.pop(key, None)
    config.update(target=target, views=",".join(parse_views(views)), flip=bool(flip), uncertainty=bool(uncertainty))
    config["output"] = "uncertainty" if uncertainty else "synthesis"
    return config


def target_metadata(target: str, bundle_dir: str = BUNDLE_DIR, uncertainty: bool = False) -> dict:
    """This bundle's metadata with a one-channel output named after ``target`` (or its uncertainty map)."""
    with open(os.path.join(bundle_dir, "configs", "metadata.json")) as f:
        meta = json.load(f)
    name = TARGET_NAMES[target] + (" uncertainty" if uncertainty else "")
    meta["name"] = f"brainsynth {name} (MONAI Label)"
    meta["task"] = f"Brain MR image synthesis: T2 -> {name}"
    meta["description"] = (
        f"TC-MGAN synthesis of {TARGET_NAMES[target]} from a T2 volume, slice by slice on 128x128 RAS slices, "
        f"returned on the input's voxel grid as one channel in [{VALUE_RANGE[0]}, {VALUE_RANGE[1]}] (0 outside "
        "the brain). Research only, not for clinical use."
    )
    if uncertainty:
        meta["description"] += (
            f" This bundle returns the synthesis's uncertainty map instead: each voxel's spread over the fused "
            f"passes, {VALUE_RANGE[1]} = a spread of 0.25 of the intensity range or more."
        )
    pred = copy.deepcopy(meta["network_data_format"]["outputs"]["pred"])
    pred.update(num_channels=1, channel_def={"0": name}, modality=f"MR {name}")
    meta["network_data_format"]["outputs"] = {"pred": pred}
    meta["pred_classes"] = (
        f"one channel: synthetic {name} slices in [-1, 1] (-1 = background); MONAI Label receives the volume "
        f"scaled to [{VALUE_RANGE[0]}, {VALUE_RANGE[1]}]"
    )
    return meta


def export(
    output_dir: str,
    ckpt_path: str | None = None,
    targets: str | tuple | list = TARGETS,
    bundle_dir: str = BUNDLE_DIR,
    prefix: str = "brainsynth",
    views="axial",
    flip: bool = False,
    uncertainty: bool = False,
) -> list[str]:
    """Write one MONAI-Label-ready bundle per target to ``output_dir/<prefix>_<target>`` (and, with
    ``uncertainty``, one returning its uncertainty map to ``output_dir/<prefix>_<target>_uncertainty``).

    Args:
        output_dir: folder to write the bundles to (created if needed); an existing bundle of the same name is
            replaced. Point MONAI Label's ``--conf models`` at these names after linking or copying them into the
            app's ``model/`` folder (docs/monailabel.md).
        ckpt_path: generator weights (any ``model.pt`` written by training; default: ``models/model.pt``).
        targets: targets to export, e.g. ``flair,t1`` (default: all three).
        bundle_dir: the brainsynth bundle to copy.
        prefix: bundle folder names start with it.
        views: the slice orientations synthesised (``inference.json``'s ``views``: ``axial``, or ``all`` for a
            generator trained on the three).
        flip: also run the mirrored volume (``inference.json``'s ``flip``).
        uncertainty: also write the uncertainty bundles (MONAI Label's second output per target; needs more than
            one pass: ``views`` other than ``axial`` alone, or ``flip``).

    Returns:
        the paths of the written bundles.

    Raises:
        FileNotFoundError: no checkpoint at ``ckpt_path``.
        ValueError: the checkpoint is not a generator of this bundle, an unknown target or view is asked for, or
            an uncertainty map of a single pass (always 0).
    """
    ckpt_path = ckpt_path or os.path.join(bundle_dir, "models", "model.pt")
    arch = read_model(ckpt_path, "generator")  # raises with a clear message for a missing or foreign file
    targets = [t.strip().lower() for t in targets.split(",")] if isinstance(targets, str) else list(targets)
    unknown = [t for t in targets if t not in TARGETS]
    if unknown:
        raise ValueError(f"unknown targets {unknown}; expected some of {TARGETS}")
    flip, views = flag(flip, "flip"), parse_views(views)  # a bad value fails here, before any folder is touched
    if flag(uncertainty, "uncertainty") and views == ("axial",) and not flip:
        raise ValueError("an uncertainty map needs several passes: give --views all or --flip true")
    kinds = [(t, False) for t in targets] + ([(t, True) for t in targets] if flag(uncertainty) else [])
    written = []
    for target, spread in kinds:
        dest = os.path.join(output_dir, f"{prefix}_{target}" + ("_uncertainty" if spread else ""))
        if os.path.isdir(dest):
            shutil.rmtree(dest)
        os.makedirs(os.path.join(dest, "configs"))
        os.makedirs(os.path.join(dest, "models"))
        write_atomic(os.path.join(dest, "models", "model.pt"), lambda tmp: shutil.copyfile(ckpt_path, tmp))
        # the runtime only: the configs import nothing else, and the command-line tools stay with this bundle
        skip_cache = shutil.ignore_patterns("__pycache__")
        runtime = os.path.join(dest, "scripts", "runtime")
        shutil.copytree(os.path.join(bundle_dir, "scripts", "runtime"), runtime, ignore=skip_cache)
        shutil.copy(os.path.join(bundle_dir, "scripts", "__init__.py"), os.path.join(dest, "scripts"))
        shutil.copytree(os.path.join(bundle_dir, "docs"), os.path.join(dest, "docs"))
        shutil.copy(os.path.join(bundle_dir, "LICENSE"), dest)
        shutil.copy(os.path.join(bundle_dir, "configs", "logging.conf"), os.path.join(dest, "configs"))
        for name, content in (
            ("inference.json", target_config(target, bundle_dir, views, flip, spread)),
            ("metadata.json", target_metadata(target, bundle_dir, spread)),
        ):
            write_json(os.path.join(dest, "configs", name), content, newline=True, indent=4)
        what = f"{TARGET_NAMES[target]}{' uncertainty' if spread else ''}"
        print(f"{dest}: {what} from T2 ({arch['variant']}, features {arch['features']})")
        written.append(dest)
    return written


def main(output_dir: str, ckpt_path: str | None = None, targets: str = ",".join(TARGETS), bundle_dir: str = BUNDLE_DIR,
         views: str = "axial", flip: bool = False, uncertainty: bool = False):  # fmt: skip
    """Command line: :func:`export` (prints one line per bundle written)."""
    export(output_dir, ckpt_path, targets, bundle_dir, views=views, flip=flip, uncertainty=uncertainty)


if __name__ == "__main__":
    from scripts.runtime.command_line import run_tool

    run_tool(main)
