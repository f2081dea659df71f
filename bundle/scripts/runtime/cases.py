"""The cases of a synthesis run: what is read and what is written, before anything is loaded.

One case model for every generator: a case names the modality files it has and the ones it wants. A paper
generator's case is ``{"image": T2 path, "case": id}`` (its targets: FLAIR, T1, T1ce, or ``--targets``); an
any-missing generator's case is ``{"case", "modalities": {modality: path}, "available", "missing",
"output_names"}`` (:func:`any_missing_case`).

- :func:`inference_cases`: the cases of ``inference.json`` (one ``--input``, per-modality ``--flair/--t1/--t1ce/--t2``,
  or a datalist split), every file checked to exist before anything runs; finished cases left out; under
  ``torchrun``, this process's share.
- :func:`any_missing_case`, :func:`any_missing_cases`, :func:`output_names`, :func:`scenario_mask`: the any-missing
  cases and their output names (BraSyn's for BraTS 2023 inputs).
- :func:`parse_targets`, :func:`output_paths`, :func:`case_output_paths`: the files a case's outputs go to.
- :func:`output_bytes`: an upper estimate of the disk space the outputs need (checked before the work).

This module sits below loading, running and writing (``inference``) and the any-missing task (``anymissing``): it
imports neither.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping

import nibabel as nib
import numpy as np
import torch

from .conventions import ANYMISSING, CHANNELS, FILE_SUFFIXES, SOURCE, TARGETS
from .data import load_split, read_datalist
from .files import case_id, volume_stem
from .throughput import process_shard, shard

logger = logging.getLogger(__name__)

def scenario_mask(available, device=None) -> torch.Tensor:
    """``(4,)`` bool availability of the modality names ``available`` (:data:`CHANNELS` order)."""
    unknown = [m for m in available if m not in CHANNELS]
    if unknown:
        raise ValueError(f"unknown modalities {unknown}; expected some of {CHANNELS}")
    return torch.tensor([c in available for c in CHANNELS], dtype=torch.bool, device=device)


def _t2_index(datalist: str, channels) -> int:
    """Index of T2 in the datalist's channel order (``"channels"`` key; absent: the last channel)."""
    if channels is None:
        return -1
    lowered = [str(c).lower() for c in channels]
    if SOURCE not in lowered:
        raise ValueError(f"{datalist}: its channels {list(channels)} have no {SOURCE!r}")
    return lowered.index(SOURCE)


def inference_cases(
    input: str = "",
    datalist: str = "",
    split: str = "test",
    output_dir: str = "",
    output_ext: str = ".nii.gz",
    overwrite: bool = True,
    targets=None,
    flair: str = "",
    t1: str = "",
    t1ce: str = "",
    t2: str = "",
    variant: str = "",
    ckpt_path: str = "",
) -> list[dict]:
    """The cases to synthesise, each ``{"image": T2 path, "case": case id}`` (plus ``"t2_channel"`` for a 4D
    multi-channel file of a datalist).

    Under ``torchrun`` (``WORLD_SIZE`` > 1), each process takes every ``WORLD_SIZE``-th case from its ``RANK`` on,
    so that each case is synthesised and written by exactly one process.

    With ``overwrite=False``, a case whose outputs ``output_dir/<case>_<target><output_ext>`` all exist (an
    earlier run wrote them; they are written all or none) is left out, with one log line saying so: a killed batch
    resumes by running the same command again.

    Args:
        input: one T2 volume (a file, or a DICOM series folder). When given, ``datalist`` is ignored.
        datalist: a JSON written by ``prepare_datalist.py``: entries ``{"case", "image", "label"}`` where
            ``image`` is a list of files in the datalist's ``"channels"`` order (FLAIR, T1, T1ce, T2) or one
            4D file holding those channels (MSD); paths are relative to the JSON's folder.
        split: the datalist key to read (``gan``, ``seg`` or ``test``).
        output_dir, output_ext: where the outputs go (as :class:`SaveTargetsd`).
        overwrite: synthesise every case again, replacing earlier outputs.
        targets: the targets written (:func:`parse_targets`; default all); a case counts as done when those exist.
        flair, t1, t1ce, t2: per-modality input files, for an any-missing model (``variant="anymissing"``; the cases
            then come from :func:`any_missing_cases`, ``--input`` counting as the T2);
            a paper model takes ``t2`` as ``input``.
        variant: the checkpoint's variant; ckpt_path: its file (named in the error when a paper generator is given
            per-modality inputs).

    Raises:
        FileNotFoundError: the input, the datalist or a listed T2 file does not exist (the message names it).
        ValueError: the split is missing or empty, an entry has no T2, or two cases share an id.
    """
    if input and t2 and os.path.abspath(input) != os.path.abspath(t2):
        raise ValueError(f"--input {input} and --t2 {t2}: two T2 volumes for one case; give one of them")
    if variant == ANYMISSING or flair or t1 or t1ce:
        if variant != ANYMISSING:
            held = f"{ckpt_path} holds a {variant!r} generator" if os.path.isfile(ckpt_path) else (
                f"there is no checkpoint at {ckpt_path}")  # fmt: skip
            raise ValueError(f"--flair, --t1 and --t1ce need an any-missing model (train.json --variant anymissing) as "
                             f"--ckpt_path; {held}, and a paper generator synthesises from a T2 alone (--input)")
        if targets not in (None, "", []):
            raise ValueError(f"--targets {targets}: an any-missing model writes each case's missing modalities; "
                             "--targets chooses among a paper generator's three")
        files = {"flair": flair, "t1": t1, "t1ce": t1ce, "t2": t2 or input}
        cases = any_missing_cases(files, "" if any(files.values()) else datalist, split)
        return _still_to_do(_shared(cases), output_dir, output_ext, overwrite, targets)
    input = input or t2
    if input:
        if not os.path.exists(input):
            raise FileNotFoundError(f"{input}: no such file or folder (the --input T2 volume)")
        cases = _shared([{"image": os.path.abspath(input), "case": case_id(input)}])
        return _still_to_do(cases, output_dir, output_ext, overwrite, targets)
    if not datalist:
        raise ValueError("nothing to do: give --input <T2 volume>, --datalist <json> or --dataset_dir <folder>")
    entries = load_split(datalist, split)  # raises with a how-to message when the datalist is missing
    content = read_datalist(datalist)
    channels = content.get("channels")
    t2 = _t2_index(datalist, channels)
    cases = []
    # case ids come from the raw JSON: load_split turns any value naming an existing path (a case folder) into
    # an absolute path
    for i, (raw, entry) in enumerate(zip(content[split], entries)):
        name = str(raw["case"]) if isinstance(raw, Mapping) and "case" in raw else None
        where = f"{datalist}: case {name or f'#{i}'} in {split!r}"
        image, item = entry.get("image"), {}
        if isinstance(image, (list, tuple)) and image:
            if channels is not None and len(image) != len(channels):
                raise ValueError(f"{where} lists {len(image)} image files; expected {list(channels)}")
            image = image[t2]
        elif isinstance(image, str) and image:
            item["t2_channel"] = t2  # one file: a 4D multi-channel volume (MSD), or a 3D T2
        if not image or not isinstance(image, str):
            raise ValueError(f"{where} has no T2 image (its 'image' is {entry.get('image')!r})")
        if not os.path.exists(image):
            raise FileNotFoundError(f"{image}: no such file (the T2 of {where})")
        item.update(image=image, case=name or case_id(image))
        cases.append(item)
    ids = [c["case"] for c in cases]
    duplicates = sorted({c for c in ids if ids.count(c) > 1})
    if duplicates:
        raise ValueError(f"{datalist}: case ids appear more than once in {split!r}: {duplicates}")
    return _still_to_do(_shared(cases), output_dir, output_ext, overwrite, targets)


def _shared(cases: list[dict]) -> list[dict]:
    """This process's share of ``cases`` under ``torchrun`` (:func:`scripts.runtime.throughput.shard`, taken before
    the finished cases are left out, so that every rank of a resumed run agrees), with one line saying which."""
    rank, world = process_shard()
    if world == 1:
        return cases
    mine = shard(cases, rank, world)
    logger.info(f"rank {rank} of {world}: {len(mine)} of the {len(cases)} cases ({', '.join(c['case'] for c in mine)})")
    return mine


def parse_targets(targets) -> tuple[str, ...]:
    """The targets to write, from ``--targets``: a list/tuple of names or one comma-separated string
    (``"t1ce"``, ``"flair,t1"``), case-insensitive, in :data:`TARGETS` order; ``None`` or empty: all.

    Raises:
        ValueError: an unknown name (the message lists the valid ones).
    """
    if targets is None or targets == "" or targets == []:
        return tuple(TARGETS)
    names = targets.split(",") if isinstance(targets, str) else list(targets)
    names = [str(n).strip().lower() for n in names if str(n).strip()]
    unknown = [n for n in names if n not in TARGETS]
    if unknown or not names:
        given = ",".join(str(n) for n in (targets.split(",") if isinstance(targets, str) else targets))
        raise ValueError(f"--targets {given}: unknown target(s) {unknown}; choose from {', '.join(TARGETS)}")
    return tuple(t for t in TARGETS if t in names)


def output_paths(output_dir: str, case: str, output_ext: str = ".nii.gz", targets=TARGETS) -> list[str]:
    """The files inference writes for ``case``: ``output_dir/<case>_<target><output_ext>``, one per target."""
    return [os.path.join(output_dir, f"{case}_{target}{output_ext}") for target in targets]


def case_output_paths(output_dir: str, case: str, output_ext: str = ".nii.gz", targets=TARGETS,
                      names: str | None = None) -> list[str]:
    """The files inference writes for one case: ``names`` (an any-missing case's ``output_names``, comma-separated
    file stems) when given, else :func:`output_paths` of ``case`` and ``targets``."""
    if names:
        return [os.path.join(output_dir, name + output_ext) for name in str(names).split(",")]
    return output_paths(output_dir, case, output_ext, targets)


def _still_to_do(cases: list[dict], output_dir: str, output_ext: str, overwrite: bool, targets=None) -> list[dict]:
    """``cases`` without those whose outputs all exist in ``output_dir`` (unless ``overwrite``), one line each."""
    if overwrite or not output_dir:
        return cases
    todo = []
    for case in cases:
        finals = case_output_paths(output_dir, case["case"], output_ext, parse_targets(targets),
                                   case.get("output_names"))
        if all(os.path.isfile(f) for f in finals):
            logger.info(f"{case['case']}: kept the outputs of an earlier run in {output_dir} (--overwrite true "
                        "synthesises it again)")  # fmt: skip
        else:
            todo.append(case)
    if len(todo) < len(cases):
        logger.info(f"{len(cases) - len(todo)} of {len(cases)} cases already done; synthesising {len(todo)}")
    return todo


# --- any-missing cases: whatever modalities a case has -> the missing ones ------------------------------------

#: A trailing modality tag in a file name (``_t1``, ``-t1c``, ``_FLAIR``, ``-t2w`` ...), dropped from the case id.
_MODALITY_TAG = re.compile(r"[_\-.](t1ce|t1gd|t1c|t1n|t1w?|t2f|t2w?|flair)$", re.IGNORECASE)
#: BraTS 2023 (BraSyn) file names: ``BraTS-GLI-xxxxx-000-{t1n,t1c,t2w,t2f}.nii.gz``.
_BRATS2023 = re.compile(r"-(t1n|t1c|t2w|t2f)$")


def output_names(case: str, modalities, brats2023: bool = False) -> list[str]:
    """File stems of the synthesised ``modalities`` of ``case``: ``<case>_<modality>`` as the paper's inference
    names them, or BraSyn's ``<case>-<t1n|t1c|t2w|t2f>`` when the inputs have BraTS 2023 names."""
    if brats2023:
        return [case + FILE_SUFFIXES["brats2023"][m] for m in modalities]
    return [f"{case}_{m}" for m in modalities]


def any_missing_case(files: Mapping[str, str | None], where: str = "", case: str | None = None) -> dict | None:
    """One case of the any-missing inference from its available files (``{modality: path or None}``).

    Returns ``{"case", "modalities": {modality: path}, "available": (4,) bool, "missing": "t1,t1ce",
    "output_names": "<stems>"}``, or None (with a log line) when all four modalities are present: nothing to
    synthesise.

    Raises:
        ValueError: no modality given (the message names ``where``), or an unknown modality name.
        FileNotFoundError: a given file does not exist.
    """
    unknown = [m for m in files if m not in CHANNELS]
    if unknown:
        raise ValueError(f"{where}: unknown modalities {unknown}; expected some of {CHANNELS}")
    present = {m: str(p) for m, p in files.items() if p}
    if not present:
        raise ValueError(f"{where or 'the inputs'}: no modality given; the any-missing model needs at least one of "
                         f"{', '.join('--' + m for m in CHANNELS)}")  # fmt: skip
    for m, path in present.items():
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path}: no such file (the {m} of {where or 'the inputs'})")
    ordered = [m for m in CHANNELS if m in present]
    name = case or case_id(present[SOURCE] if SOURCE in present else present[ordered[0]], _MODALITY_TAG)
    missing = [m for m in CHANNELS if m not in present]
    if not missing:
        logger.info(f"{name}: all four modalities are present; nothing to synthesise (left out)")
        return None
    stems = [volume_stem(os.path.basename(os.path.normpath(present[m]))) for m in ordered]
    brats2023 = all(_BRATS2023.search(s) for s in stems)
    return {
        "case": name,
        "modalities": {m: present[m] for m in ordered},
        "available": scenario_mask(ordered),
        "missing": ",".join(missing),
        "output_names": ",".join(output_names(name, missing, brats2023)),
    }


def any_missing_cases(files: Mapping[str, str | None], datalist: str = "", split: str = "test") -> list[dict]:
    """The cases of an any-missing inference run: the per-modality inputs (``--flair``, ``--t1``, ``--t1ce``,
    ``--t2``) as one case when any is given, else every entry of a datalist split. In a datalist (as
    ``prepare_datalist.py`` writes it) a missing modality is ``null`` (or ``""``) in the entry's ``image`` list
    (:data:`CHANNELS` order); a case with all four is reported and left out; one with none is an error."""
    if any(files.values()):
        case = any_missing_case(files, "the command-line inputs")
        return [case] if case else []
    if not datalist:
        raise ValueError("nothing to do: give --flair, --t1, --t1ce and/or --t2, a --datalist or a --dataset_dir")
    content = read_datalist(datalist)
    channels = [str(c).lower() for c in content.get("channels", CHANNELS)]
    if sorted(channels) != sorted(CHANNELS):
        raise ValueError(f"{datalist}: its channels {channels} are not the four modalities {CHANNELS}")
    base = os.path.dirname(os.path.abspath(datalist))
    entries = content.get(split)
    if not entries:
        raise ValueError(f"{datalist} has no cases in split {split!r}")
    cases = []
    for i, entry in enumerate(entries):
        name = str(entry.get("case", "")) or None
        name = os.path.basename(os.path.normpath(name)) if name else None
        where = f"{datalist}: case {name or f'#{i}'} in {split!r}"
        image = entry.get("image")
        if not isinstance(image, (list, tuple)) or len(image) != len(channels):
            raise ValueError(f"{where}: 'image' must list {len(channels)} files ({channels}; null for a missing one)")
        files = {c: (os.path.join(base, p) if p else None) for c, p in zip(channels, image)}
        case = any_missing_case(files, where, name)
        if case:
            cases.append(case)
    ids = [c["case"] for c in cases]
    duplicates = sorted({c for c in ids if ids.count(c) > 1})
    if duplicates:
        raise ValueError(f"{datalist}: case ids appear more than once in {split!r}: {duplicates}")
    return cases


def output_bytes(cases: list[dict], output_ext: str = ".nii.gz", targets=None, uncertainty: bool = False) -> int:
    """An upper estimate of the bytes the outputs of ``cases`` take: float32 volumes on each input's grid (the
    shape from the file's header; a DICOM folder or another format counts at BraTS size, 240 x 240 x 155), one per
    target or missing modality (two with ``uncertainty``: its map beside it); ``.nii.gz`` counted at half the raw
    size (gzip level 1 on the masked volumes writes about a third)."""
    per_target = len(parse_targets(targets))
    total = 0
    for case in cases:
        path = case.get("image") or next(iter(case.get("modalities", {}).values()), "")
        try:
            shape = nib.load(str(path)).header.get_data_shape()[:3]
        except Exception:  # not NIfTI/Analyze (DICOM, NRRD, MHA...): its loader checks it later
            shape = (240, 240, 155)
        count = len(str(case["missing"]).split(",")) if "missing" in case else per_target
        total += int(np.prod(shape)) * 4 * count * (2 if uncertainty else 1)
    return total // 2 if output_ext == ".nii.gz" else total

