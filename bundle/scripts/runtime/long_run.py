"""Handlers for long training runs: a wall-time limit that stops cleanly, and a progress line every few minutes.

- :class:`TimeLimit` (``--time_limit SECONDS``): after the first iteration that ends past the limit, the trainer
  is terminated; the training checkpoint is then written (``Events.TERMINATE``,
  :class:`scripts.runtime.checkpoints.TrainingCheckpoint`) and ``model.pt`` too (``Events.COMPLETED``: the model
  selection's last pass, or :class:`scripts.runtime.checkpoints.ModelSaver`'s last state when nothing was saved
  yet), so ``--resume true`` continues the run and the folder always holds a usable model.
- :class:`ProgressReport` (``--progress_every SECONDS``): one log line every few minutes with the iterations
  done, the iterations per second since the last line, the time left (to the time limit, else to
  ``max_epochs``), and the latest model-selection figure (:class:`scripts.runtime.evaluation.MarginSelection`):
  the synthesis's margin over the better trivial baseline.
"""

from __future__ import annotations

import logging
import time

from ignite.engine import Engine, Events

logger = logging.getLogger(__name__)


def _duration(seconds: float) -> str:
    """``3725`` -> ``"1 h 02 min"``, ``125`` -> ``"2 min 05 s"``."""
    seconds = max(0, int(round(seconds)))
    if seconds >= 3600:
        return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"
    return f"{seconds // 60} min {seconds % 60:02d} s"


class TimeLimit:
    """Stop the trainer cleanly once ``seconds`` of wall time have passed since it started (this process's start:
    a resumed run gets the limit afresh). ``seconds`` <= 0 or None: no limit.

    The check runs after each iteration, so the run ends at most one iteration (plus the checkpoint and the model
    selection's last pass) after the limit.
    """

    def __init__(self, seconds: float | None):
        self.seconds = float(seconds or 0)
        self.start = time.monotonic()

    def left(self) -> float | None:
        """Seconds left before the limit (None without a limit)."""
        return None if self.seconds <= 0 else self.seconds - (time.monotonic() - self.start)

    def attach(self, engine: Engine) -> None:
        if self.seconds <= 0:
            return
        engine.add_event_handler(Events.STARTED, self._started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._check)

    def _started(self, engine: Engine) -> None:
        self.start = time.monotonic()

    def _check(self, engine: Engine) -> None:
        if self.left() <= 0:
            logger.info(f"time limit of {_duration(self.seconds)} reached at iteration {engine.state.iteration} "
                        f"(epoch {engine.state.epoch}): writing the checkpoint and model.pt, then stopping; "
                        "--resume true continues the run")
            engine.terminate()


class ProgressReport:
    """One ``progress:`` log line every ``every`` seconds (and at the end): iterations done, iterations/s since the
    last line, time left, and the latest model-selection margins.

    Args:
        every: seconds between lines (<= 0: none).
        time_limit: the run's :class:`TimeLimit` (for the time left), or None.
        selection: the run's :class:`scripts.runtime.evaluation.MarginSelection`, or None (its ``summary()`` is
            the latest validation figure beside the better baseline's).
    """

    def __init__(self, every: float = 300, time_limit: TimeLimit | None = None, selection=None):
        self.every = float(every or 0)
        self.time_limit = time_limit
        self.selection = selection
        self._mark = (time.monotonic(), 0)

    def attach(self, engine: Engine) -> None:
        if self.every <= 0:
            return
        engine.add_event_handler(Events.STARTED, self._started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._maybe_report)
        engine.add_event_handler(Events.COMPLETED, self._final)

    def _started(self, engine: Engine) -> None:
        self._mark = (time.monotonic(), engine.state.iteration)

    def _final(self, engine: Engine) -> None:
        if engine.state.iteration > self._mark[1]:  # iterations since the last line
            self.report(engine)

    def _maybe_report(self, engine: Engine) -> None:
        if time.monotonic() - self._mark[0] >= self.every:
            self.report(engine)

    def line(self, engine: Engine) -> str:
        """The progress line for the engine's current state."""
        now, it = time.monotonic(), engine.state.iteration
        rate = (it - self._mark[1]) / max(now - self._mark[0], 1e-9)
        total = (engine.state.max_epochs or 0) * (engine.state.epoch_length or 0)
        parts = [f"progress: iteration {it}" + (f" of {total}" if total else ""), f"{rate:.2f} it/s"]
        left = self.time_limit.left() if self.time_limit is not None else None
        to_end = (total - it) / rate if total and rate > 0 else None
        if left is not None and (to_end is None or left < to_end):
            parts.append(f"{_duration(left)} left (time limit)")
        elif to_end is not None:
            parts.append(f"{_duration(to_end)} left (max_epochs)")
        summary = self.selection.summary() if self.selection is not None else ""
        if summary:
            parts.append(summary)
        return "; ".join(parts)

    def report(self, engine: Engine) -> None:
        logger.info(self.line(engine))
        self._mark = (time.monotonic(), engine.state.iteration)
