"""``omnigen2 batch --engine ray``: the same records through a Ray Data pipeline.

The driver parses and checks every record and sorts out the outputs that exist (as each process does under
accelerate, here for the whole job), then streams the rest through ``map_batches`` on a pool of pipeline actors,
one model each (one GPU each when the cluster has GPUs). Actors write ``OUT/ID.png`` themselves, through the same
``Worker.generate`` as ``omnigen2 batch`` without Ray, so OUT must be a folder every node sees (a shared file
system); rows carry the manifest lines back, and the driver writes the manifest as the accelerate engine does.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict

from .records import Record, RecordError
from .runner import BatchOptions, Worker, error_line, merge, plan, report, write_manifest


class PipelineActor:
    """A Ray Data callable class: loads the pipeline once, then generates each batch of records."""

    def __init__(self, opts: dict, device: str | None):
        import ray

        opts = BatchOptions(**opts)
        if device is not None:  # the driver's choice (cuda where Ray gives each actor a GPU, else cpu)
            opts.device = device
        self.process = f"{ray.util.get_node_ip_address()}:{os.getpid()}"
        self.worker = Worker(opts, process=self.process)

    def __call__(self, batch: dict) -> dict:
        import numpy as np

        lines = [json.dumps(self.worker.generate(Record.from_json(str(r)))) for r in batch["record"]]
        return {"line": np.array(lines, dtype=object)}


def run_ray(
    opts: BatchOptions,
    records: list[Record],
    errors: list[RecordError],
    start: float,
    actors: int | None = None,
    batch_size: int = 1,
    address: str | None = None,
) -> int:
    try:
        import ray
        import ray.data
    except ImportError as e:
        raise ImportError(f"--engine ray needs Ray Data ({e.name} is missing): pip install 'omnigen2[ray]'") from e
    from tqdm.auto import tqdm

    opts.out_dir.mkdir(parents=True, exist_ok=True)
    stopped = None
    pending, lines = plan(records, opts, "driver")
    # Ray's own lookup: --ray-address, else $RAY_ADDRESS, else a `ray start` instance of this machine, else a new
    # local instance (stopped by the shutdown below; from a cluster, shutdown only disconnects).
    connected_here = not ray.is_initialized()
    if connected_here:
        ray.init(address=address)
    try:
        gpus = int(ray.cluster_resources().get("GPU", 0))
        device = opts.device or ("cuda" if gpus else "cpu")
        on_gpu = device.startswith("cuda")
        if on_gpu and not gpus:
            raise ValueError(f"--device {device} asked for, but the Ray cluster has no GPU")
        n = actors or (gpus if on_gpu else 1)
        bar = tqdm(
            total=len(records) + len(errors), initial=len(errors) + len(lines), desc="omnigen2 batch", unit="img"
        )
        if pending:
            ray.data.DataContext.get_current().enable_progress_bars = False  # the bar above is the job's
            # One block per record (up to a bound), so that the pool spreads records over every actor.
            items = [{"record": rec.to_json()} for rec in pending]
            ds = ray.data.from_items(items, override_num_blocks=min(len(items), 100_000))
            resources = {"num_gpus": 1} if on_gpu else {"num_cpus": 1}
            ds = ds.map_batches(
                PipelineActor,
                fn_constructor_kwargs={"opts": asdict(opts), "device": device},
                compute=ray.data.ActorPoolStrategy(size=n),  # n actors, one model each (`concurrency=n` before 2.51)
                batch_size=batch_size,
                **resources,
            )
            try:
                for row in ds.iter_rows():
                    lines.append(json.loads(row["line"]))
                    bar.update(1)
            except Exception as e:  # noqa: BLE001 - e.g. an actor lost with its node: keep what is done
                stopped = f"{type(e).__name__}: {e}"
        bar.close()
    finally:
        if connected_here:
            ray.shutdown()
    merged, summary = merge([*map(error_line, errors), *lines], records, start, n, "ray")
    path = write_manifest(opts.out_dir, merged, summary)
    if stopped:
        print(f"omnigen2 batch: the Ray pipeline stopped ({stopped}); run again to resume", file=sys.stderr)
    return report(path, merged, summary) or int(stopped is not None)
