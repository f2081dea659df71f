"""Many volumes at once: what ``configs/inference.json`` uses so that reading, the network and writing overlap, and
so that several processes (``torchrun``) share the cases.

- :class:`Prefetcher`: iterates a data loader in a background thread, a few cases ahead of the network, and
  re-raises a loading error in the caller as the error itself (MONAI's ``ThreadDataLoader`` would end the epoch
  early without a word when a case fails to load).
- :class:`BackgroundWriter`: runs each case's writing in a background thread while the next case is read and
  synthesised; a failed write stops the run at the next case (or at the end) with its own error. Every write is
  still atomic (:func:`scripts.runtime.files.atomic_paths`).
- :func:`process_shard` and :func:`shard`: this process's rank and the number of processes (from ``torchrun``'s
  environment, or the default process group), and its share of a list of cases.

Reading and writing are mostly outside the GIL (zlib, file I/O, numpy and torch kernels), so threads suffice.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from queue import Empty, Full, Queue

from ignite.engine import Engine, Events

logger = logging.getLogger(__name__)


class Prefetcher:
    """Iterate ``loader`` in a background thread, keeping up to ``depth`` items ready ahead of the consumer (and one
    more in the making: ``depth + 1`` cases in memory besides the one being synthesised).

    Items come out in the loader's order. An error raised while producing an item is raised, as the same
    exception object (its message and chain intact), when the consumer reaches that item. Leaving the iteration
    early (an error downstream) stops the thread. ``len()`` is the loader's, so an ignite engine knows its epoch.

    Args:
        loader: any iterable (a ``DataLoader``).
        depth: items kept ready; ``0`` iterates ``loader`` in the caller's thread (no prefetching).
    """

    def __init__(self, loader: Iterable, depth: int = 1):
        if int(depth) < 0:
            raise ValueError(f"depth must be >= 0, got {depth}")
        self.loader = loader
        self.depth = int(depth)

    def __len__(self) -> int:
        return len(self.loader)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator:
        if self.depth == 0:
            yield from self.loader
            return
        queue: Queue = Queue(maxsize=self.depth)
        stop = threading.Event()

        def put(entry) -> bool:
            while not stop.is_set():
                try:
                    queue.put(entry, timeout=0.1)
                    return True
                except Full:
                    continue
            return False

        def produce() -> None:
            try:
                for item in self.loader:
                    if stop.is_set() or not put(("item", item)):
                        return
            except BaseException as e:  # handed to the consumer, raised there
                put(("error", e))
                return
            put(("end", None))

        thread = threading.Thread(target=produce, name="brainsynth-prefetch", daemon=True)
        thread.start()
        try:
            while True:
                kind, value = queue.get()
                if kind == "item":
                    yield value
                elif kind == "error":
                    raise value
                else:
                    return
        finally:
            stop.set()
            while True:  # unblock a producer waiting on a full queue
                try:
                    queue.get_nowait()
                except Empty:
                    break
            thread.join()


class BackgroundWriter:
    """Run write jobs one after another in a background thread, at most ``depth`` of them waiting.

    :meth:`submit` returns at once (it blocks only while ``depth`` jobs are queued, which bounds the memory held by
    volumes waiting to be written); a job that failed raises its error at the next :meth:`submit` or at
    :meth:`flush`. As an engine handler it flushes when the engine completes, so a run ends only when everything
    is written. When the run stops on another error, :meth:`wait` lets the jobs already submitted finish (all
    files of their case or none, see :func:`scripts.runtime.files.atomic_paths`) before the error goes on
    (``inference.json``'s :class:`scripts.runtime.inference.UnwrapTransformErrors` calls it).

    Args:
        enabled: False runs each job in the caller's thread, at :meth:`submit` (no overlap).
        depth: most jobs queued or running.
    """

    def __init__(self, enabled: bool = True, depth: int = 2):
        if int(depth) < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        self.enabled = bool(enabled)
        self.depth = int(depth)
        self._pool: ThreadPoolExecutor | None = None
        self._pending: list[Future] = []

    def submit(self, job: Callable, *args, **kwargs) -> None:
        """Run ``job(*args, **kwargs)``, in the background when enabled.

        Raises:
            Whatever an earlier job raised (background), or ``job`` itself (not enabled).
        """
        if not self.enabled:
            job(*args, **kwargs)
            return
        self._collect(block=False)
        while len(self._pending) >= self.depth:
            self._collect(block=True)
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="brainsynth-writer")
        self._pending.append(self._pool.submit(job, *args, **kwargs))

    def _collect(self, block: bool) -> None:
        """Drop finished jobs (re-raising the first failure); with ``block``, wait for the oldest one first."""
        if block and self._pending:
            self._pending[0].exception()  # waits
        while self._pending and self._pending[0].done():
            self._pending.pop(0).result()  # raises a failed job's error

    def flush(self, engine: Engine | None = None) -> None:
        """Wait for every submitted job; raise the first failure. The thread ends (a later submit starts another)."""
        try:
            while self._pending:
                self._collect(block=True)
        finally:
            self._shutdown()

    def _shutdown(self) -> None:
        for job in self._pending:
            job.exception()  # wait
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def wait(self) -> None:
        """Wait for every submitted job without raising (a failure is logged): for when the run already stops on
        another error."""
        for job in self._pending:
            if job.exception() is not None:
                logger.error(f"writing in the background also failed: {job.exception()}")
        self._pending.clear()
        self._shutdown()

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.COMPLETED, self.flush)


def process_shard() -> tuple[int, int]:
    """``(rank, world_size)`` of this process: from the default process group when one is initialised, else from
    the ``RANK`` and ``WORLD_SIZE`` variables ``torchrun`` sets (global over nodes), else ``(0, 1)``.

    Raises:
        ValueError: the variables are not integers, or the rank is outside ``[0, world_size)``.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    try:
        rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise ValueError(
            f"RANK={os.environ.get('RANK')!r}, WORLD_SIZE={os.environ.get('WORLD_SIZE')!r}: expected integers "
            "(as torchrun sets them)"
        ) from None
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"RANK={rank}, WORLD_SIZE={world}: the rank must be in [0, WORLD_SIZE)")
    return rank, world


def shard(items: Sequence, rank: int | None = None, world_size: int | None = None) -> list:
    """This process's share of ``items``: every ``world_size``-th one from ``rank`` on (``items[rank::world]``),
    so that the processes together take each item exactly once. Defaults: :func:`process_shard`."""
    if rank is None or world_size is None:
        rank, world_size = process_shard()
    return list(items)[rank::world_size]
