"""The Dask engine of ``bcekit score``: one task per partition on a ``distributed`` cluster.

Workers run the same ``score_partition`` as the local engine (the same kernel, on the worker's threads)
and send back their partials (exact sums, counts, plot statistics, or the partition's first data error);
the client adds them, so the result equals the local engine's to the last bit, and a bad value is reported
exactly as the local engine reports it. Workers must see the files at the same
paths (a shared file system; relative paths are taken in the client's working directory), and must have
bcekit installed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from bcekit.cli._scoring import Job, Partial, score_partition
from bcekit.cli._sources import Partition

__all__ = ["run"]


def run(
    job: Job,
    partitions: Sequence[Partition],
    scheduler: str | None,
    progress: Callable[[int], None] | None = None,
) -> list[Partial]:
    """Score ``partitions`` on the cluster at ``scheduler`` (an address), or on a new local cluster."""
    from distributed import Client, LocalCluster, as_completed

    cluster = None
    if scheduler is None:
        cluster = LocalCluster(host="127.0.0.1", dashboard_address=":0", threads_per_worker=1, processes=True)
        client = Client(cluster)
    else:
        client = Client(scheduler)
    try:
        futures = client.map(score_partition, [job] * len(partitions), partitions, pure=False)
        partials = []
        for future in as_completed(futures):
            partial = future.result()
            partials.append(partial)
            if progress is not None:
                progress(partial.rows)
        return partials
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
