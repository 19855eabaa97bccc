"""The Ray engine: shard work on Ray actors that load the model once and are retried when they die.

``RayEngine(address)`` connects to a running cluster (``"auto"``, after ``ray start --head``), to
an address (``"ray://host:10001"``, ``"host:6379"``), or starts a local one (``"local"``). It starts
``workers`` actors — one per GPU by default, else one per 2 CPUs — each of which calls the work's
``setup()`` (loading the model) once, then runs shards as they are handed out; partial results come
back as they finish. A worker process that dies mid-shard is restarted by Ray (``max_restarts``)
and the shard retried (``max_task_retries``); the work is deterministic, so the merged result is the
same. Workers report their progress (images done per shard) to a small counter actor that the
driver polls into its :class:`~conceptrank.progress.Progress` display.

Every node must see the probe/target files under the same paths (a shared filesystem).
"""

from __future__ import annotations

import os
from typing import Any, Iterable, Iterator

from conceptrank.engines.shards import Shard, ShardWork
from conceptrank.errors import ConceptrankError
from conceptrank.progress import Progress

__all__ = ["RayEngine", "import_ray"]

POLL_SECONDS = 0.5


def import_ray():
    """The ``ray`` module, or a ConceptrankError saying how to install it."""
    try:
        import ray
    except ImportError:
        raise ConceptrankError("--engine ray needs Ray: pip install 'conceptrank[ray]' (or pip install ray)") from None
    return ray


def _connect(ray, address: str) -> bool:
    """Connect (or start a local cluster); True when this call started Ray here."""
    if ray.is_initialized():
        return False
    try:
        if address == "local":
            ray.init(include_dashboard=False, logging_level="WARNING")
        else:
            ray.init(address=address, logging_level="WARNING")
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise ConceptrankError(
            f"cannot connect to a Ray cluster at --ray-address {address}: {str(e).splitlines()[0]} "
            "(start one with `ray start --head`, or use --ray-address local)"
        ) from None
    return True


class _Progress:
    """Images done per shard, set by the workers, summed by the driver (a retried shard restarts
    its count, so the total never counts a retry twice)."""

    def __init__(self) -> None:
        self.done: dict[int, int] = {}

    def set(self, shard: int, n: int) -> None:
        self.done[shard] = max(int(n), self.done.get(shard, 0))

    def total(self) -> int:
        return sum(self.done.values())


class _Worker:
    """One actor: each work set up once (the model loaded) on its first shard, then one shard per
    call. The work travels as an object reference inside a list, fetched once per (re)started actor
    and work, so that a restarted actor sets it up again."""

    def __init__(self) -> None:
        self.work, self.work_id = None, None

    def pid(self) -> int:
        return os.getpid()

    def run(self, shard: Shard, counter, work_ref: list) -> Any:
        if self.work_id != work_ref[0].hex():
            import ray

            self.work = None  # free the previous pass's model first
            self.work = ray.get(work_ref[0])
            self.work.setup()
            self.work_id = work_ref[0].hex()
        done = [0]

        def report(n: int) -> None:
            done[0] += int(n)
            counter.set.remote(shard.index, done[0])

        return self.work(shard, report)


class RayEngine:
    """Runs :class:`~conceptrank.engines.shards.ShardWork` on Ray actors.

    Parameters
    ----------
    address : ``auto``, ``local`` or a cluster address (ignored when Ray is already initialized).
    workers : actors to start (default: one per GPU, else one per 2 CPUs of the cluster).
    max_retries : restarts of a dead actor, and retries of the shard it was running.
    """

    def __init__(self, address: str = "auto", workers: int | None = None, max_retries: int = 3) -> None:
        self.ray = ray = import_ray()
        self.started = _connect(ray, address)
        res = ray.cluster_resources()
        gpus, cpus = int(res.get("GPU", 0)), max(1, int(res.get("CPU", 1)))
        if gpus:
            self.workers = int(workers or gpus)
            self.options = {"num_gpus": max(gpus // self.workers, 1) if self.workers <= gpus else gpus / self.workers,
                            "num_cpus": max(1, cpus // self.workers)}
        else:
            self.workers = int(workers or max(1, cpus // 2))
            self.options = {"num_cpus": max(1, cpus // self.workers)}
        self.max_retries = int(max_retries)
        self.actors: list = []

    def _start(self, n: int) -> None:
        ray = self.ray
        cls = ray.remote(_Worker).options(max_restarts=self.max_retries, max_task_retries=self.max_retries,
                                          **self.options)
        while len(self.actors) < n:
            self.actors.append(cls.remote())

    def map(self, work: ShardWork, shards: Iterable[Shard], progress: Progress | None = None) -> Iterator[tuple[Shard, Any]]:
        """Yield ``(shard, work(shard))`` as shards finish (any order). The actors stay up for the
        next call (a second pass) until :meth:`close`."""
        ray = self.ray
        queue = list(shards)
        if not queue:
            return
        self._start(min(self.workers, len(queue)))
        counter = ray.remote(_Progress).options(num_cpus=0).remote()
        work_ref = [ray.put(work)]
        pending, shown = {}, 0
        try:
            for actor in self.actors[:len(queue)]:
                shard = queue.pop(0)
                pending[actor.run.remote(shard, counter, work_ref)] = (actor, shard)
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1, timeout=POLL_SECONDS)
                for ref in ready:
                    actor, shard = pending.pop(ref)
                    result = self._get(ref, shard)
                    counter.set.remote(shard.index, len(shard))
                    if queue:
                        nxt = queue.pop(0)
                        pending[actor.run.remote(nxt, counter, work_ref)] = (actor, nxt)
                    yield shard, result
                if progress is not None:
                    now = ray.get(counter.total.remote())
                    if now > shown:
                        progress.update(now - shown)
                        shown = now
        finally:
            ray.kill(counter)

    def _get(self, ref, shard: Shard):
        ray = self.ray
        try:
            return ray.get(ref)
        except ray.exceptions.RayTaskError as e:
            cause = getattr(e, "cause", None)
            if isinstance(cause, BaseException):
                raise cause from None
            raise
        except ray.exceptions.RayActorError as e:
            raise ConceptrankError(
                f"a Ray worker died {self.max_retries + 1} times on images {shard.start}..{shard.stop - 1}: "
                f"{str(e).splitlines()[0]}"
            ) from None

    def close(self) -> None:
        """Stop the actors (and Ray, when this engine started it)."""
        for actor in self.actors:
            self.ray.kill(actor)
        self.actors = []
        if self.started and self.ray.is_initialized():
            self.ray.shutdown()
            self.started = False
