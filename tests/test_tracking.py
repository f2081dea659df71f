"""Specification of experiment tracking, bundle/scripts/runtime/tracking.py: ``--tracking mlflow`` (MONAI's built-in
MLflow settings) with a local SQLite store, for training, segmenter pre-training, inference and validation.

Each run goes through ``ConfigWorkflow(..., tracking="mlflow")``, what ``python -m monai.bundle run ...
--tracking mlflow`` builds; the store is then read back with MLflow's own client.
"""

from __future__ import annotations

import json

import pytest
from conftest import TINY, run_workflow

from scripts.runtime.trainer import LOSS_KEYS

mlflow = pytest.importorskip("mlflow", reason="tracking needs mlflow-skinny (requirements-dev.txt)")


def only_run(tracking_uri: str):
    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    experiment = client.get_experiment_by_name("monai_experiment")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1
    return client, runs[0]


def test_gan_training_logs_params_loss_terms_and_validation_metrics(phantom_dir, tmp_path):
    uri = f"sqlite:///{tmp_path}/store/mlruns.db"  # --tracking_uri: any local SQLite file
    (tmp_path / "store").mkdir()
    settings = {**TINY, "max_epochs": 2, "epoch_length": 4, "log_every": 2}
    run_workflow(
        "train.json", dataset_dir=str(phantom_dir), output_dir=str(tmp_path), variant="mgan", tracking="mlflow",
        tracking_uri=uri, **settings,
    )
    client, run = only_run(uri)
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["max_epochs"] == "2" and params["epoch_length"] == "4"
    assert params["variant"] == "mgan" and params["features"] == str(TINY["features"])
    assert float(params["lambda_l1"]) == 0.1 and params["loss_reduction"] == "sum"
    # every loss term of every log_every-th iteration, and the validation metrics of every epoch
    trained = {k for k in LOSS_KEYS if k != "s_loss"}  # s_loss: tcmgan_bw only
    assert trained <= run.data.metrics.keys()
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "g_loss")]
    assert steps == [2, 4, 6, 8]
    for metric in ("val_psnr", "val_ssim"):
        assert [m.step for m in client.get_metric_history(run.info.run_id, metric)] == [1, 2]
    assert 0 < run.data.metrics["val_psnr"] < 100


def test_default_store_is_in_the_output_dir(phantom_dir, tmp_path):
    """Without --tracking_uri the store is <output_dir>/mlruns.db; the segmenter's SupervisedTrainer output is
    what MONAI's default handler reads (its Dice loss as train_loss)."""
    run_workflow(
        "train_segmenter.json", dataset_dir=str(phantom_dir), output_dir=str(tmp_path), tracking="mlflow", **TINY
    )
    _, run = only_run(f"sqlite:///{tmp_path}/mlruns.db")
    assert {"train_loss", "val_mean_dice"} <= run.data.metrics.keys()
    assert run.data.params["max_epochs"] == "1"


def test_inference_run_is_tracked(phantom_dir, tcmgan_ckpt, tmp_path):
    out = tmp_path / "out"
    run_workflow(
        "inference.json", workflow_type="infer", dataset_dir=str(phantom_dir), ckpt_path=str(tcmgan_ckpt),
        output_dir=str(out), device="cpu", tracking="mlflow",
    )
    _, run = only_run(f"sqlite:///{out}/mlruns.db")
    assert run.info.status == "FINISHED"
    assert run.data.params["epoch_length"] == "2"  # the two cases of the test split
    assert len(list(out.glob("*_flair.nii.gz"))) == 2


def test_evaluation_run_logs_the_validation_metrics(phantom_dir, generator_ckpt, tmp_path):
    """train.json + validate.json: the shipped (here: a features-4) generator on the validation cases."""
    run_workflow(
        ["train.json", "validate.json"], dataset_dir=str(phantom_dir), output_dir=str(tmp_path),
        ckpt_path=str(generator_ckpt),
        tracking="mlflow", min_brain_pixels=TINY["min_brain_pixels"], val_num_cases=1, cache_num_workers=0,
    )
    _, run = only_run(f"sqlite:///{tmp_path}/mlruns.db")
    assert {"val_psnr", "val_ssim"} <= run.data.metrics.keys()
    assert run.data.params["max_epochs"] == "1"


def test_validation_history_keeps_every_validation_and_the_best(tmp_path):
    from ignite.engine import Engine

    from scripts.runtime.tracking import ValidationHistory

    path = tmp_path / "run" / "validation.json"
    history = ValidationHistory(str(path))
    engine = Engine(lambda e, b: None)
    engine.state.key_metric_name = "val_mean_dice"
    for epoch, dice in ((1, 0.2), (2, 0.6), (3, 0.4)):
        engine.state.epoch, engine.state.metrics = epoch, {"val_mean_dice": dice, "other": 1.0}
        history(engine)
    saved = json.loads(path.read_text())
    assert [h["val_mean_dice"] for h in saved["history"]] == [0.2, 0.6, 0.4]
    assert saved["best"]["epoch"] == 2 and saved["last"]["epoch"] == 3 and saved["key_metric"] == "val_mean_dice"
    restarted = ValidationHistory(str(path))  # a new run into the same folder starts the file again
    engine.state.epoch, engine.state.metrics = 2, {"val_mean_dice": 0.1}
    restarted(engine)
    assert [h["epoch"] for h in json.loads(path.read_text())["history"]] == [2]
    again = ValidationHistory(str(path))
    for epoch, dice in ((1, 0.2), (2, 0.6), (3, 0.4)):
        engine.state.epoch, engine.state.metrics = epoch, {"val_mean_dice": dice}
        again(engine)
    resumed = ValidationHistory(str(path), resume=True)  # a run resumed after epoch 2 keeps epochs 1-2, replaces 3
    engine.state.epoch, engine.state.metrics = 3, {"val_mean_dice": 0.7}
    resumed(engine)
    saved = json.loads(path.read_text())
    assert [h["epoch"] for h in saved["history"]] == [1, 2, 3] and saved["best"]["val_mean_dice"] == 0.7
