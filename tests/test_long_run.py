"""Long training runs: the wall-time limit, timed checkpoints and resuming after a kill, the progress line, model
selection by the margin over the trivial baselines on held-out cases, and bf16 training (``precision``)."""

from __future__ import annotations

import json
import math
import time

import pytest
import torch
from conftest import TINY, train_workflow
from ignite.engine import Engine, Events

from scripts.runtime import long_run, precision
from scripts.runtime.checkpoints import TrainingCheckpoint, load_checkpoint
from scripts.runtime.evaluation import (
    SELECTION_GOALS,
    SELECTION_SCENARIOS,
    format_margins,
    selection_margins,
    selection_score,
)
from scripts.runtime.losses import critic_loss, generator_loss
from scripts.runtime.networks import ModalityCritic, SynthesisNet


# --- the time limit -----------------------------------------------------------------------------------------------


def test_the_time_limit_stops_the_run_cleanly_with_checkpoint_and_model_written(phantom_dir, tmp_path):
    wf = train_workflow(phantom_dir, tmp_path, "mgan", max_epochs=50, epoch_length=4, time_limit=1e-6,
                        val_interval=100)  # fmt: skip
    trainer = wf.parser.get_parsed_content("train#trainer")
    wf.run()
    assert trainer.state.iteration == 1  # stopped after the first iteration past the limit
    saved = load_checkpoint(str(tmp_path / "mgan" / "checkpoint.pt"))
    assert saved["trainer"]["iteration"] == 1  # the checkpoint holds where it stopped
    assert (tmp_path / "mgan" / "model.pt").is_file()  # never validated, still a model


def test_time_limit_left_counts_down_and_none_means_no_limit():
    limit = long_run.TimeLimit(100)
    assert 99 < limit.left() <= 100
    assert long_run.TimeLimit(0).left() is None and long_run.TimeLimit(None).left() is None


# --- timed checkpoints and resuming after a kill ------------------------------------------------------------------


def test_a_checkpoint_is_written_once_its_time_interval_has_passed(tmp_path):
    net = torch.nn.Linear(2, 2)
    engine = Engine(lambda e, b: time.sleep(0.02))
    saves = []
    ckpt = TrainingCheckpoint({"net": net}, str(tmp_path / "c.pt"), time_interval=0.05)
    ckpt.attach(engine)
    engine.add_event_handler(Events.ITERATION_COMPLETED, lambda e: saves.append(ckpt.last_save))
    engine.run(range(10), max_epochs=1)
    distinct = len(set(saves))
    assert 3 <= distinct <= 6  # about every third iteration of 20 ms, not every one, not only at the end


def test_a_killed_run_resumes_from_its_last_timed_checkpoint(phantom_dir, tmp_path):
    """The run is 'killed' (an exception, as a SIGKILL would leave things) after its 3rd iteration; the timed
    checkpoint written after each iteration (interval 0.0001 s) is where --resume continues."""
    wf = train_workflow(phantom_dir, tmp_path, "mgan", max_epochs=2, epoch_length=4, checkpoint_seconds=1e-4,
                        checkpoint_every=0)  # fmt: skip
    trainer = wf.parser.get_parsed_content("train#trainer")

    @trainer.on(Events.ITERATION_COMPLETED(once=3))
    def _kill(engine):
        raise KeyboardInterrupt("killed")

    with pytest.raises(KeyboardInterrupt):
        wf.run()
    assert load_checkpoint(str(tmp_path / "mgan" / "checkpoint.pt"))["trainer"]["iteration"] == 3
    wf = train_workflow(phantom_dir, tmp_path, "mgan", max_epochs=2, epoch_length=4, resume=True)
    trainer = wf.parser.get_parsed_content("train#trainer")
    first = []
    trainer.add_event_handler(Events.ITERATION_STARTED(once=4), lambda e: first.append(e.state.iteration))
    wf.run()
    assert trainer.state.iteration == 8 and first == [4]  # iterations 4..8 ran, 1..3 were not repeated


# --- the progress line ----------------------------------------------------------------------------------------------


def test_the_progress_line_says_iterations_rate_time_left_and_the_selection():
    class Selection:
        def summary(self):
            return "selection at iteration 4: FLAIR +0.10 dB / +0.010 / +0.020 over the better baseline"

    engine = Engine(lambda e, b: None)
    report = long_run.ProgressReport(every=1, time_limit=long_run.TimeLimit(600), selection=Selection())
    engine.state.iteration, engine.state.max_epochs, engine.state.epoch_length = 10, 100, 50
    report._mark = (time.monotonic() - 5, 0)
    line = report.line(engine)
    assert line.startswith("progress: iteration 10 of 5000; 2.00 it/s")
    assert "left (time limit)" in line and "FLAIR +0.10 dB" in line


def test_the_training_run_logs_progress_lines(phantom_dir, tmp_path, capfd):
    train_workflow(phantom_dir, tmp_path, "mgan", run=True, progress_every=1e-6)
    lines = [line.split(" - INFO - ")[-1] for line in capfd.readouterr().out.splitlines() if "progress: " in line]
    assert [line.split(";")[0] for line in lines] == [f"progress: iteration {i} of {TINY['epoch_length']}"
                                                      for i in range(1, TINY["epoch_length"] + 1)]


# --- model selection by the margin over the baselines ---------------------------------------------------------------


def _rows(synthesis: float, t2: float, inverted: float) -> list[dict]:
    rows = []
    for method, value in (("synthesis", synthesis), ("t2", t2), ("inverted_t2", inverted)):
        for target in ("flair", "t1", "t1ce"):
            rows.append({"method": method, "target": target, "protocol_psnr": 10 * value,
                         "protocol_ssim_axial": value, "protocol_ssim_tumour": value})
    return rows


def test_margins_are_taken_against_the_better_baseline_and_the_score_is_the_worst_in_goal_units():
    margins = selection_margins(_rows(0.8, 0.7, 0.75))
    m = margins["t1"]["protocol_psnr"]
    assert m["baseline"] == "inverted_t2" and m["margin"] == pytest.approx(0.5)
    # all 9 margins positive; the worst in goal units is PSNR's 0.5 dB of 3 dB
    assert selection_score(margins) == pytest.approx(9 + (1 + math.tanh(0.5 / SELECTION_GOALS["protocol_psnr"])) / 4)
    assert 0 < selection_score(selection_margins(_rows(0.6, 0.7, 0.75))) < 0.5  # none beaten


def test_beating_the_baseline_on_more_metrics_outranks_a_better_worst_margin():
    eight = selection_margins(_rows(0.8, 0.7, 0.75))
    eight["flair"]["protocol_ssim_tumour"]["margin"] = -0.2  # one metric lost, badly
    seven = selection_margins(_rows(0.8, 0.7, 0.75))
    for metric in ("protocol_ssim_axial", "protocol_ssim_tumour"):
        seven["t1"][metric]["margin"] = -0.001  # two metrics lost, narrowly
    assert 8 < selection_score(eight) < 8.5 and 7 < selection_score(seven) < 7.5


def test_scenario_margins_take_the_better_of_every_available_modality_and_its_inversion():
    rows = []
    for method, value in (("synthesis", 0.8), ("flair", 0.6), ("inverted flair", 0.7), ("t2", 0.85),
                          ("inverted t2", 0.5)):  # fmt: skip
        rows.append({"method": method, "target": "missing_t1", "protocol_psnr": 10 * value,
                     "protocol_ssim_axial": value, "protocol_ssim_tumour": value})
    margins = selection_margins(rows)
    assert set(margins) == {"missing_t1"}
    m = margins["missing_t1"]["protocol_ssim_axial"]
    assert m["baseline"] == "t2" and m["margin"] == pytest.approx(-0.05)
    assert format_margins(margins).startswith("T1 (from FLAIR, T1ce, T2) -0.50 dB / -0.050")
    assert 0 < selection_score(margins) < 0.5  # the one task lost on all three metrics


def test_an_any_missing_run_is_selected_on_the_three_to_one_scenarios(phantom_dir, segmenter_run, tmp_path):
    wf = train_workflow(phantom_dir, tmp_path, "anymissing", max_epochs=1, epoch_length=2,
                        segmenter_ckpt=str(segmenter_run / "segmenter" / "model.pt"),
                        select_dataset_dir=str(phantom_dir), select_split="gan", select_interval=2)  # fmt: skip
    selection = wf.parser.get_parsed_content("selection")
    selection.cases = selection.cases[:1]
    wf.run()
    history = json.loads((tmp_path / "anymissing" / "selection.json").read_text())
    assert [h["iteration"] for h in history] == [2] and history[0]["saved"]
    assert tuple(history[0]["margins"]) == SELECTION_SCENARIOS
    for scenario, metrics in history[0]["margins"].items():
        missing = scenario.removeprefix("missing_")
        # the better baseline is an available modality or its inversion, never the missing one
        assert all(m["baseline"].split()[-1] != missing for m in metrics.values()) and "protocol_psnr" in metrics
    assert (tmp_path / "anymissing" / "model.pt").is_file()


def test_training_with_held_out_cases_selects_by_margin_and_keeps_a_history(phantom_dir, tmp_path):
    wf = train_workflow(phantom_dir, tmp_path, "mgan", max_epochs=2, epoch_length=2, select_dataset_dir=str(phantom_dir),
                        select_split="gan", select_interval=2)  # fmt: skip
    selection = wf.parser.get_parsed_content("selection")
    selection.cases = selection.cases[:1]  # one case keeps the test fast
    wf.run()
    history = json.loads((tmp_path / "mgan" / "selection.json").read_text())
    assert [h["iteration"] for h in history] == [2, 4]
    assert history[0]["saved"] and set(history[0]["margins"]) == {"flair", "t1", "t1ce"}
    best = max(history, key=lambda h: h["score"])
    assert [h["saved"] for h in history] == [True, history[1]["score"] > history[0]["score"]]
    assert (tmp_path / "mgan" / "model.pt").is_file() and best["saved"]


def test_the_weight_average_warms_up_then_decays_and_is_off_at_zero():
    from scripts.runtime.trainer import WeightAverage

    net = torch.nn.Linear(2, 1, bias=False)
    off = WeightAverage(net, 0.0)
    assert off.scored is net and off.average is None
    with pytest.raises(ValueError, match="ema_decay"):
        WeightAverage(net, 1.0)
    ema = WeightAverage(net, 0.5)
    weights = []
    for value in (1.0, 3.0, 5.0):
        with torch.no_grad():
            net.weight.fill_(value)
        ema.update()
        weights.append(float(ema.scored.weight[0, 0]))
    # update 1 copies; update 2 (n = 1): rate 1 - min(0.5, 2/11) = 9/11; update 3 (n = 2): rate 1 - 0.25 = 0.75
    second = 1 + (3 - 1) * 9 / 11
    assert weights == pytest.approx([1.0, second, second + (5 - second) * 0.75])
    assert ema.scored is not net and net.weight.detach()[0, 0].item() == 5.0  # training keeps the raw weights


def test_with_a_weight_average_the_average_is_selected_saved_and_resumed(phantom_dir, tmp_path):
    from scripts.runtime.checkpoints import load_model

    settings = dict(max_epochs=2, epoch_length=2, select_dataset_dir=str(phantom_dir), select_split="gan",
                    select_interval=2, select_keep=True, ema_decay=0.9, checkpoint_every=2)
    wf = train_workflow(phantom_dir, tmp_path, "mgan", **settings)
    wf.parser.get_parsed_content("selection").cases = wf.parser.get_parsed_content("selection").cases[:1]
    average = wf.parser.get_parsed_content("generator_average")
    assert wf.parser.get_parsed_content("selection").network is average.scored
    wf.run()
    raw = wf.parser.get_parsed_content("network").state_dict()
    saved = load_checkpoint(str(tmp_path / "mgan" / "checkpoint.pt"))
    assert int(saved["generator_average"]["n_averaged"]) == 4
    # the generator the last pass scored and kept is the average, not the raw generator
    kept = load_model(str(tmp_path / "mgan" / "selection" / "iteration_4.pt"), "cpu").state_dict()
    name = next(k for k, v in raw.items() if v.is_floating_point() and v.dim() > 1)
    assert torch.equal(kept[name], average.scored.state_dict()[name].cpu())
    assert not torch.equal(kept[name], raw[name].cpu())
    wf = train_workflow(phantom_dir, tmp_path, "mgan", resume=True, **{**settings, "max_epochs": 3})
    wf.parser.get_parsed_content("selection").cases = wf.parser.get_parsed_content("selection").cases[:1]
    wf.run()
    assert int(wf.parser.get_parsed_content("generator_average").average.n_averaged) == 6  # 4 restored, 2 more


def test_without_held_out_cases_there_is_no_selection(phantom_dir, tmp_path):
    wf = train_workflow(phantom_dir, tmp_path, "mgan", run=True)
    assert wf.parser.get_parsed_content("selection").cases == []
    assert not (tmp_path / "mgan" / "selection.json").exists() and (tmp_path / "mgan" / "model.pt").is_file()


def test_the_segmenter_pretraining_runs_with_the_long_run_handlers(phantom_dir, tmp_path):
    from conftest import run_workflow

    run_workflow("train_segmenter.json", dataset_dir=str(phantom_dir), output_dir=str(tmp_path),
                 **{**TINY, "time_limit": 3600, "progress_every": 1e-6})  # fmt: skip
    assert (tmp_path / "segmenter" / "model.pt").is_file()


# --- bf16 training ----------------------------------------------------------------------------------------------------


def test_training_precision_auto_follows_native_support(monkeypatch):
    monkeypatch.setattr(precision, "native_bf16", lambda: True)
    assert precision.training_precision("auto", "cpu") == "bf16"
    monkeypatch.setattr(precision, "native_bf16", lambda: False)
    assert precision.training_precision("auto", "cpu") == "fp32"
    assert precision.training_precision("bf16", "cpu") == "bf16" and precision.training_precision("fp32", "cuda") == "fp32"
    with pytest.raises(ValueError, match="precision"):
        precision.training_precision("fp16", "cpu")


def test_a_bf16_gan_step_matches_fp32_within_tolerance():
    """Same weights, batch and random draws: the critic and generator losses (gradient penalty included) and the
    generator's gradient under bf16 autocast agree with fp32's to bf16's precision (a few per cent)."""
    torch.manual_seed(0)
    g, d = SynthesisNet("tcmgan", features=8, in_channels=3, upsample="resize"), ModalityCritic(features=8)
    x = torch.rand(4, 3, 128, 128) * 2 - 1
    y, k = torch.rand(4, 1, 128, 128) * 2 - 1, torch.tensor([0, 1, 2, 0])
    results = {}
    for name in ("fp32", "bf16"):
        torch.manual_seed(1)  # the gradient penalty's draw
        g.zero_grad()
        with precision.autocast(name, "cpu"):
            fake = g(x, labels=k)
            d_loss, d_terms = critic_loss(d, x[:, 1:2], y, fake, k, 10.0, 100.0)
            g_loss, _ = generator_loss(d, x[:, 1:2], y, fake, k, 10.0, 0.1, 50.0)
        g_loss.backward()
        grad = torch.cat([p.grad.flatten() for p in g.parameters() if p.grad is not None])
        results[name] = (fake.float().detach(), float(d_terms["d_gp"]), float(d_loss), float(g_loss), grad)
    (f32, gp32, dl32, gl32, gr32), (f16, gp16, dl16, gl16, gr16) = results["fp32"], results["bf16"]
    assert f16.dtype == torch.float32 and (f16 - f32).abs().max() < 0.05
    assert gp16 == pytest.approx(gp32, rel=0.05, abs=1e-3)
    assert dl16 == pytest.approx(dl32, rel=0.05, abs=0.5) and gl16 == pytest.approx(gl32, rel=0.05, abs=0.5)
    cosine = torch.nn.functional.cosine_similarity(gr16, gr32, dim=0)
    assert cosine > 0.97  # measured 0.984 (features 8, batch 4); fp32 vs fp32 with another GP draw: see docs


def test_score_checkpoints_scores_a_paper_and_an_any_missing_generator_by_their_tasks(
    phantom_dir, generator_ckpt, tmp_path, monkeypatch, capsys
):
    """``tools/score_checkpoints.py``: the paper generator by target, the any-missing one by scenario, each with
    its own baselines whichever comes first."""
    from conftest import REPO

    from scripts.runtime.conventions import TARGETS
    from scripts.runtime.networks import AnyMissingNet

    monkeypatch.syspath_prepend(str(REPO / "tools"))
    import score_checkpoints

    torch.manual_seed(0)
    anymissing = tmp_path / "anymissing.pt"
    torch.save(AnyMissingNet(features=4).state_dict(), anymissing)
    paper = str(generator_ckpt)
    for order in ([paper, str(anymissing)], [str(anymissing), paper]):
        out = tmp_path / "scores.json"
        results = score_checkpoints.score(str(phantom_dir), order, output=str(out))
        assert tuple(results[paper]["margins"]) == TARGETS
        assert tuple(results[str(anymissing)]["margins"]) == SELECTION_SCENARIOS
        for result in results.values():
            assert math.isfinite(result["score"])
            for metrics in result["margins"].values():  # every task beside its baselines (the small phantoms
                assert {"protocol_psnr", "protocol_ssim_tumour"} <= set(metrics)  # have no slice for axial SSIM)
        assert json.loads(out.read_text()).keys() == results.keys()
    table = capsys.readouterr().out
    assert "| T1 (from FLAIR, T1ce, T2) | " in table and "| n/a |" in table  # the missing axial SSIM keeps its column
