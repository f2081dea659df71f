"""Build the brainsynth datalist (``datalist.json``) from a BraTS or MSD brain-tumour folder.

Run as a script::

    python bundle/scripts/prepare_datalist.py --data_dir /data/brats2018 \
        [--output /data/brats2018/datalist.json] [--seed 0] [--fractions "[0.35,0.35,0.30]"]

or import it as ``scripts.prepare_datalist`` (with ``bundle/`` on ``sys.path``).

Four folder layouts are recognised, exactly as the data sets are downloaded:

* ``brats2018``: ``D/HGG/<case>/<case>_{flair,t1,t1ce,t2,seg}.nii.gz`` and ``D/LGG/...``
* ``brats2021``: ``D/<case>/<case>_{flair,t1,t1ce,t2,seg}.nii.gz``
* ``brats2023``: ``D/<case>/<case>-{t2f,t1n,t1c,t2w,seg}.nii.gz``
* ``msd``: ``D/imagesTr/<name>.nii.gz`` (4D: FLAIR, T1w, T1gd, T2w) and ``D/labelsTr/<name>.nii.gz``

(``.nii`` is accepted wherever ``.nii.gz`` is.) The output is a decathlon-style JSON whose
``gan``, ``seg`` and ``test`` lists hold ``{"case", "image", "label"}`` items with paths relative
to ``D``, so ``monai.data.load_decathlon_datalist(path, data_list_key="gan", base_dir=D)``
resolves them. ``image`` is always in channel order FLAIR, T1, T1ce, T2.

The module stays light (stdlib, numpy, and nibabel for MSD header checks): of the bundle it imports only
the conventions (channel order, file names and label values of each layout) and the atomic file writer, both
plain Python.
"""

from __future__ import annotations

import ast
import json
import math
import os
import re
import sys
from collections.abc import Sequence

import numpy as np

if __package__ in (None, ""):  # run as a script: make the bundle folder importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# the channel order of every "image" entry, and each layout's file names and label values
from scripts.runtime.command_line import flag  # noqa: E402
from scripts.runtime.conventions import CHANNELS, FILE_SUFFIXES, LAYOUT_LABELS, MSD_MODALITIES  # noqa: E402
from scripts.runtime.files import write_json  # noqa: E402

# Split names, in the order the fractions refer to them:
# gan = GAN + segmenter training, seg = downstream-segmentation training, test = held out.
SPLITS = ("gan", "seg", "test")

# The paper's 100 / 100 / 85 split of the 285 BraTS 2018 training cases.
DEFAULT_FRACTIONS = (0.35, 0.35, 0.30)

# One line per layout (scripts.runtime.conventions.LAYOUTS), used in the "no layout matched" error.
LAYOUT_PATTERNS = {
    "brats2018": "D/HGG/<case>/<case>_{flair,t1,t1ce,t2,seg}.nii.gz and/or D/LGG/<case>/...",
    "brats2021": "D/<case>/<case>_{flair,t1,t1ce,t2,seg}.nii.gz",
    "brats2023": "D/<case>/<case>-{t2f,t1n,t1c,t2w,seg}.nii.gz",
    "msd": "D/imagesTr/<name>.nii.gz (4D: FLAIR, T1w, T1gd, T2w) with D/labelsTr/<name>.nii.gz",
}

# How a case folder's files end in the two per-case-folder layouts; used only to tell them apart.
_BRATS2021_FILE, _BRATS2023_FILE = (
    re.compile("(" + "|".join(re.escape(e) for e in FILE_SUFFIXES[layout].values()) + r")\.nii(\.gz)?$")
    for layout in ("brats2021", "brats2023")
)

# At most this many missing files are listed in one error message.
_MAX_LISTED = 20


def _is_nifti(name: str) -> bool:
    return name.endswith(".nii.gz") or name.endswith(".nii")


def _visible_subdirs(folder: str) -> list[str]:
    """Names of the sub-folders of ``folder`` that do not start with '.', sorted."""
    return sorted(
        name for name in os.listdir(folder)
        if not name.startswith(".") and os.path.isdir(os.path.join(folder, name))
    )


def _nifti_files(folder: str) -> list[str]:
    """Names of the NIfTI files directly in ``folder`` (hidden ones such as '._x.nii.gz' skipped)."""
    return sorted(
        name for name in os.listdir(folder)
        if _is_nifti(name) and not name.startswith(".") and os.path.isfile(os.path.join(folder, name))
    )


def _check_data_dir(data_dir: str) -> None:
    if not os.path.exists(data_dir):
        raise FileNotFoundError(f"data_dir {data_dir!r} does not exist.")
    if not os.path.isdir(data_dir):
        raise NotADirectoryError(f"data_dir {data_dir!r} is not a folder.")


def detect_layout(data_dir: str) -> str:
    """Tell which of the known layouts ``data_dir`` is in.

    Args:
        data_dir: the data set root ``D``.

    Returns:
        One of ``"brats2018"``, ``"brats2021"``, ``"brats2023"``, ``"msd"`` (the keys of ``LAYOUT_PATTERNS``).
        The checks run in that priority: ``D/imagesTr`` means msd, ``D/HGG`` or ``D/LGG`` means
        brats2018, otherwise the file names inside the case folders ``D/<case>/`` decide.

    Raises:
        FileNotFoundError / NotADirectoryError: ``data_dir`` is missing or is not a folder.
        ValueError: no layout matches (the message names the folder and lists the expected
            layouts), or the case folders mix BraTS 2021 and BraTS 2023 file names.
    """
    data_dir = str(data_dir)
    _check_data_dir(data_dir)
    if os.path.isdir(os.path.join(data_dir, "imagesTr")):
        return "msd"
    if any(os.path.isdir(os.path.join(data_dir, grade)) for grade in ("HGG", "LGG")):
        return "brats2018"

    # Per-case-folder layouts: sort the sub-folders by the naming style of their NIfTI files.
    style_2021, style_2023 = [], []
    for case in _visible_subdirs(data_dir):
        names = _nifti_files(os.path.join(data_dir, case))
        if any(_BRATS2023_FILE.search(n) for n in names):
            style_2023.append(case)
        elif any(_BRATS2021_FILE.search(n) for n in names):
            style_2021.append(case)
    if style_2021 and style_2023:
        raise ValueError(
            f"{data_dir} mixes BraTS 2021 case folders (e.g. {style_2021[0]}, '<case>_flair.nii.gz') "
            f"and BraTS 2023 case folders (e.g. {style_2023[0]}, '<case>-t2f.nii.gz'); "
            "keep one data set per folder."
        )
    if style_2023:
        return "brats2023"
    if style_2021:
        return "brats2021"

    expected = "\n".join(f"  {name}: {pattern}" for name, pattern in LAYOUT_PATTERNS.items())
    raise ValueError(f"{data_dir} matches no known data layout. Expected one of:\n{expected}")


def _find_file(folder: str, stem: str) -> str | None:
    """``folder/stem.nii.gz`` or else ``folder/stem.nii`` if one exists, else None."""
    for ext in (".nii.gz", ".nii"):
        path = os.path.join(folder, stem + ext)
        if os.path.isfile(path):
            return path
    return None


def _relative(path: str, data_dir: str) -> str:
    """``path`` relative to ``data_dir`` with '/' separators (as stored in the JSON)."""
    return os.path.relpath(path, data_dir).replace(os.sep, "/")


def _brats_cases(data_dir: str, layout: str, allow_missing: bool = False) -> tuple[list[dict], list[str]]:
    """Case items of a BraTS layout, plus one line per missing file (with ``allow_missing``, a missing modality or
    label is ``None`` in the item instead, and only a case without any modality is reported)."""
    suffixes = FILE_SUFFIXES[layout]
    if layout == "brats2018":
        # Case folders live one level down, under HGG and/or LGG.
        groups = [g for g in ("HGG", "LGG") if os.path.isdir(os.path.join(data_dir, g))]
        folders = [
            os.path.join(data_dir, g, case) for g in groups for case in _visible_subdirs(os.path.join(data_dir, g))
        ]
    else:
        # Only sub-folders holding NIfTI files are cases; others (e.g. notes, __MACOSX) are skipped.
        folders = [
            os.path.join(data_dir, case) for case in _visible_subdirs(data_dir)
            if _nifti_files(os.path.join(data_dir, case))
        ]

    cases, missing = [], []
    for folder in folders:
        case = os.path.basename(folder)
        found = {}
        for key, suffix in suffixes.items():
            path = _find_file(folder, case + suffix)
            if path is None:
                expected = os.path.join(folder, case + suffix + ".nii.gz")
                missing.append(f"case {case}: missing {key} file {expected} (or .nii)")
            else:
                found[key] = _relative(path, data_dir)
        if len(found) == len(suffixes):
            cases.append({"case": case, "image": [found[c] for c in CHANNELS], "label": found["seg"]})
        elif allow_missing and any(c in found for c in CHANNELS):
            cases.append({"case": case, "image": [found.get(c) for c in CHANNELS], "label": found.get("seg")})
    if allow_missing:
        listed = {c["case"] for c in cases}
        missing = [line for line in missing if line.split(":")[0].removeprefix("case ") not in listed]
    return cases, missing


def _check_msd_modalities(data_dir: str) -> None:
    """If ``D/dataset.json`` lists modalities, make sure they are FLAIR, T1w, T1gd, T2w in that order."""
    path = os.path.join(data_dir, "dataset.json")
    if not os.path.isfile(path):
        return
    with open(path) as f:
        modality = json.load(f).get("modality")
    if not isinstance(modality, dict) or not all(str(k).isdigit() for k in modality):
        return  # nothing we can check
    listed = tuple(str(modality[k]).lower() for k in sorted(modality, key=int))
    if listed != MSD_MODALITIES:
        raise ValueError(
            f"{path} lists modalities {listed}; this builder expects the MSD Task01 order {MSD_MODALITIES}."
        )


def _msd_cases(data_dir: str) -> tuple[list[dict], list[str]]:
    """Case items of the MSD layout, plus one line per missing label file.

    Raises:
        ValueError: an image is not 4D with 4 channels (read from the NIfTI header only).
    """
    import nibabel as nib  # only needed for this layout; imported here to keep the module light

    _check_msd_modalities(data_dir)
    images_dir = os.path.join(data_dir, "imagesTr")
    labels_dir = os.path.join(data_dir, "labelsTr")
    cases, missing = [], []
    for name in _nifti_files(images_dir):
        case = name[: -len(".nii.gz")] if name.endswith(".nii.gz") else name[: -len(".nii")]
        image = os.path.join(images_dir, name)
        label = os.path.join(labels_dir, name)
        shape = nib.load(image).shape  # lazy: reads the header, not the voxels
        if len(shape) != 4 or shape[3] != 4:
            raise ValueError(f"case {case}: {image} has shape {shape}; MSD images must be 4D with 4 channels.")
        if not os.path.isfile(label):
            missing.append(f"case {case}: missing label file {label}")
            continue
        cases.append({"case": case, "image": _relative(image, data_dir), "label": _relative(label, data_dir)})
    return cases, missing


def find_cases(data_dir: str, allow_missing: bool = False) -> tuple[str, list[dict]]:
    """Detect the layout of ``data_dir`` and list its cases.

    Args:
        data_dir: the data set root ``D``.

    Returns:
        ``(layout, cases)``: the layout name and the cases sorted by case id. Each case is
        ``{"case": id, "image": ..., "label": seg path}`` with paths relative to ``D`` ('/'
        separators). ``image`` is a list of 4 files ordered FLAIR, T1, T1ce, T2 for BraTS layouts,
        and the single 4D file (channels already FLAIR, T1w, T1gd, T2w) for msd. With ``allow_missing`` (BraTS
        layouts), a case may lack modalities and its label: those entries are ``None`` (BraSyn's validation
        folders hold three modalities and no label; for inference with an any-missing model only).

    Raises:
        FileNotFoundError: one or more cases lack a modality or the segmentation; the message
            names every such case with the expected file path (up to 20 of them).
        ValueError: no layout matches (see ``detect_layout``), no case was found, two case folders
            share an id (e.g. in HGG and in LGG), or an MSD image is not 4D with 4 channels.
    """
    data_dir = str(data_dir)
    layout = detect_layout(data_dir)
    if allow_missing and layout == "msd":
        raise ValueError(f"{data_dir}: allow_missing applies to the BraTS layouts (one file per modality), not msd")
    cases, missing = _msd_cases(data_dir) if layout == "msd" else _brats_cases(data_dir, layout, allow_missing)

    if missing:
        listed = "\n  ".join(missing[:_MAX_LISTED])
        more = f"\n  ... and {len(missing) - _MAX_LISTED} more" if len(missing) > _MAX_LISTED else ""
        raise FileNotFoundError(
            f"{len(missing)} required file(s) missing in {data_dir} (layout {layout}):\n  {listed}{more}"
        )
    if not cases:
        raise ValueError(f"{data_dir} looks like layout {layout} but holds no cases.")

    ids = [c["case"] for c in cases]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise ValueError(f"{data_dir}: case ids appear more than once: {duplicates}")
    return layout, sorted(cases, key=lambda c: c["case"])


def _parse_fractions(fractions) -> tuple[float, float, float]:
    """Check the (gan, seg, test) fractions and return them as floats.

    Accepts a sequence of 3 numbers or its text form ("[0.35,0.35,0.30]", as a shell may pass it).

    Raises:
        ValueError: not 3 finite numbers, any below 0, or a sum more than 1e-6 away from 1.
    """
    if isinstance(fractions, str):
        try:
            fractions = ast.literal_eval(fractions)
        except (ValueError, SyntaxError) as err:
            raise ValueError(f"fractions {fractions!r} is not a list of 3 numbers.") from err
    if not isinstance(fractions, Sequence) or len(fractions) != 3:
        raise ValueError(f"fractions must be 3 numbers for the splits {SPLITS}, got {fractions!r}.")
    try:
        values = tuple(float(f) for f in fractions)
    except (TypeError, ValueError) as err:
        raise ValueError(f"fractions must be 3 numbers, got {fractions!r}.") from err
    if not all(math.isfinite(v) and v >= 0 for v in values):
        raise ValueError(f"each fraction must be a finite number >= 0, got {values}.")
    if abs(sum(values) - 1.0) > 1e-6:
        raise ValueError(f"fractions must sum to 1 (within 1e-6), got {values} summing to {sum(values)}.")
    return values


def _check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}.")
    return int(seed)


def split_counts(n: int, fractions=DEFAULT_FRACTIONS) -> tuple[int, int, int]:
    """How many of ``n`` cases go to the gan, seg and test splits.

    Each count starts at ``floor(fraction * n)``; the cases left over go one each to the splits
    with the largest fractional parts (ties: the earlier split). When ``n >= 3``, a split with a
    fraction above 0 that would get no case takes one from the largest split. For 285 cases and
    the default fractions this gives the paper's 100 / 100 / 85.

    Raises:
        ValueError: bad fractions (see ``split_cases``) or ``n < 0``.
    """
    values = _parse_fractions(fractions)
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}.")
    total = sum(values)
    raw = [v / total * n for v in values]  # divide by the sum so the counts add up to exactly n
    counts = [math.floor(round(r, 9)) for r in raw]  # round first so 6.9999999999 floors to 7
    left_over = n - sum(counts)
    by_fraction = sorted(range(3), key=lambda i: (-(raw[i] - counts[i]), i))
    for i in by_fraction[:left_over]:
        counts[i] += 1

    if n >= 3:
        for i in range(3):
            if values[i] > 0 and counts[i] == 0:
                donor = max(range(3), key=lambda j: (counts[j], -j))  # largest split, earliest on ties
                counts[donor] -= 1
                counts[i] += 1
    return counts[0], counts[1], counts[2]


def split_cases(cases: list[dict], fractions=DEFAULT_FRACTIONS, seed: int = 0) -> dict[str, list[dict]]:
    """Split cases at subject level into the gan, seg and test lists, reproducibly.

    The cases are sorted by their ``"case"`` id, shuffled with ``numpy.random.default_rng(seed)``
    and cut into consecutive runs of the sizes given by ``split_counts``. Each list is then sorted
    by case id again, so the result depends only on the set of ids, ``fractions`` and ``seed``.

    Args:
        cases: dicts with at least a unique ``"case"`` id.
        fractions: (gan, seg, test) shares, each >= 0, summing to 1 within 1e-6.
        seed: integer >= 0.

    Returns:
        ``{"gan": [...], "seg": [...], "test": [...]}``: the same dict objects, disjoint, together
        covering every case.

    Raises:
        ValueError: bad fractions, a negative or non-integer seed, or duplicate case ids.
    """
    values = _parse_fractions(fractions)
    seed = _check_seed(seed)
    ordered = sorted(cases, key=lambda c: c["case"])
    ids = [c["case"] for c in ordered]
    if len(set(ids)) != len(ids):
        raise ValueError("case ids must be unique to split by subject.")

    counts = split_counts(len(ordered), values)
    permutation = np.random.default_rng(seed).permutation(len(ordered))
    shuffled = [ordered[i] for i in permutation]
    result, start = {}, 0
    for name, count in zip(SPLITS, counts):
        result[name] = sorted(shuffled[start : start + count], key=lambda c: c["case"])
        start += count
    return result


def prepare_datalist(data_dir: str, output: str | None = None, seed: int = 0, fractions=DEFAULT_FRACTIONS,
                     allow_missing: bool = False) -> str:
    """Scan ``data_dir``, split its cases and write the datalist JSON.

    Args:
        data_dir: the data set root ``D`` in one of the layouts of ``LAYOUT_PATTERNS``.
        output: where to write the JSON; default ``D/datalist.json``. An existing file is replaced.
        seed: integer >= 0 for the shuffle.
        fractions: (gan, seg, test) shares, each >= 0, summing to 1 within 1e-6; a list or its
            text form. The default (0.35, 0.35, 0.30) gives the paper's 100/100/85 of 285 cases.
        allow_missing: list cases that lack modalities or a label (``null`` entries; BraTS layouts), for inference
            with an any-missing model (``docs/anymissing.md``); the training workflows need complete cases.

    Returns:
        The absolute path of the written file. Its content is
        ``{"name", "layout", "channels", "labels", "seed", "fractions", "gan", "seg", "test"}``
        with items as described in ``find_cases``; same inputs and seed give the same bytes.

    Raises:
        FileNotFoundError, NotADirectoryError, ValueError: see ``find_cases`` and ``split_cases``.
        Nothing is written when an error is raised.
    """
    data_dir = str(data_dir)
    # Check the arguments before scanning, so mistakes fail fast.
    values = _parse_fractions(fractions)
    seed = _check_seed(seed)
    output = os.path.abspath(str(output) if output is not None else os.path.join(data_dir, "datalist.json"))

    allow_missing = flag(allow_missing, "allow_missing")  # fire hands "--allow_missing false" over as a word
    layout, cases = find_cases(data_dir, allow_missing)
    incomplete = [c["case"] for c in cases if c["label"] is None or (isinstance(c["image"], list) and None in c["image"])]
    if incomplete and (values[0] > 0 or values[1] > 0):
        raise ValueError(
            f"{data_dir}: {len(incomplete)} case(s) lack a modality or the label (e.g. {incomplete[0]}); they can only "
            "be inference inputs of an any-missing model, not training cases: give --fractions \"[0,0,1]\" (all test)"
        )
    splits = split_cases(cases, values, seed)
    content = {
        "name": "brainsynth datalist",
        "layout": layout,
        "channels": list(CHANNELS),
        "labels": dict(LAYOUT_LABELS[layout]),
        "seed": seed,
        "fractions": list(values),
        **splits,
    }
    write_json(output, content, newline=True, indent=2)  # atomic: an error never leaves a half-written file

    sizes = ", ".join(f"{name} {len(splits[name])}" for name in SPLITS)
    print(f"layout {layout}: {len(cases)} cases -> {sizes}")
    print(f"wrote {output}")
    return output


if __name__ == "__main__":
    from scripts.runtime.command_line import run_tool

    # The summary is printed by prepare_datalist itself, so fire need not print the returned path.
    run_tool(prepare_datalist, serialize=lambda _: None)
