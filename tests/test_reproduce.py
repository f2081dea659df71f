"""Specification of the study driver, tools/reproduce.py: the smoke preset end to end with two training seeds
and two stages at a time (phantoms, every workflow, both tables merged over seeds with the sanity check, the report
and figure), a second run that skips the finished stages, and the stage plan of one seed (the earlier layout)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import REPO
from reproduce import DOWNSTREAM, VARIANTS, Study

SCRIPT = str(REPO / "tools" / "reproduce.py")


def _reproduce(out, *extra) -> str:
    cmd = [sys.executable, SCRIPT, "--preset", "smoke", "--output_dir", str(out), *extra]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


SEEDS = 2
#: the stages of the smoke study with two seeds, in plan order
STAGES = ["phantoms"]
for _k in range(SEEDS):  # seed by seed, so that a study cut short holds whole seeds
    STAGES += [f"segmenter_seed{_k}", *[f"gan_{v}_seed{_k}" for v in VARIANTS],
               *[f"table1_{v}_seed{_k}" for v in VARIANTS], *[f"seg_{r}_seed{_k}" for r in DOWNSTREAM]]  # fmt: skip
STAGES += ["table1", "table2", "report"]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("reproduce")
    return out, _reproduce(out, "--seeds", str(SEEDS), "--jobs", "2")


@pytest.mark.slow
def test_smoke_preset_writes_both_tables_and_the_figure(smoke):
    out, log = smoke
    for i, name in enumerate(STAGES, start=1):
        assert f"[{i}/{len(STAGES)}] {name}: finished in" in log
        assert (out / "stages" / f"{name}.json").is_file()
    results = (out / "results.md").read_text()
    for method in ("pix2pix", "MGAN", "TC-MGAN", "TC-MGAN bw", "T2 (baseline)", "inverted T2 (baseline)"):
        assert f"| {method} |" in results
    for row in ("T2 only", "T2 + TC-MGAN synthesised", "4 real modalities"):
        assert f"| {row} |" in results
    assert "train.json" in results and "evaluate_downstream.json" in results and "MONAI 1." in results
    assert "| gan_tcmgan_seed1 | " in results and (out / "figure3.png").stat().st_size > 10_000
    assert "2 training seeds" in results and "**Sanity check**" in results and "Validation Dice" in results
    assert "**Tumour and healthy brain**" in results and "they ran 2 at a time" in results
    table1 = json.loads((out / "table1" / "table1.json").read_text())
    assert set(table1["methods"]) == {*VARIANTS, "t2", "inverted_t2"}
    for k in range(SEEDS):  # each seed's runs and tables, trained with its own seed
        assert "--seed " + str(k) in (out / "stages" / f"gan_mgan_seed{k}.json").read_text()
        assert (out / "table1" / f"seed{k}" / "mgan" / "scores.json").is_file()
        assert json.loads((out / "runs" / f"seed{k}" / "segmenter" / "validation.json").read_text())["history"]
    # every merged cell is the mean of the two seeds' means
    seeds = [json.loads((out / "table1" / f"seed{k}" / "mgan" / "scores.json").read_text()) for k in range(SEEDS)]
    merged = table1["methods"]["mgan"]["flair"]["protocol_psnr"]
    assert merged["n_seeds"] == 2
    assert merged["mean"] == pytest.approx(sum(s["methods"]["mgan"]["flair"]["protocol_psnr"]["mean"] for s in seeds) / 2)
    for r in DOWNSTREAM:
        scores = json.loads((out / "runs" / "seed1" / "downstream" / r / "scores.json").read_text())
        assert 0 <= scores["dice_wt"]["mean"] <= 1
    assert "--model_selection last" in (out / "stages" / "seg_t2_seed0.json").read_text()


@pytest.mark.slow
def test_second_run_skips_finished_stages(smoke):
    out, _ = smoke
    marker = out / "stages" / "gan_tcmgan_seed1.json"
    before = marker.read_text()
    log = _reproduce(out, "--seeds", str(SEEDS))
    assert "gan_tcmgan_seed1: done before, skipped" in log and "segmenter_seed0: done before, skipped" in log
    # the merged tables and the report are redone every time (a later run may have more seeds)
    assert "table1: finished in" in log and "table2: finished in" in log and "report: finished in" in log
    assert log.count("done before, skipped") == len(STAGES) - 3
    assert marker.read_text() == before


def test_one_seed_keeps_the_earlier_stage_names_and_folders(tmp_path):
    study = Study("smoke", str(tmp_path))
    names = [name for name, _, _ in study.plan()]
    assert names == ["phantoms", "segmenter", *[f"gan_{v}" for v in VARIANTS], *[f"table1_{v}" for v in VARIANTS],
                     *[f"seg_{r}" for r in DOWNSTREAM], "table1", "table2", "report"]  # fmt: skip
    assert "--seed" not in study.gan_commands("mgan")[0] and study.runs_dir(0) == study.runs


def test_each_stage_waits_only_for_what_it_needs(tmp_path):
    needs = {name: deps for name, _, deps in Study("smoke", str(tmp_path), seeds=2).plan()}
    assert needs["gan_mgan_seed1"] == ["phantoms"] and needs["gan_tcmgan_seed1"] == ["segmenter_seed1"]
    assert needs["seg_synth_tcmgan_bw_seed0"] == ["gan_tcmgan_bw_seed0"] and needs["seg_real_seed0"] == ["phantoms"]
    order = list(needs)
    assert all(order.index(d) < order.index(n) for n, deps in needs.items() for d in deps)  # a runnable order
    gpu = Study("gpu", str(tmp_path / "gpu"), seeds=3)
    assert gpu.jobs == 6 and "gan_recommended_seed2" in [n for n, _, _ in gpu.plan()]


def test_bad_arguments_are_named(tmp_path):
    with pytest.raises(ValueError, match="preset 'fast'"):
        Study("fast", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="datalist.json"):
        Study("smoke", str(tmp_path / "r"), dataset_dir=str(tmp_path))
    with pytest.raises(ValueError, match="--seeds must be an integer >= 1"):
        Study("smoke", str(tmp_path / "s"), seeds=0)
    with pytest.raises(ValueError, match="--jobs must be an integer >= 1"):
        Study("smoke", str(tmp_path / "j"), jobs=0)


# --- the answers to the paper's claims (study_report), on scores written by hand --------------------------------------


def test_paired_differences_give_the_t_interval_the_sign_test_and_a_verdict():
    from study_report import paired, sign_test

    r = paired([0.1, 0.2, 0.3])
    assert r["mean"] == pytest.approx(0.2) and r["std"] == pytest.approx(0.1)
    assert r["ci95"] == pytest.approx([0.2 - 4.303 * 0.1 / 3**0.5, 0.2 + 4.303 * 0.1 / 3**0.5])
    assert r["verdict"] == "not resolved" and r["positive"] == 3 and r["sign_test_p"] == pytest.approx(0.25)
    assert paired([0.20, 0.21, 0.19])["verdict"] == "supported"
    assert paired([-0.20, -0.21, -0.19])["verdict"] == "contradicted"
    assert paired([0.5])["verdict"] == "needs ≥ 2 seeds"  # one seed: no spread, no verdict
    assert paired([0.1, float("nan"), 0.2])["verdict"] == "no value"
    assert sign_test([1] * 5) == pytest.approx(2 / 32) and sign_test([1, -1]) == 1.0 and sign_test([0, 0]) == 1.0


def _fake_scores(study, tc_gain, real_gain, synth_gain):
    """Per-seed scores.json files as evaluate.json / evaluate_downstream.json write them (only the read keys)."""
    from study_report import CLAIM1_METRICS

    for k in range(study.seeds):
        for v, gain in (("mgan", 0.0), ("tcmgan", tc_gain[k])):
            folder = study.table1_dir(k, v)
            folder.mkdir(parents=True)
            scores = {t: {m: {"mean": 0.5 + gain, "std": 0.1} for m in CLAIM1_METRICS} for t in ("flair", "t1", "t1ce")}
            (folder / "scores.json").write_text(json.dumps({"methods": {v: scores}}))
        for run, gain in (("t2", 0.0), ("synth_tcmgan", synth_gain[k]), ("real", real_gain[k])):
            folder = study.runs_dir(k) / "downstream" / run
            folder.mkdir(parents=True)
            (folder / "scores.json").write_text(json.dumps({m: {"mean": 0.6 + gain} for m in ("dice_wt", "slice_wt_dice")}))


def test_claims_are_answered_across_seeds_and_a_downstream_without_its_sanity_check_is_not_interpretable(tmp_path):
    from study_report import claims, claims_markdown, downstream_sanity, sanity_sentence

    study = Study("cpu_seeds", str(tmp_path / "a"))
    assert study.seeds == 3 and study.variants == ["mgan", "tcmgan", "tcmgan_bw"]
    gan, seg = study.gan_commands("mgan", 1)[0], study.segmenter_commands(1)[0]  # the GANs' own batch
    assert gan[gan.index("--batch_size") + 1] == "16" and seg[seg.index("--batch_size") + 1] == "32"
    _fake_scores(study, tc_gain=[0.05, 0.06, 0.04], real_gain=[0.2, 0.22, 0.18], synth_gain=[-0.01, 0.02, 0.0])
    answers = claims(study)
    assert answers["claim1"]["verdict"] == "supported" and len(answers["claim1"]["rows"]) == 7  # primary + 6
    assert answers["claim1"]["rows"][0]["differences"] == pytest.approx([0.05, 0.06, 0.04])  # mean over targets
    assert answers["claim2"]["sanity"]["verdict"] == "supported" and len(answers["claim2"]["rows"]) == 2
    assert answers["claim2"]["verdict"] == "not resolved at this budget"
    text = claims_markdown(answers)
    assert "Claim 1: the tumour-consistency loss keeps the tumour better** — verdict: **supported**" in text
    assert "| FLAIR tumour SSIM: TC-MGAN − MGAN | +0.050, +0.060, +0.040 |" in text and "(descriptive) |" in text
    assert "**Sanity check** passed" in sanity_sentence(downstream_sanity(study))

    study = Study("cpu_seeds", str(tmp_path / "b"))
    _fake_scores(study, tc_gain=[-0.05, -0.06, -0.04], real_gain=[0.01, -0.02, 0.0], synth_gain=[0.1, 0.1, 0.1])
    answers = claims(study)
    assert answers["claim1"]["verdict"] == "contradicted"
    assert answers["claim2"]["verdict"].startswith("not interpretable")  # 4 real not shown to beat the T2 alone
    assert "**Sanity check** FAILED" in sanity_sentence(downstream_sanity(study))


def test_a_curve_still_rising_in_its_last_third_is_told_apart_from_a_flat_one(tmp_path):
    from figures import curves_figure
    from study_report import curves_markdown, flattened, validation_curves

    assert flattened([(e, v) for e, v in enumerate([0.1, 0.5, 0.6, 0.6, 0.61, 0.6], 1)])[0] == "flattened"
    assert flattened([(e, v) for e, v in enumerate([0.1, 0.2, 0.3, 0.4, 0.5, 0.6], 1)])[0] == "still rising"
    assert flattened([(e, v) for e, v in enumerate([0.9, 0.8, 0.7, 0.6, 0.5, 0.4], 1)])[0] == "still falling"
    assert flattened([(1, 0.1), (2, 0.2)])[0] == "too short"
    study = Study("cpu_seeds", str(tmp_path), seeds=2)
    for k in range(2):
        folder = study.runs_dir(k) / "segmenter"
        folder.mkdir(parents=True)
        history = [{"epoch": e, "val_mean_dice": 0.1 * e} for e in range(1, 7)]
        (folder / "validation.json").write_text(json.dumps({"key_metric": "val_mean_dice", "history": history}))
    curves = validation_curves(study)
    assert list(curves) == ["segmenter S"] and len(curves["segmenter S"]["seeds"]) == 2
    assert "| segmenter S | val_mean_dice | 6 | +0.200 (still rising); +0.200 (still rising) |" in curves_markdown(curves)
    assert (tmp_path / "c.png").exists() is False and curves_figure(curves, str(tmp_path / "c.png"))
    assert (tmp_path / "c.png").stat().st_size > 5_000


def test_kept_records_let_a_study_resume_without_its_models(tmp_path):
    """``--keep_to``: the scores, curves and stage records without models, and without the records of the stages
    whose outputs are not kept (the data, the merged tables, the report): copied back, those stages run again."""
    from reproduce import main

    study = Study("cpu_seeds", str(tmp_path / "study"))
    _fake_scores(study, tc_gain=[0.05, 0.06, 0.04], real_gain=[0.2, 0.22, 0.18], synth_gain=[0.0, 0.0, 0.0])
    (study.runs_dir(0) / "mgan").mkdir(parents=True)
    (study.runs_dir(0) / "mgan" / "model.pt").write_bytes(b"weights")
    (study.runs_dir(0) / "mgan" / "validation.json").write_text("{}")
    for k in (0, 1):
        (study.table1_dir(k, "mgan") / "examples.npz").write_bytes(b"npz")
    for stage in ("phantoms", "segmenter_seed0", "gan_mgan_seed0", "table1", "report"):
        study.runner.record(stage, [], 1.0)
    main("cpu_seeds", str(study.root), keep_to=str(tmp_path / "kept"))
    kept = sorted(str(p.relative_to(tmp_path / "kept")) for p in (tmp_path / "kept").rglob("*") if p.is_file())
    assert "runs/seed0/mgan/validation.json" in kept and "table1/seed2/tcmgan/scores.json" in kept
    assert "runs/seed1/downstream/real/scores.json" in kept
    assert [k for k in kept if k.startswith("stages/")] == ["stages/gan_mgan_seed0.json", "stages/segmenter_seed0.json"]
    assert not any(k.endswith("model.pt") for k in kept)
    assert "table1/seed0/mgan/examples.npz" in kept and "table1/seed1/mgan/examples.npz" not in kept  # the figure's
