"""Checkpoints: atomic writes, safe loads (``weights_only=True``) with clear errors, and two Ignite handlers.

- :class:`TrainingCheckpoint` saves everything needed to resume (networks, optimizers, LR schedulers, the
  trainer's epoch/iteration) to one file, atomically (temp file + rename), every epoch and optionally every
  N iterations; with ``resume=True`` it restores that file before training starts.
- :class:`ModelSaver` writes the generator alone as a plain ``state_dict`` (``model.pt``, what the model-zoo
  tools, inference and MONAI Label load): after each epoch whose validation score is the best so far, or
  after every epoch when there is no validation.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Mapping

import torch
from ignite.engine import Engine, Events

from .networks import VARIANTS, SynthesisNet, TumourSegmenter

logger = logging.getLogger(__name__)


def save_atomic(obj, path: str) -> None:
    """``torch.save`` to a temporary file in the same folder, then rename: a kill never leaves a truncated file."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp_", suffix=".pt", dir=folder)
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes the file private; give it the usual permissions
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def load_checkpoint(path: str, map_location="cpu") -> dict:
    """Load a checkpoint with ``weights_only=True`` (no arbitrary pickle code runs).

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: the file is not a readable PyTorch checkpoint of tensors and plain values.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # corrupt zip, truncated file, or pickled objects other than tensors/containers
        raise ValueError(f"{path} is not a readable weights-only PyTorch checkpoint ({type(e).__name__}: {e})") from e
    if not isinstance(state, Mapping):
        raise ValueError(f"{path} holds a {type(state).__name__}, not a state dict")
    return dict(state)


def _arch(state: Mapping, path: str, what: str) -> list[int]:
    if "arch" not in state:
        raise ValueError(f"{path} is not a {what} checkpoint of this bundle (no 'arch' entry)")
    return [int(v) for v in state["arch"].tolist()]


def synthesis_arch(path: str) -> dict:
    """``{"variant", "features", "num_targets", "num_downs"}`` recorded in a generator checkpoint (model.pt)."""
    state = load_checkpoint(path)
    variant, features, num_targets, num_downs = _arch(state, path, "generator (SynthesisNet)")
    return {"variant": VARIANTS[variant], "features": features, "num_targets": num_targets, "num_downs": num_downs}


def load_synthesis_weights(network: SynthesisNet, path: str) -> SynthesisNet:
    """Load ``model.pt`` into ``network``; a checkpoint of another variant or width gets an error saying which."""
    state = load_checkpoint(path, map_location=network.arch.device)
    found = synthesis_arch(path)
    want = {"variant": network.variant, "features": int(network.arch[1]), "num_targets": network.num_targets}
    wrong = [f"{k} {found[k]!r} (config asks {v!r})" for k, v in want.items() if found[k] != v]
    if wrong:
        raise ValueError(f"{path} does not match the configured generator: checkpoint has " + ", ".join(wrong))
    network.load_state_dict(state)
    return network


def load_segmenter(path: str, device="cpu") -> TumourSegmenter:
    """Rebuild S at the width it was trained with (read from the checkpoint) and load its weights."""
    state = load_checkpoint(path, map_location=device)
    if "model" in state and isinstance(state["model"], Mapping):
        state = state["model"]
    features, num_targets = _arch(state, path, "segmenter (TumourSegmenter)")
    net = TumourSegmenter(features=features, num_targets=num_targets)
    net.load_state_dict(state)
    return net.to(device)


class TrainingCheckpoint:
    """Save/restore the full training state atomically.

    Args:
        save_dict: ``{name: object with state_dict()/load_state_dict()}`` (None values are skipped); the engine
            it is attached to is added as ``"trainer"`` (epoch, iteration).
        path: checkpoint file.
        iteration_interval: also save every this many iterations (0: only at epoch ends).
        resume: restore from ``path`` when training starts (an error if ``path`` does not exist).
    """

    def __init__(self, save_dict: dict, path: str, iteration_interval: int = 0, resume: bool = False):
        self.save_dict = {k: v for k, v in save_dict.items() if v is not None}
        self.path = path
        self.iteration_interval = iteration_interval
        self.resume = resume

    def attach(self, engine: Engine) -> None:
        self.save_dict.setdefault("trainer", engine)
        if self.resume:
            engine.add_event_handler(Events.STARTED, self.load)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.save)
        if self.iteration_interval > 0:
            engine.add_event_handler(Events.ITERATION_COMPLETED(every=self.iteration_interval), self.save)

    def save(self, engine: Engine | None = None) -> None:
        save_atomic({k: v.state_dict() for k, v in self.save_dict.items()}, self.path)

    def load(self, engine: Engine | None = None) -> None:
        state = load_checkpoint(self.path)
        missing = [k for k in self.save_dict if k not in state]
        if missing:
            raise ValueError(f"{self.path} cannot resume this run: it lacks {missing} (has {sorted(state)})")
        max_epochs = engine.state.max_epochs if engine is not None else None
        for k, obj in self.save_dict.items():
            obj.load_state_dict(state[k])
        if engine is not None:
            if max_epochs is not None and max_epochs > engine.state.max_epochs:
                engine.state.max_epochs = max_epochs  # a resumed run may be asked to train longer
            logger.info(f"resumed from {self.path} at epoch {engine.state.epoch}, iteration {engine.state.iteration}")


class ModelSaver:
    """Write ``network.state_dict()`` atomically to ``path`` at the end of each epoch whose validation is the
    best so far (``evaluator`` given: its ``best_metric_epoch`` equals the trainer's epoch), or of every epoch
    (no evaluator). Attach it after the ``ValidationHandler`` so that validation has run."""

    def __init__(self, network: torch.nn.Module, path: str, evaluator: Engine | None = None):
        self.network, self.path, self.evaluator = network, path, evaluator

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        if self.evaluator is not None and getattr(self.evaluator.state, "best_metric_epoch", -1) != engine.state.epoch:
            return
        net = getattr(self.network, "module", self.network)  # unwrap DDP
        save_atomic(net.state_dict(), self.path)
