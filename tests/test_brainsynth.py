"""Specification of the ``brainsynth`` command (bundle/scripts/brainsynth.py): its inputs (a T2 file, a folder of
cases, a text list, a datalist), ``--targets``, ``--help`` without work, and one-line errors before any work."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import BUNDLE, REPO, brain, files_in, save_nifti

from scripts import brainsynth

TARGETS = ("flair", "t1", "t1ce")
SCRIPT = str(BUNDLE / "scripts" / "brainsynth.py")


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, SCRIPT, *args], cwd=REPO, capture_output=True, text=True, timeout=300)


@pytest.fixture()
def cases(tmp_path):
    """A folder of two cases in a BraTS-like layout (T2 and a T1 each), without a datalist."""
    for i in range(2):
        save_nifti(tmp_path / "cases" / f"case{i}" / f"case{i}_t2.nii.gz", brain((32, 32, 8), seed=i))
        save_nifti(tmp_path / "cases" / f"case{i}" / f"case{i}_t1.nii.gz", brain((32, 32, 8), seed=i))
    return tmp_path / "cases"


def test_a_folder_of_cases_synthesises_every_t2_found(cases, tmp_path, tcmgan_ckpt):
    assert [p.split("/")[-1] for p in brainsynth.find_t2_volumes(cases)] == ["case0_t2.nii.gz", "case1_t2.nii.gz"]
    brainsynth.synthesise(str(cases), output_dir=str(tmp_path / "out"), ckpt_path=str(tcmgan_ckpt))
    assert files_in(tmp_path / "out") == sorted(f"case{i}_{t}.nii.gz" for i in range(2) for t in TARGETS)


def test_a_text_list_and_targets(cases, tmp_path, tcmgan_ckpt):
    listing = tmp_path / "todo.txt"
    listing.write_text("# one case only\ncases/case1/case1_t2.nii.gz\n\n")
    brainsynth.synthesise(str(listing), output_dir=str(tmp_path / "out"), ckpt_path=str(tcmgan_ckpt),
                          targets="t1ce", threads=1)  # fmt: skip
    assert files_in(tmp_path / "out") == ["case1_t1ce.nii.gz"]


def test_one_file_and_a_rerun_keeps_its_outputs(cases, tmp_path, tcmgan_ckpt):
    src = cases / "case0" / "case0_t2.nii.gz"
    brainsynth.synthesise(str(src), output_dir=str(tmp_path / "out"), ckpt_path=str(tcmgan_ckpt))
    before = {f: (tmp_path / "out" / f).stat().st_mtime_ns for f in files_in(tmp_path / "out")}
    brainsynth.synthesise(str(src), output_dir=str(tmp_path / "out"), ckpt_path=str(tcmgan_ckpt), overwrite="false")
    assert {f: (tmp_path / "out" / f).stat().st_mtime_ns for f in files_in(tmp_path / "out")} == before


def test_tri_planar_synthesis_with_its_uncertainty_map(cases, tmp_path, tcmgan_ckpt):
    src = cases / "case0" / "case0_t2.nii.gz"
    brainsynth.synthesise(str(src), output_dir=str(tmp_path / "out"), ckpt_path=str(tcmgan_ckpt), targets="t1",
                          views="all", flip="true", uncertainty="true", check_contrast="false")  # fmt: skip
    assert files_in(tmp_path / "out") == ["case0_t1.nii.gz", "case0_t1_uncertainty.nii.gz"]
    with pytest.raises(ValueError, match="unknown view"):
        brainsynth.synthesise(str(src), output_dir=str(tmp_path / "bad"), views="oblique")
    assert not (tmp_path / "bad").exists()


def test_list_entries_are_checked_before_any_work(tmp_path):
    listing = tmp_path / "todo.txt"
    listing.write_text("missing_t2.nii.gz\n")
    with pytest.raises(FileNotFoundError, match=r"todo.txt, line 1: missing_t2.nii.gz: no such file"):
        brainsynth.read_list(listing)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no T2 volume in this folder"):
        brainsynth.inputs_of(tmp_path / "empty", str(tmp_path))
    with pytest.raises(ValueError, match="expected true or false"):
        brainsynth.flag("maybe")


@pytest.mark.parametrize("args, shown", [
    (["--help"], ["synthesise INPUT", "train --dataset_dir", "evaluate --dataset_dir", "phantom --output_dir"]),
    (["synthesise", "--help"], ["--output_dir=OUTPUT_DIR", "--targets=TARGETS", "--threads=THREADS"]),
    (["train", "--help"], ["--variant=VARIANT", "--segmenter=SEGMENTER", "--resume=RESUME"]),
])  # fmt: skip
def test_help_prints_the_options_and_does_no_work(tmp_path, args, shown):
    result = subprocess.run([sys.executable, SCRIPT, *args], cwd=tmp_path, capture_output=True, text=True,
                            timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr
    text = result.stdout + result.stderr
    assert all(s in text for s in shown), text
    assert files_in(tmp_path) == []  # nothing written where it ran


@pytest.mark.parametrize(
    "args, line",
    [
        (["synthesise", "nowhere_t2.nii.gz", "--output_dir", "OUT"],
         "FileNotFoundError: nowhere_t2.nii.gz: no such file or folder (the T2 input of synthesise)"),
        (["synthesise", "x.nii.gz", "--output_dir", "OUT", "--target", "t1"],
         "brainsynth.py: unknown option --target; the options are --input, --output_dir, --targets, --device, "
         "--threads, --ckpt_path, --overwrite, --split, --check_contrast, --precision, --views, --flip, --uncertainty, "
         "--verbose"),
        (["synthesize", "x.nii.gz"],
         "brainsynth.py: unknown sub-command 'synthesize'; expected one of synthesise, train, evaluate, phantom"),
        (["train", "--dataset_dir", "D", "--output_dir", "OUT", "--variant", "cyclegan"],
         "ValueError: --variant 'cyclegan': expected one of pix2pix, mgan, tcmgan, tcmgan_bw, anymissing, recommended"),
    ],
)  # fmt: skip
def test_a_mistake_ends_in_one_line_and_writes_nothing(tmp_path, args, line):
    args = [a.replace("OUT", str(tmp_path / "out")) for a in args]
    result = cli(*args)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [line]
    assert not (tmp_path / "out").exists()
