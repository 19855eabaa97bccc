"""Execution engines: where the forward passes of a stage run, shard by shard.

A stage cuts its image list into :class:`~conceptrank.engines.shards.Shard` ranges and hands the
engine a picklable *work* object (``setup()`` once per worker: load the model; ``work(shard,
report)`` → that shard's partial statistics). The engine returns the partial results, which the
stage merges with the statistics' own ``merge`` methods:

* :class:`~conceptrank.engines.local.LocalEngine` runs the work in this process;
* :class:`~conceptrank.engines.ray.RayEngine` runs it on Ray actors (``pip install 'conceptrank[ray]'``),
  each loading the model once, retried by Ray when a worker dies.
"""
