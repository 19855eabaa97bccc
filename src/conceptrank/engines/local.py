"""The local engine: shard work in this process, one shard after another."""

from __future__ import annotations

import copy
from typing import Any, Iterable, Iterator

from conceptrank.engines.shards import Shard, ShardWork
from conceptrank.progress import Progress

__all__ = ["LocalEngine"]


class LocalEngine:
    """Runs :class:`~conceptrank.engines.shards.ShardWork` in this process (``workers`` is 1), on a
    copy of the work as a remote worker would (the caller's model is never moved)."""

    workers = 1

    def map(self, work: ShardWork, shards: Iterable[Shard], progress: Progress | None = None) -> Iterator[tuple[Shard, Any]]:
        """Yield ``(shard, work(shard))`` in shard order; ``progress`` counts the images done."""
        work = copy.deepcopy(work)
        work.setup()
        report = progress.update if progress is not None else (lambda n: None)
        for shard in shards:
            yield shard, work(shard, report)

    def close(self) -> None:
        pass
