"""Checkpoints: atomic writes, safe loads (``weights_only=True``) with clear errors, and two Ignite handlers.

- :func:`save_atomic` writes to a temporary file next to the target and renames it (a kill never truncates a
  checkpoint); :func:`load_checkpoint` refuses pickled code and names a corrupt or truncated file;
  :func:`checkpoint_kind` / :func:`describe` say what a file holds, so that a generator, segmenter, critic or
  training checkpoint given in the wrong place, or one of another variant or width, gets an error saying which.
- :func:`read_model` reads what a ``model.pt`` is (a paper generator, an any-missing generator, the segmenter: its
  settings, and the modalities a generator reads and writes); :func:`load_model` builds and loads it (or loads it
  into a given ``network_def`` after checking that it matches). Every workflow, tool and MONAI Label use these two.
- :class:`TrainingCheckpoint` saves everything needed to resume (networks, optimizers, LR schedulers, the
  trainer's epoch/iteration) to one file, atomically (temp file + rename), every epoch, optionally every
  N iterations and every T seconds of wall time, and when the run is stopped early (``--time_limit``); with
  ``resume=True`` it restores that file before training starts.
- :class:`ModelSaver` writes the generator alone as a plain ``state_dict`` (``model.pt``, what the model-zoo
  tools, inference and MONAI Label load): after each epoch whose validation score is the best so far, or
  after every epoch when there is no validation.
"""

from __future__ import annotations

import logging
import os
import pickle
import time
from collections.abc import Mapping

import torch
from ignite.engine import Engine, Events

from .conventions import ANYMISSING, CHANNELS
from .files import write_atomic
from .networks import (
    GENERATOR_CLASSES,
    TARGETS,
    VARIANTS,
    SynthesisNet,
    TumourSegmenter,
    decode_any_missing_arch,
    decode_description,
)

logger = logging.getLogger(__name__)


def save_atomic(obj, path: str) -> None:
    """``torch.save(obj)`` to ``path`` atomically and flushed to disk (:func:`scripts.runtime.files.write_atomic`):
    a kill never leaves a truncated file; temporaries left by killed processes are removed first.

    Raises:
        Whatever ``torch.save`` raises (an older file at ``path`` then stays as it was).
    """
    write_atomic(path, lambda tmp: torch.save(obj, tmp), fsync=True)


def load_checkpoint(path: str, map_location="cpu") -> dict:
    """Load a checkpoint with ``weights_only=True``: only tensors and plain containers are unpickled, so a file
    cannot run code when it is loaded (a pickled object with a malicious ``__reduce__`` is refused).

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: the file holds other pickled objects (refused, with the offending global named), is corrupt or
            truncated, or is not a dict.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        lines = str(e).strip().splitlines()
        detail = next((line.strip() for line in lines if "GLOBAL" in line), lines[0] if lines else type(e).__name__)
        detail = detail.split(". Please use")[0].removeprefix("WeightsUnpickler error: ")
        raise ValueError(
            f"{path}: refused to load: it holds pickled Python objects besides tensors and plain containers "
            f"({detail}), and loading those could run code from the file. Only weights-only checkpoints are "
            "accepted (torch.load(weights_only=True)); if you trust the file, re-save its state dict "
            "(torch.save(model.state_dict(), path))."
        ) from None
    except Exception as e:  # not a zip/pickle at all, truncated, bad CRC
        reason = f"{type(e).__name__}: {e}"
        raise ValueError(f"{path}: corrupt or truncated, not a readable PyTorch checkpoint ({reason})") from None
    if not isinstance(state, Mapping):
        raise ValueError(f"{path} holds a {type(state).__name__}, not a state dict")
    return dict(state)


def checkpoint_kind(state: Mapping) -> str:
    """What a loaded checkpoint holds: ``"generator"`` (SynthesisNet), ``"any-missing generator"`` (AnyMissingNet),
    ``"critic"``, ``"segmenter"``
    (TumourSegmenter), ``"training checkpoint"`` (a ``checkpoint.pt`` written for ``--resume``) or ``"unknown"``."""
    keys = [str(k) for k in state]
    if "trainer" in state:
        return "training checkpoint"
    if any(k.startswith("generators.") for k in keys):
        return "generator"
    if any(k.startswith("generator.") for k in keys):
        return "any-missing generator"
    if any(k.startswith(("trunk.", "critics.")) for k in keys):
        return "critic"
    if any(k.startswith("unet.") for k in keys):
        return "segmenter"
    return "unknown"


def describe(state: Mapping) -> str:
    """Human description of a network state dict's architecture, e.g. ``generator variant 'mgan', features 16``."""
    kind = checkpoint_kind(state)
    arch = state.get("arch")
    if arch is None:
        arch = next((v for k, v in state.items() if str(k).endswith(".arch")), None)
    values = [int(v) for v in arch.tolist()] if isinstance(arch, torch.Tensor) else []
    if kind == "generator" and len(values) == 4 and 0 <= values[0] < len(VARIANTS):
        return f"generator variant {VARIANTS[values[0]]!r}, features {values[1]}"
    if kind == "any-missing generator" and len(values) == 6:
        return f"any-missing generator (--variant anymissing), features {values[0]}"
    if kind == "critic" and values:
        per_target = any(str(k).startswith("critics.") for k in state)
        return f"critic ({'one per target, pix2pix' if per_target else 'with modality head'}), features {values[0]}"
    if kind == "segmenter" and values:
        return f"segmenter, features {values[0]}"
    return kind


_EXPECTED = {
    "generator": "a generator model.pt (SynthesisNet state dict, as training writes to "
    "<output_dir>/<variant>/model.pt)",
    "any-missing generator": "an any-missing generator model.pt (AnyMissingNet state dict, as train.json "
    "--variant anymissing writes)",
    "segmenter": "a segmenter model.pt (TumourSegmenter state dict, as train_segmenter.json writes)",
}
_HINTS = {
    "training checkpoint": " (a training checkpoint.pt: give the model.pt next to it)",
}


def _arch(state: Mapping, path: str, what: str) -> list[int]:
    if "arch" not in state:
        raise ValueError(f"{path} is not a {what} checkpoint of this bundle (no 'arch' entry)")
    return [int(v) for v in state["arch"].tolist()]


#: What a generator checkpoint written before checkpoints described themselves was made with (the then defaults).
LEGACY_GENERATOR = {"image_size": 128, "intensity_scaling": "volume", "in_channels": 1, "upsample": "transpose"}
#: The kinds of model.pt that :func:`read_model` reads: a paper generator, an any-missing one, the segmenter S.
MODEL_KINDS = ("generator", "any-missing generator", "segmenter")
GENERATOR_KINDS = MODEL_KINDS[:2]


def _paper_generator(state: Mapping, path: str) -> dict:
    values = _arch(state, path, "generator (SynthesisNet)")
    if len(values) != 4 or not 0 <= values[0] < len(VARIANTS):
        raise ValueError(f"{path}: its 'arch' entry {values} is not [variant, features, num_targets, num_downs]")
    variant, features, num_targets, num_downs = values
    arch = {"variant": VARIANTS[variant], "features": features, "num_targets": num_targets, "num_downs": num_downs}
    extra = state.get("_extra_state")
    if extra is None:
        return {**arch, **LEGACY_GENERATOR, "targets": list(TARGETS[:num_targets]), "legacy": True}
    try:
        description = decode_description(extra)
    except ValueError as e:
        raise ValueError(f"{path}: its '_extra_state' entry: {e}") from None
    return {**arch, **description, "legacy": False}


def _any_missing_generator(state: Mapping, path: str) -> dict:
    try:
        arch = decode_any_missing_arch(state["arch"])
    except (KeyError, ValueError) as e:
        raise ValueError(f"{path}: {e}") from None
    return {**arch, "in_channels": arch["context"], "targets": list(CHANNELS), "legacy": False}


def _segmenter(state: Mapping, path: str) -> dict:
    values = _arch(state, path, "segmenter (TumourSegmenter)")
    if len(values) != 2:
        raise ValueError(f"{path}: its 'arch' entry {values} is not [features, num_targets]")
    return {"features": values[0], "num_targets": values[1]}


#: How each kind's settings are read from its state dict (a new generator kind adds its reader here).
GENERATOR_READERS = {"generator": _paper_generator, "any-missing generator": _any_missing_generator}
_READERS = {**GENERATOR_READERS, "segmenter": _segmenter}


def _network_state(state: Mapping) -> Mapping:
    """A segmenter's training ``checkpoint.pt`` holds its network under ``network`` (or ``model``): that one."""
    for entry in ("model", "network"):
        if entry in state and isinstance(state[entry], Mapping):
            return state[entry]
    return state


def read_model(path: str, kinds=GENERATOR_KINDS, missing_ok: bool = False) -> dict:
    """What the ``model.pt`` at ``path`` is, read from the file: ``{"kind", <its settings>}``, the one reader of
    every model this bundle writes (``kinds``: those accepted, from :data:`MODEL_KINDS`; default a generator of
    either kind).

    - a generator: ``variant``, ``features``, ``num_downs``, ``image_size``, ``intensity_scaling``,
      ``in_channels`` (slices per modality), ``upsample``, ``targets``, ``legacy`` (a file from before
      checkpoints described themselves: :data:`LEGACY_GENERATOR` assumed), and ``inputs``/``outputs``: the
      modalities it reads and writes (its class's, :data:`scripts.runtime.networks.GENERATOR_CLASSES`); a paper
      generator also ``num_targets``, an any-missing one ``context``;
    - the segmenter: ``features``, ``num_targets`` (its training ``checkpoint.pt`` is read as its network).

    With ``missing_ok`` and no file at ``path``, a paper generator's defaults (``tcmgan``, width 64,
    :data:`LEGACY_GENERATOR`) are returned with a warning, so that a config's ``network_def`` can still be built
    (the zoo's ``verify_net_in_out``); loading the weights then fails with a clear ``FileNotFoundError``.

    Raises:
        FileNotFoundError, ValueError: as :func:`load_checkpoint`; or the file holds another kind than ``kinds``
            (a critic, a training checkpoint, a generator given as the segmenter ...), said in the message.
    """
    kinds = (kinds,) if isinstance(kinds, str) else tuple(kinds)
    if missing_ok and not os.path.isfile(path):
        logger.warning(f"{path} does not exist; network_def gets a default generator (tcmgan, features 64)")
        return {"kind": "generator", "variant": "tcmgan", "features": 64, "num_targets": len(TARGETS),
                "num_downs": 7, **LEGACY_GENERATOR, "targets": list(TARGETS), "legacy": True,
                "inputs": list(SynthesisNet.inputs), "outputs": list(TARGETS)}  # fmt: skip
    state = _network_state(load_checkpoint(path))
    found = checkpoint_kind(state)
    if found not in kinds:
        expected = " or ".join(_EXPECTED[k] for k in kinds)
        raise ValueError(f"{path} is not {expected}: it holds a {describe(state)}{_HINTS.get(found, '')}")
    info = {"kind": found, **_READERS[found](state, path)}
    if found in GENERATOR_KINDS:
        info["inputs"], info["outputs"] = list(GENERATOR_CLASSES[info["variant"]].inputs), list(info["targets"])
    return info


def _load_state(network: torch.nn.Module, state: Mapping, path: str, what: str) -> None:
    try:
        network.load_state_dict(state)
    except RuntimeError as e:  # tensors of other shapes or names than the arch entry promises: a damaged file
        raise ValueError(f"{path}: its weights do not fit the {what} its 'arch' entry describes ({e})") from None


def load_model(path: str, device=None, kinds=GENERATOR_KINDS, network: torch.nn.Module | None = None):
    """The model at ``path`` (:func:`read_model`), built as the file describes it and loaded, on ``device``
    (default: the CPU, or ``network``'s device); a generator in eval mode. The one loader of every model.

    With ``network`` (a config's ``network_def``, the zoo's form), the weights go into it after checking that it
    is what the file records (variant, width, targets, image size, intensity scaling, input channels, upsampling).

    Raises:
        FileNotFoundError, ValueError: as :func:`read_model`; or ``network`` differs from the file: the message
            names each difference, e.g. a workflow run with ``--intensity_scaling slice`` on a model trained with
            ``volume``. The workflows take these settings from the checkpoint, so this happens only when an
            option given explicitly contradicts it.
    """
    if network is not None and tuple(kinds) == GENERATOR_KINDS:  # the file must be of the network's kind
        kinds = ("any-missing generator",) if network.variant == ANYMISSING else ("generator",)
    info = read_model(path, kinds)
    if device is None:
        device = network.arch.device if network is not None else "cpu"
    state = dict(_network_state(load_checkpoint(path, map_location=device)))
    if info["kind"] == "segmenter":
        network = network or TumourSegmenter(features=info["features"], num_targets=info["num_targets"])
        _load_state(network, state, path, f"segmenter of features {info['features']}")
        return network.to(device)
    if network is None:
        network = GENERATOR_CLASSES[info["variant"]].from_settings(**info)
    else:
        own = network.settings()
        compared = ("variant", "features", "num_targets") if info["legacy"] else own
        wrong = [f"{k} {info[k]!r} (the workflow asks {own[k]!r})" for k in compared if info.get(k) != own[k]]
        if wrong:
            raise ValueError(f"{path} does not match the workflow's generator: the checkpoint has " + ", ".join(wrong)
                             + "; these settings come from the checkpoint, so drop the option that overrides them")
    if info["legacy"]:
        state["_extra_state"] = network.get_extra_state()
    _load_state(network, state, path, info["kind"])
    return network.to(device).eval()


def cpu_weights(network: torch.nn.Module) -> dict:
    """``network``'s state dict (a DDP wrapper unwrapped) as detached CPU tensors: what a ``model.pt`` holds, so
    that it loads on a machine without the training GPU (ckpt_export, MONAI Label, CPU inference)."""
    net = getattr(network, "module", network)
    return {k: v.detach().cpu() for k, v in net.state_dict().items()}


class TrainingCheckpoint:
    """Save/restore the full training state atomically.

    Args:
        save_dict: ``{name: object with state_dict()/load_state_dict()}`` (None values are skipped); the engine
            it is attached to is added as ``"trainer"`` (epoch, iteration).
        path: checkpoint file.
        iteration_interval: also save every this many iterations (0: only at epoch ends).
        resume: restore from ``path`` when training starts (an error if ``path`` does not exist).
        time_interval: also save after the first iteration that ends this many seconds (wall time) after the
            last save (0: never by time), so that a killed run loses at most about this much work whatever an
            iteration costs.

    The file is also written when the run is stopped early (``Events.TERMINATE``, e.g. by
    :class:`scripts.runtime.long_run.TimeLimit`), so ``--resume true`` continues exactly where it stopped.
    """

    def __init__(self, save_dict: dict, path: str, iteration_interval: int = 0, resume: bool = False,
                 time_interval: float = 0):  # fmt: skip
        self.save_dict = {k: v for k, v in save_dict.items() if v is not None}
        self.path = path
        self.iteration_interval = iteration_interval
        self.resume = resume
        self.time_interval = float(time_interval or 0)
        self.last_save = time.monotonic()

    def attach(self, engine: Engine) -> None:
        self.save_dict.setdefault("trainer", engine)
        if self.resume:
            engine.add_event_handler(Events.STARTED, self.load)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.save)
        engine.add_event_handler(Events.TERMINATE, self.save)
        if self.iteration_interval > 0:
            engine.add_event_handler(Events.ITERATION_COMPLETED(every=self.iteration_interval), self.save)
        if self.time_interval > 0:
            engine.add_event_handler(Events.ITERATION_COMPLETED, self._save_if_due)

    def _save_if_due(self, engine: Engine) -> None:
        if time.monotonic() - self.last_save >= self.time_interval:
            self.save(engine)

    def save(self, engine: Engine | None = None) -> None:
        save_atomic({k: v.state_dict() for k, v in self.save_dict.items()}, self.path)
        self.last_save = time.monotonic()

    def load(self, engine: Engine | None = None) -> None:
        """Restore every entry of ``save_dict`` from ``path``.

        Raises:
            FileNotFoundError, ValueError: as :func:`load_checkpoint` (missing, refused, corrupt or truncated); the
                file is not a training checkpoint (e.g. a model.pt); it lacks an entry this run needs or a network
                in it has another architecture than this run's (the message says which entry and both
                architectures, e.g. ``generator: checkpoint has generator variant 'mgan', features 16; this run has
                generator variant 'tcmgan', features 64``).
        """
        state = load_checkpoint(self.path)
        if "trainer" not in state:
            raise ValueError(
                f"{self.path} is not a training checkpoint (it holds a {describe(state)}; --resume needs the "
                "checkpoint.pt written during training)"
            )
        missing = [k for k in self.save_dict if k not in state]
        if missing:
            raise ValueError(
                f"{self.path} cannot resume this run: it lacks {missing} (has {sorted(state)}); it was written by a "
                f"run with other settings ({self._saved_networks(state)})"
            )
        wrong = []
        for k, obj in self.save_dict.items():
            if isinstance(obj, torch.nn.Module) and isinstance(state[k], Mapping):
                ours, theirs = describe(obj.state_dict()), describe(state[k])
                if ours != theirs or set(obj.state_dict()) != set(state[k]):
                    wrong.append(f"{k}: checkpoint has {theirs}; this run has {ours}")
        if wrong:
            raise ValueError(f"{self.path} was written by a run with another architecture: " + "; ".join(wrong))
        max_epochs = engine.state.max_epochs if engine is not None else None
        for k, obj in self.save_dict.items():
            try:
                obj.load_state_dict(state[k])
            except (RuntimeError, ValueError, KeyError, TypeError) as e:
                reason = f"{type(e).__name__}: {e}"
                raise ValueError(f"{self.path}: its entry {k!r} does not fit this run ({reason})") from None
        if engine is not None:
            if max_epochs is not None and max_epochs > engine.state.max_epochs:
                engine.state.max_epochs = max_epochs  # a resumed run may be asked to train longer
            logger.info(f"resumed from {self.path} at epoch {engine.state.epoch}, iteration {engine.state.iteration}")

    @staticmethod
    def _saved_networks(state: Mapping) -> str:
        nets = [
            f"{k}: {describe(v)}"
            for k, v in state.items()
            if isinstance(v, Mapping) and checkpoint_kind(v) != "unknown"
        ]
        return "; ".join(nets) or "no network entries"


class ModelSaver:
    """Write ``network.state_dict()`` atomically to ``path`` at the end of each epoch whose validation is the
    best so far (``evaluator`` given: its ``best_metric_epoch`` equals the trainer's epoch), or of every epoch
    (no evaluator). Attach it after the ``ValidationHandler`` so that validation has run. A run that ends without
    having saved (no validation ran: ``max_epochs`` < ``val_interval``) saves its last epoch, with a warning.

    Args:
        network: the network (a DDP wrapper is unwrapped).
        path: the ``model.pt`` to write.
        evaluator: the validation engine whose best epoch is saved; None: every epoch.
        record: when given, the file holds ``{**record, "state_dict": weights, "epoch": n}`` instead of the plain
            state dict (the downstream segmenters' file, :func:`scripts.runtime.downstream.downstream_record`).
        select: ``"best"`` (default): the best validated epoch as above; ``"last"``: every epoch, so the file ends
            up holding the last one (a fixed schedule; validation still runs and is logged).

    Raises:
        ValueError: ``select`` is neither ``"best"`` nor ``"last"``.
    """

    def __init__(self, network: torch.nn.Module, path: str, evaluator: Engine | None = None,
                 record: Mapping | None = None, select: str = "best"):  # fmt: skip
        if select not in ("best", "last"):
            raise ValueError(f"model_selection must be 'best' or 'last', got {select!r}")
        evaluator = evaluator if select == "best" else None
        self.network, self.path, self.evaluator = network, path, evaluator
        self.record = dict(record) if record is not None else None
        self.saved = False

    def attach(self, engine: Engine) -> None:
        """Save at the end of epochs; in a distributed run only rank 0 writes (other ranks attach nothing)."""
        if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_rank():
            return
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)
        engine.add_event_handler(Events.COMPLETED, self._save_if_never_saved)

    def _save_if_never_saved(self, engine: Engine) -> None:
        """A run stopped before its first epoch ended (``--time_limit``) still leaves a model.pt: its last state."""
        if not self.saved:
            logging.getLogger(__name__).warning(f"the run stopped before any epoch ended: {self.path} holds its "
                                                f"last state (iteration {engine.state.iteration})")
            self._write(engine)

    def __call__(self, engine: Engine | None) -> None:
        if self.evaluator is not None and getattr(self.evaluator.state, "best_metric_epoch", -1) != engine.state.epoch:
            last = engine is not None and engine.state.epoch >= (engine.state.max_epochs or 0)
            if self.saved or not last:
                return
            logging.getLogger(__name__).warning(
                f"no validation ran in this run (val_interval > max_epochs?): {self.path} holds its last epoch")
        self._write(engine)

    def _write(self, engine: Engine | None) -> None:
        self.saved = True
        weights = cpu_weights(self.network)
        if self.record is None:
            save_atomic(weights, self.path)
        else:
            epoch = int(engine.state.epoch) if engine is not None else 0
            save_atomic({**self.record, "state_dict": weights, "epoch": epoch}, self.path)
