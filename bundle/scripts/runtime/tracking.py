"""Experiment tracking of the GAN trainer (``python -m monai.bundle run ... --tracking mlflow``).

MONAI's ``--tracking mlflow`` appends an ``MLFlowHandler`` to ``train#handlers`` (and to ``validate#handlers``)
whose output transform reads ``loss`` from the first item of a decollated output, which is what
``SupervisedTrainer`` returns, so the segmenter pre-training is tracked as it is. The TC-MGAN iteration returns
one dict of named loss terms (:data:`scripts.runtime.trainer.LOSS_KEYS`) instead; :func:`log_loss_terms` points the
trainer's MLflow handlers at those terms and adds the run's hyper-parameters to what they log.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from monai.handlers import MLFlowHandler


def log_loss_terms(
    handlers: Sequence, output_transform: Callable, params: Mapping | None = None, iteration_log=True
) -> list:
    """The trainer's handlers, with every ``MLFlowHandler`` among them set to log ``output_transform(output)``
    (a ``{name: float}`` dict) on the iterations ``iteration_log`` selects (``True``: every one; or an event filter
    ``(engine, iteration) -> bool``, ``train.json`` logs every ``log_every``) and ``params`` once, as MLflow
    parameters, when training starts.

    Handlers of other types (and ``None`` entries, which are dropped) pass through; with no MLflow handler (no
    ``--tracking``) this is the list itself.
    """
    handlers = [h for h in handlers if h is not None]
    for handler in handlers:
        if isinstance(handler, MLFlowHandler):
            handler.output_transform = output_transform
            handler.iteration_log = iteration_log
            if params:
                handler.experiment_param = {**dict(params), **(handler.experiment_param or {})}
    return handlers
