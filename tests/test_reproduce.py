"""Specification of the study driver, bundle/scripts/reproduce.py: the smoke preset end to end (phantoms, every
workflow, both tables, the report and figure), and a second run that skips the finished stages."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import REPO
from scripts.reproduce import DOWNSTREAM, VARIANTS, Study

SCRIPT = str(REPO / "bundle" / "scripts" / "reproduce.py")


def _reproduce(out, *extra) -> str:
    cmd = [sys.executable, SCRIPT, "--preset", "smoke", "--output_dir", str(out), *extra]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("reproduce")
    return out, _reproduce(out)


def test_smoke_preset_writes_both_tables_and_the_figure(smoke):
    out, log = smoke
    stages = ["phantoms", "segmenter", *[f"gan_{v}" for v in VARIANTS], *[f"table1_{v}" for v in VARIANTS], "table1",
              *[f"seg_{r}" for r in DOWNSTREAM], "table2", "report"]  # fmt: skip
    for i, name in enumerate(stages, start=1):
        assert f"[{i}/{len(stages)}] {name}: finished in" in log
        assert (out / "stages" / f"{name}.json").is_file()
    results = (out / "results.md").read_text()
    for method in ("pix2pix", "MGAN", "TC-MGAN", "TC-MGAN bw", "T2 (baseline)", "inverted T2 (baseline)"):
        assert f"| {method} |" in results
    for row in ("T2 only", "T2 + TC-MGAN synthesised", "4 real modalities"):
        assert f"| {row} |" in results
    assert "train.json" in results and "evaluate_downstream.json" in results and "MONAI 1." in results
    assert "| gan_tcmgan | " in results and (out / "figure3.png").stat().st_size > 10_000
    table1 = json.loads((out / "table1" / "table1.json").read_text())
    assert set(table1["methods"]) == {*VARIANTS, "t2", "inverted_t2"}
    for r in DOWNSTREAM:
        scores = json.loads((out / "runs" / "downstream" / r / "scores.json").read_text())
        assert 0 <= scores["dice_wt"]["mean"] <= 1


def test_second_run_skips_finished_stages(smoke):
    out, _ = smoke
    marker = out / "stages" / "gan_tcmgan.json"
    before = marker.read_text()
    (out / "stages" / "table2.json").unlink()  # redo one cheap stage
    log = _reproduce(out)
    assert "gan_tcmgan: done before, skipped" in log and "segmenter: done before, skipped" in log
    assert "table2: finished in" in log and "report: finished in" in log
    assert log.count("done before, skipped") == 17
    assert marker.read_text() == before


def test_bad_arguments_are_named(tmp_path):
    with pytest.raises(ValueError, match="preset 'fast'"):
        Study("fast", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="datalist.json"):
        Study("smoke", str(tmp_path / "r"), dataset_dir=str(tmp_path))
