"""Shards of an image list and the protocol of the work an engine runs on them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Protocol

__all__ = ["Shard", "ShardWork", "make_shards"]


@dataclass(frozen=True)
class Shard:
    """Images ``start .. stop-1`` of a stage's image list; ``index`` is the shard's position."""

    index: int
    start: int
    stop: int

    def __len__(self) -> int:
        return self.stop - self.start


class ShardWork(Protocol):
    """What an engine runs: picklable; ``setup`` once per worker process, then one call per shard."""

    def setup(self) -> None: ...

    def __call__(self, shard: Shard, report: Callable[[int], None]) -> Any: ...


def make_shards(total: int, batch_size: int, shards: int) -> list[Shard]:
    """About ``shards`` contiguous shards of ``total`` images whose boundaries fall on multiples of
    ``batch_size``: every batch holds the same images as in a single pass, so a model whose
    outputs depend on the batch's composition still gives identical numbers."""
    batches = -(-total // batch_size)
    shards = max(1, min(int(shards), batches))
    per, extra = divmod(batches, shards)
    out, b = [], 0
    for i in range(shards):
        nb = per + (1 if i < extra else 0)
        out.append(Shard(i, b * batch_size, min(total, (b + nb) * batch_size)))
        b += nb
    return out
