"""brainsynth: one command for the bundle's everyday jobs, a thin front-end to its MONAI bundle workflows.

    python bundle/scripts/brainsynth.py synthesise INPUT --output_dir O [--targets t1ce] [--device cpu]
        [--threads 4] [--ckpt_path P] [--overwrite true] [--precision fp32]
    python bundle/scripts/brainsynth.py train --dataset_dir D --output_dir O [--variant tcmgan|...|recommended]
    python bundle/scripts/brainsynth.py train --dataset_dir D --output_dir O --segmenter true
    python bundle/scripts/brainsynth.py evaluate --dataset_dir D --ckpt_path P --output_dir O
    python bundle/scripts/brainsynth.py phantom --output_dir D --num_cases N [--domain shifted]
    python bundle/scripts/brainsynth.py [COMMAND] --help

``INPUT`` of ``synthesise`` is a T2 volume (a file or a DICOM series folder), a folder of cases (its
``datalist.json`` when it has one, else every T2 file found in it: names ending in ``_t2``, ``-t2w``, ``_T2w`` ...),
a text file listing T2 volumes (one path per line, relative to the file; ``#`` starts a comment) or a datalist
JSON (``--split``). Each command runs the same workflow as the ``python -m monai.bundle run ...`` form (docs in
``bundle/docs/``); options are checked before any work and an error ends in one line (``--verbose true``: the
traceback).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the bundle folder importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from scripts.runtime.command_line import VERBOSE_ENV, flag, run_tool  # noqa: E402
from scripts.runtime.files import _EXTENSIONS, case_id, volume_stem  # noqa: E402

BUNDLE = Path(__file__).resolve().parents[1]
CONFIGS = BUNDLE / "configs"


def _workflow(files: list[str], verbose: bool = False, **overrides) -> None:
    """Run the bundle workflow made of ``files`` (config names in ``bundle/configs``) with ``overrides``, in this
    process, as ``python -m monai.bundle run`` does; options given as ``None`` keep the workflow's default."""
    import logging

    from monai.bundle import ConfigWorkflow

    if flag(verbose):
        os.environ[VERBOSE_ENV] = "1"
    else:  # MONAI's start-up lines (workflow type, logging file) are for the verbose
        logging.getLogger("monai.bundle.workflows").setLevel(logging.WARNING)
    workflow = ConfigWorkflow(
        config_file=[str(CONFIGS / f) for f in files],
        meta_file=str(CONFIGS / "metadata.json"),
        logging_file=str(CONFIGS / "logging.conf"),
        workflow_type=None,
        bundle_root=str(BUNDLE),
        **{k: v for k, v in overrides.items() if v is not None},
    )
    workflow.initialize()
    workflow.run()
    workflow.finalize()


def _is_volume(path: Path) -> bool:
    return path.is_file() and any(path.name.lower().endswith(ext) for ext in _EXTENSIONS if ext != ".gz")


def find_t2_volumes(folder) -> list[str]:
    """Every T2 volume under ``folder`` (recursively): a volume file whose name ends in a T2 tag (``_t2``,
    ``-t2w``, ``.T2w`` ..., any case) before its extension. Sorted."""
    found = []
    for path in sorted(Path(folder).rglob("*")):
        if _is_volume(path) and case_id(str(path)) != volume_stem(path.name):
            found.append(str(path))
    return found


def read_list(path) -> list[str]:
    """The volumes a text file lists: one per line, relative paths from the file's folder, ``#`` comments.

    Raises:
        FileNotFoundError: a listed volume does not exist (the message names it and the line).
        ValueError: the file lists nothing.
    """
    path = Path(path)
    volumes = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        entry = line.split("#", 1)[0].strip()
        if not entry:
            continue
        volume = (path.parent / entry) if not os.path.isabs(entry) else Path(entry)
        if not volume.exists():
            raise FileNotFoundError(f"{path}, line {number}: {entry}: no such file or folder")
        volumes.append(str(volume.resolve()))
    if not volumes:
        raise ValueError(f"{path} lists no volume (one path per line)")
    return volumes


def _write_datalist(volumes: list[str], folder: str) -> str:
    """A datalist JSON in ``folder`` whose ``test`` split lists ``volumes`` (one 3D T2 file each: its one channel)."""
    path = os.path.join(folder, "datalist.json")
    with open(path, "w") as f:
        json.dump({"channels": ["t2"], "test": [{"case": case_id(v), "image": v} for v in volumes]}, f)
    return path


def inputs_of(input, scratch: str) -> dict:
    """The ``inference.json`` overrides for a ``synthesise`` input (see the module doc); a list or a folder of T2
    files becomes a datalist written in ``scratch``.

    Raises:
        FileNotFoundError: the input does not exist.
        ValueError: a folder holds no T2 volume and is no DICOM series.
    """
    path = Path(str(input))
    if not path.exists():
        raise FileNotFoundError(f"{input}: no such file or folder (the T2 input of synthesise)")
    if path.is_file() and path.suffix.lower() == ".json":
        return {"datalist": str(path.resolve())}
    if path.is_file() and path.suffix.lower() == ".txt":
        return {"datalist": _write_datalist(read_list(path), scratch), "datalist_split": "test"}
    if path.is_dir():
        if (path / "datalist.json").is_file():
            return {"datalist": str((path / "datalist.json").resolve())}
        volumes = find_t2_volumes(path)
        if volumes:
            return {"datalist": _write_datalist(volumes, scratch), "datalist_split": "test"}
        if not any(p.is_file() for p in path.iterdir()):
            raise ValueError(f"{input}: no T2 volume in this folder (names ending in _t2, -t2w, _T2w ...) and no "
                             "DICOM series")  # fmt: skip
    return {"input": str(path.resolve())}  # one volume: a file, or a DICOM series folder


def synthesise(input, output_dir: str = "synthesis", targets=None, device=None, threads: int | None = None,
               ckpt_path=None, overwrite: bool = False, split: str = "test", check_contrast: bool = True,
               precision: str = "auto", views: str = "axial", flip: bool = False, uncertainty: bool = False,
               verbose: bool = False) -> None:
    """Synthesise FLAIR, T1 and T1ce (or ``targets``) from T2 volumes: ``inference.json``.

    Args:
        input: a T2 volume, a folder of cases, a text file listing T2 volumes, or a datalist JSON (module doc).
        output_dir: where ``<case>_<target>.nii.gz`` go, on each input's grid.
        targets: which targets to write, e.g. ``t1ce`` or ``flair,t1`` (default all three).
        device: ``cpu`` or ``cuda:0`` (default: the GPU when there is one).
        threads: CPU threads for the network (default: torch's).
        ckpt_path: generator weights (default the shipped ``bundle/models/model.pt``).
        overwrite: synthesise cases whose outputs exist again (default: keep them, one line each).
        split: the split of a datalist input.
        check_contrast: refuse a volume that does not look like a T2 (a T1, T1ce or FLAIR given by mistake);
            on by default, ``--check_contrast false`` to synthesise from it anyway.
        precision: ``auto`` (bf16 on a CPU that computes it natively, else fp32), ``fp32`` or ``bf16``
            (docs/performance.md).
        views: slice orientations run and averaged: ``axial`` (the paper), ``all`` (axial, coronal and sagittal:
            tri-planar synthesis, docs/inference.md), or a comma-separated list.
        flip: also run each view on the left-right mirrored volume and average (test-time augmentation).
        uncertainty: also write ``<case>_<target>_uncertainty.nii.gz``, the spread of those passes (needs
            several: ``--views all`` or ``--flip true``).
        verbose: full tracebacks.
    """
    from scripts.runtime.precision import PRECISIONS
    from scripts.runtime.views import parse_views

    parse_views(views)  # an unknown view is named before any work

    if precision not in PRECISIONS:
        raise ValueError(f"--precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
    if threads is not None:
        import torch

        if int(threads) < 1:
            raise ValueError(f"--threads must be >= 1, got {threads}")
        torch.set_num_threads(int(threads))
    if not flag(verbose):  # the engine's start and end lines; the per-case progress lines stay
        import logging

        logging.getLogger("ignite").setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="brainsynth_") as scratch:
        sources = inputs_of(input, scratch)
        if "datalist" in sources and "datalist_split" not in sources:
            sources["datalist_split"] = split
        _workflow(["inference.json"], verbose, output_dir=str(output_dir), targets=targets, device=device,
                  ckpt_path=ckpt_path, overwrite=flag(overwrite), check_contrast=flag(check_contrast),
                  precision=precision, views=views, flip=flag(flip), uncertainty=flag(uncertainty),
                  **sources)  # fmt: skip


def train(dataset_dir, output_dir, variant: str = "tcmgan", segmenter: bool = False, features=None,
          batch_size=None, max_epochs=None, device=None, resume: bool = False, overwrite: bool = False,
          verbose: bool = False) -> None:
    """Train a generator (``train.json``; ``--variant recommended``: with ``recommended.json``) or, with
    ``--segmenter true``, pre-train the tumour segmenter TC-MGAN needs (``train_segmenter.json``).

    Args:
        dataset_dir: folder with ``datalist.json`` (``prepare_datalist.py``).
        output_dir: run folder (``<output_dir>/<variant or recommended or segmenter>/model.pt``).
        variant: ``pix2pix``, ``mgan``, ``tcmgan``, ``tcmgan_bw``, ``recommended`` or ``anymissing`` (any available
            modalities -> the missing ones, ``docs/anymissing.md``).
        segmenter: pre-train S instead of a generator.
        features, batch_size, max_epochs, device: as the workflow's ids (default: the config's).
        resume, overwrite: continue the run in ``output_dir``, or replace it.
        verbose: full tracebacks.
    """
    from scripts.runtime.conventions import GENERATORS

    if variant not in (*GENERATORS, "recommended"):
        raise ValueError(f"--variant {variant!r}: expected one of {', '.join((*GENERATORS, 'recommended'))}")
    files = ["train.json"]
    overrides = {}
    if flag(segmenter):
        files.append("train_segmenter.json")
    elif variant == "recommended":
        files.append("recommended.json")
    else:
        overrides["variant"] = variant
    _workflow(files, verbose, dataset_dir=str(dataset_dir), output_dir=str(output_dir), features=features,
              batch_size=batch_size, max_epochs=max_epochs, device=device, resume=flag(resume),
              overwrite=flag(overwrite), **overrides)  # fmt: skip


def evaluate(dataset_dir, output_dir, ckpt_path=None, split: str = "test", device=None, verbose: bool = False) -> None:
    """Table 1 with the quality protocol (``evaluate.json``): the generator ``ckpt_path`` (default the shipped one)
    and the T2 / inverted-T2 baselines on the ``split`` of ``dataset_dir/datalist.json``; tables in ``output_dir``."""
    _workflow(["train.json", "evaluate.json"], verbose, dataset_dir=str(dataset_dir), output_dir=str(output_dir),
              ckpt_path=ckpt_path, split=split, device=device)  # fmt: skip


def phantom(output_dir, num_cases: int = 10, seed: int = 0, layout: str = "brats2021", domain: str = "randomised",
            overwrite: bool = False) -> list[str]:
    """BraTS-like phantom cases and their datalist (``phantom.py`` then ``prepare_datalist.py``); see
    ``bundle/docs/phantom.md``. ``domain``: ``randomised`` (default), ``fixed`` or ``shifted``."""
    from scripts.phantom import generate
    from scripts.prepare_datalist import prepare_datalist

    ids = generate(output_dir, num_cases=num_cases, seed=seed, layout=layout, overwrite=flag(overwrite), domain=domain)
    prepare_datalist(str(output_dir), seed=seed)
    return ids


COMMANDS = {"synthesise": synthesise, "train": train, "evaluate": evaluate, "phantom": phantom}

if __name__ == "__main__":
    if len(sys.argv) == 1 or sys.argv[1] in ("--help", "-h"):
        print(__doc__.strip())
        sys.exit(0)
    run_tool(COMMANDS)
