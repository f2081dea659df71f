"""The cases of a synthesis run: what is read and what is written, before anything is loaded.

One case model for every generator: a case names the modality files it has and the modalities it wants,
``{"case", "modalities": {modality: path}, "available", "missing", "output_names"}`` (:func:`synthesis_case`). A
paper generator's case is its T2 -> the targets (FLAIR, T1, T1ce, or ``--targets``); an any-missing generator's,
whatever modalities it has -> the others. What a generator reads and writes it declares itself (its ``inputs`` and
``outputs``), and the cases ask it.

- :func:`inference_cases`: the cases of ``inference.json`` (one ``--input``, per-modality ``--flair/--t1/--t1ce/--t2``,
  or a datalist split, :func:`datalist_cases`), every file checked to exist before anything runs; finished cases
  left out; under ``torchrun``, this process's share.
- :func:`synthesis_case`, :func:`output_names`, :func:`scenario_mask`: one case, its output names (BraSyn's for
  BraTS 2023 inputs) and its availability mask.
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

from .conventions import CHANNELS, FILE_SUFFIXES, SOURCE, TARGETS
from .data import read_datalist
from .files import case_id, volume_stem
from .throughput import process_shard, shard

logger = logging.getLogger(__name__)


def scenario_mask(available, device=None) -> torch.Tensor:
    """``(4,)`` bool availability of the modality names ``available`` (:data:`CHANNELS` order)."""
    unknown = [m for m in available if m not in CHANNELS]
    if unknown:
        raise ValueError(f"unknown modalities {unknown}; expected some of {CHANNELS}")
    return torch.tensor([c in available for c in CHANNELS], dtype=torch.bool, device=device)


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
    inputs=(SOURCE,),
    outputs=TARGETS,
    ckpt_path: str = "",
) -> list[dict]:
    """The cases to synthesise, each as :func:`synthesis_case` makes it: the modality files it has (those the
    generator reads) and the modalities it wants (those the generator writes that it lacks, or ``targets``).

    A paper generator reads the T2 (``inputs`` ``("t2",)``) and writes FLAIR, T1, T1ce; the any-missing generator
    reads and writes all four. The cases come from the per-modality files (``--input`` counting as the T2) when
    any is given, else from every entry of a datalist split.

    Under ``torchrun`` (``WORLD_SIZE`` > 1), each process takes every ``WORLD_SIZE``-th case from its ``RANK`` on,
    so that each case is synthesised and written by exactly one process.

    With ``overwrite=False``, a case whose outputs all exist in ``output_dir`` (an earlier run wrote them; they are
    written all or none) is left out, with one log line saying so: a killed batch resumes by running the same
    command again.

    Args:
        input: one T2 volume (a file, or a DICOM series folder); the same as ``t2``.
        datalist: a JSON written by ``prepare_datalist.py``: entries ``{"case", "image", "label"}`` where
            ``image`` lists files in the datalist's ``"channels"`` order (default FLAIR, T1, T1ce, T2; ``null`` for
            a missing one) or is one 4D file holding those channels (MSD); paths are relative to the JSON's folder.
            Used when no per-modality file is given.
        split: the datalist key to read (``gan``, ``seg`` or ``test``).
        output_dir, output_ext: where the outputs go (as :class:`SaveTargetsd`).
        overwrite: synthesise every case again, replacing earlier outputs.
        targets: the modalities written, among the generator's ``outputs`` (:func:`parse_targets`; default all
            that a case lacks); a case counts as done when those exist.
        flair, t1, t1ce, t2: per-modality input files (only those the generator reads).
        inputs, outputs: the modalities the generator reads and writes (its ``inputs`` and ``outputs``).
        ckpt_path: the generator's file (named in the error when it cannot read a given modality).

    Raises:
        FileNotFoundError: the input, the datalist or a listed file does not exist (the message names it).
        ValueError: a given modality the generator does not read, the split is missing or empty, an entry has
            none of the modalities the generator reads, or two cases share an id.
    """
    if input and t2 and os.path.abspath(input) != os.path.abspath(t2):
        raise ValueError(f"--input {input} and --t2 {t2}: two T2 volumes for one case; give one of them")
    inputs, outputs = tuple(inputs), tuple(outputs)
    files = {"flair": flair, "t1": t1, "t1ce": t1ce, "t2": t2 or input}
    unread = [m for m in CHANNELS if files[m] and m not in inputs]
    if unread:
        raise ValueError(
            f"{', '.join('--' + m for m in unread)}: the generator in {ckpt_path or 'the checkpoint'} reads "
            f"{', '.join(inputs)} alone; per-modality inputs besides the T2 need an any-missing model "
            "(train.json --variant anymissing) as --ckpt_path"
        )
    wanted = parse_targets(targets, outputs)
    if any(files.values()):
        case = synthesis_case(files, wanted, "the command-line inputs")
        cases = [case] if case else []
    elif datalist:
        cases = datalist_cases(datalist, split, inputs, wanted)
    else:
        raise ValueError("nothing to do: give --input <T2 volume> (an any-missing model: any of --flair, --t1, --t1ce, "
                         "--t2), --datalist <json> or --dataset_dir <folder>")  # fmt: skip
    return _still_to_do(_shared(cases), output_dir, output_ext, overwrite)


def _shared(cases: list[dict]) -> list[dict]:
    """This process's share of ``cases`` under ``torchrun`` (:func:`scripts.runtime.throughput.shard`, taken before
    the finished cases are left out, so that every rank of a resumed run agrees), with one line saying which."""
    rank, world = process_shard()
    if world == 1:
        return cases
    mine = shard(cases, rank, world)
    logger.info(f"rank {rank} of {world}: {len(mine)} of the {len(cases)} cases ({', '.join(c['case'] for c in mine)})")
    return mine


def parse_targets(targets, choices=TARGETS) -> tuple[str, ...]:
    """The modalities to write, from ``--targets``: a list/tuple of names or one comma-separated string
    (``"t1ce"``, ``"flair,t1"``), case-insensitive, in ``choices`` order (a generator's ``outputs``; default the
    paper's :data:`TARGETS`); ``None`` or empty: all of ``choices``.

    Raises:
        ValueError: a name not in ``choices`` (the message lists them).
    """
    choices = tuple(choices)
    if targets is None or targets == "" or targets == []:
        return choices
    names = targets.split(",") if isinstance(targets, str) else list(targets)
    names = [str(n).strip().lower() for n in names if str(n).strip()]
    unknown = [n for n in names if n not in choices]
    if unknown or not names:
        given = ",".join(str(n) for n in (targets.split(",") if isinstance(targets, str) else targets))
        raise ValueError(f"--targets {given}: unknown target(s) {unknown}; choose from {', '.join(choices)}")
    return tuple(t for t in choices if t in names)


def output_paths(output_dir: str, case: str, output_ext: str = ".nii.gz", targets=TARGETS) -> list[str]:
    """The files inference writes for ``case``: ``output_dir/<case>_<target><output_ext>``, one per target."""
    return [os.path.join(output_dir, f"{case}_{target}{output_ext}") for target in targets]


def case_output_paths(output_dir: str, case: str, output_ext: str = ".nii.gz", targets=TARGETS,
                      names: str | None = None) -> list[str]:
    """The files inference writes for one case: ``names`` (its ``output_names``, comma-separated file stems) when
    given, else :func:`output_paths` of ``case`` and ``targets``."""
    if names:
        return [os.path.join(output_dir, name + output_ext) for name in str(names).split(",")]
    return output_paths(output_dir, case, output_ext, targets)


def _still_to_do(cases: list[dict], output_dir: str, output_ext: str, overwrite: bool) -> list[dict]:
    """``cases`` without those whose outputs all exist in ``output_dir`` (unless ``overwrite``), one line each."""
    if overwrite or not output_dir:
        return cases
    todo = []
    for case in cases:
        finals = case_output_paths(output_dir, case["case"], output_ext, names=case["output_names"])
        if all(os.path.isfile(f) for f in finals):
            logger.info(f"{case['case']}: kept the outputs of an earlier run in {output_dir} (--overwrite true "
                        "synthesises it again)")  # fmt: skip
        else:
            todo.append(case)
    if len(todo) < len(cases):
        logger.info(f"{len(cases) - len(todo)} of {len(cases)} cases already done; synthesising {len(todo)}")
    return todo


# --- a case: the modalities it has -> the ones it wants ---------------------------------------------------------

#: Display names of the modalities, in messages.
_NAMES = {"flair": "FLAIR", "t1": "T1", "t1ce": "T1ce", "t2": "T2"}
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


def synthesis_case(files: Mapping[str, str | None], wanted=TARGETS, where: str = "", case: str | None = None,
                   channels: Mapping[str, int] | None = None) -> dict | None:
    """One case from its files (``{modality: path or None}``) and the modalities wanted of it (``wanted``, in
    :data:`CHANNELS` order; those it has are left out).

    Returns ``{"case", "modalities": {modality: path}, "available": (4,) bool, "missing": "t1,t1ce",
    "output_names": "<stems>"}`` (plus ``"channels"``: ``{modality: index}`` of a 4D multi-channel file), or None
    (with a log line) when it has every wanted modality: nothing to synthesise. The case id is ``case`` or the
    name of its T2 file (else of its first file) without the modality tag; the outputs are ``<case>_<modality>``,
    or BraSyn's ``<case>-<t1n|t1c|t2w|t2f>`` when the inputs have BraTS 2023 names.

    Raises:
        ValueError: no modality given (the message names ``where``), or an unknown modality name.
        FileNotFoundError: a given file does not exist.
    """
    unknown = [m for m in files if m not in CHANNELS]
    if unknown:
        raise ValueError(f"{where}: unknown modalities {unknown}; expected some of {CHANNELS}")
    present = {m: os.path.abspath(str(p)) for m, p in files.items() if p}
    if not present:
        raise ValueError(f"{where or 'the inputs'}: no modality given; give at least one of "
                         f"{', '.join('--' + m for m in CHANNELS)}")  # fmt: skip
    for m, path in present.items():
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path}: no such file or folder (the {m} of {where or 'the inputs'})")
    ordered = [m for m in CHANNELS if m in present]
    if case:
        name = case
    elif SOURCE in present:
        name = case_id(present[SOURCE])
    else:
        name = case_id(present[ordered[0]], _MODALITY_TAG)
    missing = [m for m in CHANNELS if m in wanted and m not in present]
    if not missing:
        logger.info(f"{name}: has every modality asked for ({', '.join(wanted)}); nothing to synthesise (left out)")
        return None
    stems = [volume_stem(os.path.basename(os.path.normpath(present[m]))) for m in ordered]
    brats2023 = all(_BRATS2023.search(s) for s in stems)
    out = {
        "case": name,
        "modalities": {m: present[m] for m in ordered},
        "available": scenario_mask(ordered),
        "missing": ",".join(missing),
        "output_names": ",".join(output_names(name, missing, brats2023)),
    }
    if channels:
        out["channels"] = {m: int(channels[m]) for m in ordered if m in channels}
    return out


def datalist_cases(datalist: str, split: str = "test", inputs=CHANNELS, wanted=TARGETS) -> list[dict]:
    """The cases of a datalist split (as ``prepare_datalist.py`` writes it): each entry's files of the modalities
    in ``inputs`` (a missing one is ``null`` or ``""`` in the entry's ``image`` list, in the datalist's
    ``"channels"`` order, default :data:`CHANNELS`; one 4D file holds them all, MSD), made into a case by
    :func:`synthesis_case`; an entry with every wanted modality is reported and left out.

    Raises:
        FileNotFoundError: no datalist, or a listed file does not exist.
        ValueError: the split is missing or empty, the channels are not modality names, an entry's ``image`` is
            not one file or one per channel, it has none of ``inputs``, or two cases share an id.
    """
    content = read_datalist(datalist)
    entries = content.get(split)
    if not entries:
        splits = [k for k, v in content.items() if isinstance(v, list) and v and isinstance(v[0], dict)]
        raise ValueError(f"{datalist} has no cases in split {split!r} (splits present: {splits})")
    channels = [str(c).lower() for c in content.get("channels") or CHANNELS]
    if any(c not in CHANNELS for c in channels):
        raise ValueError(f"{datalist}: its channels {channels} are not modalities of {CHANNELS}")
    base = os.path.dirname(os.path.abspath(datalist))
    cases = []
    for i, entry in enumerate(entries):
        name = str(entry.get("case", "")) if isinstance(entry, Mapping) else ""
        name = os.path.basename(os.path.normpath(name)) if name else None
        where = f"{datalist}: case {name or f'#{i}'} in {split!r}"
        image = entry.get("image") if isinstance(entry, Mapping) else None
        files, index = {}, None
        if isinstance(image, str) and image:  # one file: a 4D multi-channel volume (MSD), or a 3D T2
            files = {c: os.path.join(base, image) for c in channels}
            index = {c: k for k, c in enumerate(channels)}
        elif isinstance(image, (list, tuple)) and len(image) == len(channels):
            files = {c: (os.path.join(base, p) if p else None) for c, p in zip(channels, image)}
        elif isinstance(image, (list, tuple)) and image:
            raise ValueError(f"{where} lists {len(image)} image files; expected {channels} (null for a missing one)")
        files = {m: p for m, p in files.items() if m in inputs}
        if not any(files.values()):
            wanted = " or ".join(_NAMES[m] for m in inputs)
            raise ValueError(f"{where} has no {wanted} image (its 'image' is {image!r})")
        case = synthesis_case(files, wanted, where, name, index)
        if case:
            cases.append(case)
    ids = [c["case"] for c in cases]
    duplicates = sorted({c for c in ids if ids.count(c) > 1})
    if duplicates:
        raise ValueError(f"{datalist}: case ids appear more than once in {split!r}: {duplicates}")
    return cases


def output_bytes(cases: list[dict], output_ext: str = ".nii.gz", uncertainty: bool = False) -> int:
    """An upper estimate of the bytes the outputs of ``cases`` take: float32 volumes on each input's grid (the
    shape from the header of the case's first file; a DICOM folder or another format counts at BraTS size,
    240 x 240 x 155), one per wanted modality (two with ``uncertainty``: its map beside it); ``.nii.gz`` counted at
    half the raw size (gzip level 1 on the masked volumes writes about a third)."""
    total = 0
    for case in cases:
        path = next(iter(case["modalities"].values()))
        try:
            shape = nib.load(str(path)).header.get_data_shape()[:3]
        except Exception:  # not NIfTI/Analyze (DICOM, NRRD, MHA...): its loader checks it later
            shape = (240, 240, 155)
        count = len(str(case["missing"]).split(","))
        total += int(np.prod(shape)) * 4 * count * (2 if uncertainty else 1)
    return total // 2 if output_ext == ".nii.gz" else total

