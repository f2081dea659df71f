"""Specification of the atomic writer, bundle/scripts/runtime/files.py: every file the bundle writes appears whole
under its final name or not at all, and the temporaries of killed writers are cleaned up. (A real SIGKILL
mid-write: ``test_reliability.py``.)"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from conftest import files_in

from scripts.runtime import files

DEAD_PID = 2**22 + 12345  # above the default pid_max: no process has it


@pytest.mark.parametrize(
    "name, stem, ext",
    [("c1_flair.nii.gz", "c1_flair", ".nii.gz"), ("model.pt", "model", ".pt"), ("README", "README", "")],
)
def test_split_extension_keeps_nii_gz_whole(name, stem, ext):
    assert files.split_extension(name) == (stem, ext)


def test_temporary_has_the_final_extension_and_is_renamed_on_success(tmp_path):
    final = tmp_path / "sub" / "c1_t1.nii.gz"  # the folder is created
    with files.atomic_paths([str(final)]) as (tmp,):
        name = os.path.basename(tmp)
        assert name.startswith(f".c1_t1.{os.getpid()}.") and name.endswith(".tmp.nii.gz")
        assert not final.exists()
        with open(tmp, "w") as f:
            f.write("whole")
    assert files_in(final.parent) == ["c1_t1.nii.gz"] and final.read_text() == "whole"


def test_a_failing_block_leaves_every_final_file_as_it_was(tmp_path):
    (tmp_path / "a.txt").write_text("old a")
    with pytest.raises(RuntimeError, match="disk full"):
        with files.atomic_paths([str(tmp_path / "a.txt"), str(tmp_path / "b.txt")]) as (ta, tb):
            with open(ta, "w") as f:
                f.write("new a")  # written, but b fails: neither is renamed
            raise RuntimeError("disk full")
    assert files_in(tmp_path) == ["a.txt"] and (tmp_path / "a.txt").read_text() == "old a"


def test_write_json_fails_before_touching_the_file_on_a_bad_object(tmp_path):
    path = tmp_path / "scores.json"
    files.write_json(str(path), {"psnr": 1.5}, indent=2)
    with pytest.raises(TypeError):
        files.write_json(str(path), {"bad": object()})
    assert json.loads(path.read_text()) == {"psnr": 1.5} and files_in(tmp_path) == ["scores.json"]


def test_write_csv_from_dicts_and_from_lists(tmp_path):
    files.write_csv(str(tmp_path / "d.csv"), [{"case": "c1", "psnr": 30.0}])
    files.write_csv(str(tmp_path / "l.csv"), [["c1", 30.0]], header=["case", "psnr"])
    assert (tmp_path / "d.csv").read_text() == (tmp_path / "l.csv").read_text() == "case,psnr\nc1,30.0\n"


def test_stale_temporaries_of_dead_writers_are_removed_and_live_ones_kept(tmp_path):
    names = [
        f".c1_flair.{DEAD_PID}.tmp.nii.gz",  # an earlier version's name (no token)
        f".c1_t1.{DEAD_PID}.0a1b2c3d.tmp.nii",
        f".model.{DEAD_PID}.0a1b2c3d.tmp.pt",
        f".c1_t1ce.{os.getpid()}.0a1b2c3d.tmp.nii",  # a running writer (this process)
        "c1_t1.nii",  # a final output
        f".other.{DEAD_PID}.tmp.nii",  # another file's temporary: not asked about
    ]
    for name in names:
        (tmp_path / name).write_bytes(b"x")
    finals = [str(tmp_path / n) for n in ("c1_flair.nii.gz", "c1_t1.nii", "c1_t1ce.nii", "model.pt")]
    removed = files.remove_stale_temporaries(finals)
    assert sorted(os.path.basename(p) for p in removed) == sorted(names[:3])
    assert files_in(tmp_path) == sorted(names[3:])


def test_pid_running():
    assert files.pid_running(os.getpid()) and not files.pid_running(DEAD_PID)


def test_a_full_disk_names_the_output_and_leaves_nothing(tmp_path):
    import errno

    from scripts.runtime.command_line import one_line

    def full_disk(tmp):
        with open(tmp, "wb") as f:
            f.write(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    final = tmp_path / "out" / "c1_flair.nii.gz"
    with pytest.raises(OSError) as info:
        files.write_atomic(str(final), full_disk)
    assert info.value.errno == errno.ENOSPC
    assert one_line(info.value) == f"OSError: [Errno 28] cannot write {final}: No space left on device"
    assert files_in(tmp_path / "out") == []


def test_an_output_folder_is_checked_for_writability_and_space_before_any_work(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(NotADirectoryError, match="a_file is a file"):
        files.check_writable_dir(str(blocker / "out"))
    assert files.check_writable_dir(str(tmp_path / "new" / "out"), needed_bytes=1) == str(tmp_path / "new" / "out")
    with pytest.raises(OSError, match=r"MiB free there, the outputs need about \d+ MiB"):
        files.check_writable_dir(str(tmp_path / "out"), needed_bytes=2**62)
    assert files_in(tmp_path) == ["a_file"]  # nothing created


def test_output_bytes_counts_each_written_volume_from_the_header(tmp_path):
    from conftest import save_nifti

    from scripts.runtime.cases import output_bytes

    t2 = tmp_path / "c_t2.nii.gz"
    save_nifti(t2, np.ones((10, 20, 30), np.float32))
    raw = 10 * 20 * 30 * 4
    case = {"case": "c", "modalities": {"t2": str(t2)}, "missing": "flair,t1,t1ce"}  # a paper generator's T2 case
    assert output_bytes([case], ".nii") == 3 * raw
    assert output_bytes([{**case, "missing": "t1ce"}], ".nii") == raw  # --targets t1ce
    assert output_bytes([case], ".nii.gz") == 3 * raw // 2
    assert output_bytes([case], ".nii", uncertainty=True) == 6 * raw
    any_missing = {"case": "c", "modalities": {"t2": str(t2)}, "missing": "flair,t1"}
    assert output_bytes([any_missing], ".nii") == 2 * raw
