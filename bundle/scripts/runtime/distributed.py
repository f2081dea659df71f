"""Multi-process training (``configs/multi_gpu_train.json``): what MONAI's DDP pattern needs for this GAN.

- :func:`rank`: this process's rank in the default process group (0 when there is none).
- :func:`ddp`: wrap a network in ``DistributedDataParallel`` on its process's device, or pass it through
  (None, or ``enabled=False``), so one config line covers every variant.
- :class:`RankZeroCheckpoint`: the resume checkpoint that every rank restores but only rank 0 writes.
- :class:`SyncBuffers`: an evaluator handler that copies a network's buffers (BatchNorm running statistics)
  from rank 0 to every rank before validation, so every rank validates the model that rank 0 saves.

Networks that are saved or validated are always the bare modules (the configs keep ``gnetwork``, ``dnetwork``,
``seg_network``, ``network`` unwrapped and give the trainer the wrapped ones), so checkpoints have no
``module.`` prefix and load in a single process unchanged.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from ignite.engine import Engine, Events
from torch.nn.parallel import DistributedDataParallel

from .checkpoints import TrainingCheckpoint


def is_distributed() -> bool:
    """Whether a default process group is initialised."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """Rank of this process in the default process group; 0 without one (a single-process run)."""
    return dist.get_rank() if is_distributed() else 0


def ddp(
    module: torch.nn.Module | None,
    device: torch.device | str,
    find_unused_parameters: bool = False,
    broadcast_buffers: bool = True,
    enabled: bool = True,
) -> torch.nn.Module | None:
    """``module`` wrapped for multi-process training, or ``module`` itself when it is None or ``enabled`` is False.

    Args:
        module: the bare network, already on ``device``.
        device: this process's device; a CUDA device becomes DDP's ``device_ids``, a CPU device (gloo) none.
        find_unused_parameters: DDP's option; needed when a forward pass may leave some parameters unused on a
            rank (pix2pix routes each sample to the generator and critic of its target, so a rank may draw no
            sample of some target in an iteration).
        broadcast_buffers: DDP's option (rank 0's buffers are copied to every rank at each forward).
        enabled: False returns ``module`` unwrapped (e.g. the frozen segmenter of ``tcmgan``).

    Raises:
        RuntimeError: wrapping was asked for but no process group is initialised (the run was not started with
            ``torchrun`` and the multi-GPU config's ``initialize``).
    """
    if module is None or not enabled:
        return module
    if not is_distributed():
        raise RuntimeError("multi_gpu_train.json needs a process group: start it with torchrun (docs/multi_gpu.md)")
    device = torch.device(device)
    return DistributedDataParallel(
        module,
        device_ids=[device] if device.type == "cuda" else None,
        find_unused_parameters=find_unused_parameters,
        broadcast_buffers=broadcast_buffers,
    )


class RankZeroCheckpoint(TrainingCheckpoint):
    """:class:`scripts.runtime.checkpoints.TrainingCheckpoint` for any number of processes: every rank restores the
    checkpoint when resuming (DDP copies parameters between ranks only when it wraps them, before the trainer
    starts), only rank 0 writes it. In a single process it behaves exactly as ``TrainingCheckpoint``."""

    def save(self, engine: Engine | None = None) -> None:
        if rank() == 0:
            super().save(engine)


class SyncBuffers:
    """Evaluator handler: broadcast ``network``'s buffers from rank 0 when the evaluator starts.

    DDP broadcasts buffers at the *start* of each forward, so after the last training step every rank holds the
    BatchNorm statistics of its own last batch; this makes all ranks validate with rank 0's, which are the ones
    saved. A no-op in a single process and for networks without floating-point buffers.
    """

    def __init__(self, network: torch.nn.Module):
        self.network = network

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self)

    def __call__(self, engine: Engine | None = None) -> None:
        if not is_distributed():
            return
        for buffer in self.network.buffers():
            dist.broadcast(buffer.data, src=0)
