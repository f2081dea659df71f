"""Every file the bundle writes goes through here: written under a hidden temporary name next to its final name,
then renamed into place, so that a failure or a kill never leaves a partial file under a final name.

- :func:`atomic_paths`: temporary paths for one or several files, renamed into place together when the block
  ends without an error (all of them or none), removed otherwise;
- :func:`write_atomic`: one file, written by a callback that takes the temporary path (``torch.save``,
  ``nib.save``, ``np.savez_compressed``, ``fig.savefig``, ...); :func:`write_text`, :func:`write_json` and
  :func:`write_csv` for the plain formats;
- :func:`remove_stale_temporaries`: removes the temporaries that killed processes left behind (a running
  writer's are kept; :func:`pid_running`).

Naming: the temporary of ``folder/<stem><ext>`` is ``folder/.<stem>.<pid>.<token>.tmp<ext>``, where ``ext`` is
the final name's extension (``.nii.gz`` counted as one), so that writers which pick the format from the name
(nibabel, numpy, matplotlib) write the same bytes as they would under the final name.

Only the standard library is imported, so the data tools (``prepare_datalist.py``) stay light.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import os
import re
import secrets
import shutil
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence

logger = logging.getLogger(__name__)

#: Extensions made of two parts, kept whole in a temporary's name.
_DOUBLE_EXTENSIONS = (".nii.gz", ".tar.gz")


def split_extension(name: str) -> tuple[str, str]:
    """``(stem, extension)`` of a file name, with ``.nii.gz`` (and ``.tar.gz``) as one extension.

    ``"c1_flair.nii.gz"`` -> ``("c1_flair", ".nii.gz")``; ``"model.pt"`` -> ``("model", ".pt")``;
    ``"README"`` -> ``("README", "")``.
    """
    for ext in _DOUBLE_EXTENSIONS:
        if name.lower().endswith(ext) and len(name) > len(ext):
            return name[: -len(ext)], name[-len(ext) :]
    return os.path.splitext(name)


def pid_running(pid: int) -> bool:
    """Whether process ``pid`` exists on this machine (also when another user owns it).

    Takes a process id; returns True when it runs (or cannot be asked about), False when no such process exists.
    """
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _temporary_pattern(name: str) -> re.Pattern:
    """The names of the temporaries of final file ``name``; group 1 is the writer's pid. The token is optional
    (the inference outputs of earlier versions had none)."""
    stem, ext = split_extension(name)
    return re.compile(rf"^\.{re.escape(stem)}\.(\d+)(?:\.[0-9a-f]+)?\.tmp{re.escape(ext)}$")


def _new_temporary(path: str) -> str:
    """Create an empty, new temporary file for final ``path`` (exclusive creation, usual permissions) and return
    its path."""
    folder, name = os.path.split(path)
    stem, ext = split_extension(name)
    while True:
        tmp = os.path.join(folder, f".{stem}.{os.getpid()}.{secrets.token_hex(4)}.tmp{ext}")
        try:
            os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
            return tmp
        except FileExistsError:  # another thread drew the same token: draw again
            continue


def remove_stale_temporaries(paths: str | Iterable[str]) -> list[str]:
    """Remove the temporaries of the final files ``paths`` that processes which no longer run left behind (a
    killed writer); the temporaries of running processes (this one included) are kept.

    Args:
        paths: one final file path or several (one folder listing per folder).

    Returns:
        The removed paths. A folder that does not exist has nothing to remove.
    """
    by_folder: dict[str, list[re.Pattern]] = {}
    for path in [paths] if isinstance(paths, (str, os.PathLike)) else paths:
        folder, name = os.path.split(os.path.abspath(os.fspath(path)))
        by_folder.setdefault(folder, []).append(_temporary_pattern(name))
    removed = []
    for folder, patterns in by_folder.items():
        if not os.path.isdir(folder):
            continue
        for name in os.listdir(folder):
            match = next((m for m in (p.match(name) for p in patterns) if m), None)
            if match is None or pid_running(int(match.group(1))):
                continue
            try:
                os.remove(os.path.join(folder, name))
                removed.append(os.path.join(folder, name))
            except FileNotFoundError:  # another process removed it first
                pass
    if removed:
        logger.warning(f"removed temporary files of an interrupted run: {removed}")
    return removed


def _fsync(path: str) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


@contextlib.contextmanager
def atomic_paths(paths: Sequence[str], fsync: bool = False) -> Iterator[list[str]]:
    """Temporary paths to write ``paths`` to, renamed into place together when the block ends without an error.

    Before the block, each file's folder is created and stale temporaries of the files are removed
    (:func:`remove_stale_temporaries`). The block gets one temporary path per final path, in the same folder and
    with the same extension (see the module doc); it must write each of them. When the block ends normally they
    are renamed to their final names (all of them, after all were written: a failure or a kill while writing
    leaves every final file as it was); when it raises, the temporaries are removed and the error goes on.

    Args:
        paths: final file paths.
        fsync: flush each temporary file to disk before the rename (for checkpoints: a power loss then leaves
            the old or the new file, never an empty one); slower.

    Yields:
        The temporary paths, in the order of ``paths``.

    Raises:
        Whatever the block raises, except that an ``OSError`` (a full disk, a folder that cannot be created or
        written) becomes one that names the final path: ``OSError(errno, "cannot write <path>: <reason>")``.
    """
    finals = [os.path.abspath(os.fspath(p)) for p in paths]
    temporaries: list[str] = []
    try:
        for folder in {os.path.dirname(p) for p in finals}:
            os.makedirs(folder, exist_ok=True)
        remove_stale_temporaries(finals)
        temporaries = [_new_temporary(p) for p in finals]
        yield list(temporaries)
        for tmp in temporaries:
            if fsync:
                _fsync(tmp)
        for tmp, final in zip(temporaries, finals):
            os.replace(tmp, final)
    except OSError as e:  # a full disk, a folder one cannot write to: name the output, not a temporary
        shown = finals[0] if len(finals) == 1 else f"{finals[0]} (and {len(finals) - 1} more)"
        raise OSError(e.errno, f"cannot write {shown}: {e.strerror or e}") from e
    finally:
        for tmp in temporaries:
            if os.path.exists(tmp):
                os.remove(tmp)


def write_atomic(path: str, write: Callable[[str], object], fsync: bool = False) -> str:
    """Write one file atomically: ``write(temporary_path)`` writes it, then it is renamed to ``path``.

    Args:
        path: the final file path (its folder is created).
        write: a callback that writes the whole file to the path it is given, e.g.
            ``lambda p: torch.save(obj, p)`` or ``img.to_filename``.
        fsync: see :func:`atomic_paths`.

    Returns:
        ``path``.

    Raises:
        Whatever ``write`` raises (nothing is left under ``path`` then, and an older file there stays as it was).
    """
    with atomic_paths([path], fsync) as (tmp,):
        write(tmp)
    return path


def write_text(path: str, text: str) -> str:
    """Write ``text`` (UTF-8) to ``path`` atomically; returns ``path``. Raises ``OSError`` as ``open``."""

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    return write_atomic(path, write)


def write_json(path: str, obj, newline: bool = False, **dump_options) -> str:
    """Write ``obj`` as JSON to ``path`` atomically; returns ``path``.

    Args:
        path: the final file path.
        obj: a JSON-able object.
        newline: end the file with a newline.
        dump_options: passed to ``json.dump`` (e.g. ``indent=2``, ``default=str``).

    Raises:
        TypeError, ValueError: ``obj`` is not JSON-able (nothing is written); ``OSError`` as ``open``.
    """
    text = json.dumps(obj, **dump_options) + ("\n" if newline else "")  # fails before any file is touched
    return write_text(path, text)


def write_csv(path: str, rows: Sequence[Mapping] | Sequence[Sequence], header: Sequence[str] | None = None) -> str:
    """Write a CSV file atomically; returns ``path``.

    Args:
        path: the final file path.
        rows: dicts (columns: ``header``, else the first row's keys; an empty list gives an empty header line) or,
            with ``header`` given, lists of values.
        header: column names.

    Raises:
        ValueError: a dict row has keys outside the columns; ``OSError`` as ``open``.
    """
    rows = list(rows)
    as_dicts = not rows or isinstance(rows[0], Mapping)

    def write(tmp: str) -> None:
        with open(tmp, "w", newline="") as f:
            if as_dicts:
                writer = csv.DictWriter(f, fieldnames=list(header) if header else (list(rows[0]) if rows else []))
                writer.writeheader()
            else:
                writer = csv.writer(f)
                if header:
                    writer.writerow(header)
            writer.writerows(rows)

    return write_atomic(path, write)


# --- names of volume files --------------------------------------------------------------------------------------

#: Extensions stripped from a file name to make a case id (longest first).
_EXTENSIONS = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".dcm", ".gz")
#: A trailing T2 tag in a file name (``_t2``, ``-t2w``, ``_T2``), dropped from the case id.
_T2_TAG = re.compile(r"[_\-.]t2w?$", re.IGNORECASE)


def case_id(path: str, tag: re.Pattern = _T2_TAG) -> str:
    """Case id of an input file: its name without extension and without a trailing modality tag (``tag``: the T2's;
    the any-missing inference gives one matching every modality).

    ``/d/BraTS2021_00000_t2.nii.gz`` -> ``BraTS2021_00000``; ``/d/sub-01_T2w.nrrd`` -> ``sub-01``;
    a DICOM series folder ``/d/series7/`` -> ``series7``.
    """
    name = volume_stem(os.path.basename(os.path.normpath(path)))
    stripped = tag.sub("", name)
    return stripped or name


def volume_stem(name: str) -> str:
    """A file name without its image extension (``.nii.gz``, ``.nii``, ``.nrrd``, ``.mha`` ...)."""
    for ext in _EXTENSIONS:
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return name


def check_writable_dir(path: str, what: str = "--output_dir", needed_bytes: int = 0) -> str:
    """``path`` itself when a folder there can be written (it exists and is writable, or its nearest existing parent
    is a writable folder, so it can be made) and its file system has ``needed_bytes`` free; nothing is created.

    Raises:
        NotADirectoryError: ``path`` or one of its parents is a file.
        PermissionError: the folder (or the parent it would be made in) is not writable.
        OSError: less than ``needed_bytes`` free there (the message says both).
    """
    path = os.path.abspath(str(path))
    existing = path
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise NotADirectoryError(f"{what} {path}: cannot be written, {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise PermissionError(f"{what} {path}: cannot be written, {existing} is not writable")
    free = shutil.disk_usage(existing).free
    if needed_bytes and free < needed_bytes:
        raise OSError(f"{what} {path}: {free / 2**20:.0f} MiB free there, the outputs need about "
                      f"{needed_bytes / 2**20:.0f} MiB; free some space or choose another folder")
    return path
