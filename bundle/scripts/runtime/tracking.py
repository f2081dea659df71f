"""Experiment tracking: every run's validation history in its run folder, and MLflow for the GAN trainer.

- :class:`ValidationHistory`: the validation metrics of every epoch, and the best, in ``<run>/validation.json``
  (what a report reads: e.g. the segmenter's validation Dice in ``reproduce.py``'s ``results.md``).
- :func:`log_loss_terms` (``python -m monai.bundle run ... --tracking mlflow``), below.

MONAI's ``--tracking mlflow`` appends an ``MLFlowHandler`` to ``train#handlers`` (and to ``validate#handlers``)
whose output transform reads ``loss`` from the first item of a decollated output, which is what
``SupervisedTrainer`` returns, so the segmenter pre-training is tracked as it is. The TC-MGAN iteration returns
one dict of named loss terms (:data:`scripts.runtime.trainer.LOSS_KEYS`) instead; :func:`log_loss_terms` points the
trainer's MLflow handlers at those terms and adds the run's hyper-parameters to what they log.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Mapping, Sequence

import torch
from ignite.engine import Engine, Events
from monai.handlers import MLFlowHandler

from .files import write_json


class ValidationHistory:
    """Evaluator handler: after each validation, write ``path`` (JSON) with every validation so far,
    ``{"history": [{"epoch": e, <metric>: value, ...}, ...], "key_metric": name, "best": {...}, "last": {...}}``,
    where ``best`` is the entry with the highest key metric (the evaluator's first metric when it names none).
    Written atomically, by rank 0 only in a distributed run. With ``resume``, the entries of the file's earlier
    epochs (those before this run's first validation) are kept; otherwise a new run replaces the file.
    """

    def __init__(self, path: str, resume: bool = False):
        self.path = path
        self.resume = bool(resume)
        self.history: list[dict] | None = None

    def _earlier(self, epoch: int) -> list[dict]:
        try:
            with open(self.path) as f:
                return [h for h in json.load(f).get("history", []) if int(h.get("epoch", epoch)) < epoch]
        except (OSError, ValueError, TypeError, AttributeError):
            return []

    def attach(self, engine: Engine) -> None:
        if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_rank():
            return
        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        metrics = {k: float(v) for k, v in engine.state.metrics.items() if isinstance(v, (int, float))}
        if not metrics:
            return
        if self.history is None:
            self.history = self._earlier(int(engine.state.epoch)) if self.resume else []
        self.history.append({"epoch": int(engine.state.epoch), **metrics})
        key = getattr(engine.state, "key_metric_name", None) or next(iter(metrics))
        scored = [h for h in self.history if math.isfinite(h.get(key, float("nan")))]
        best = max(scored, key=lambda h: h[key]) if scored else None
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        write_json(self.path, {"key_metric": key, "best": best, "last": self.history[-1], "history": self.history},
                   indent=2)  # fmt: skip


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
