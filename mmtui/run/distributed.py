"""Attribution on Ray: one model replica per worker (a GPU each, or CPU cores), results streamed back to the
driver, which alone writes the SQLite cache (single writer, resumable as a local run).

Install with `pip install 'mmtui[ray]'`. Images travel to the workers as bytes, so the workers need no
shared file system; a bad image is reported by the worker that fails to decode it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from mmtui.errors import MmtuiError
from mmtui.run.pipeline import Event, Settings, WorkItem, attribute_batch, batches, plan, route
from mmtui.run.writer import StoreWriter
from mmtui.store import Store


class AttributionWorker:
    """A Ray actor holding one stack (loaded once, from the driver's load arguments)."""

    def __init__(self, load_args: dict[str, Any], device: str) -> None:
        from mmtui.stacks.presets import load_stack

        args = dict(load_args)
        self.stack = load_stack(args.pop("preset"), device=device, **args)

    def info(self) -> dict[str, Any]:
        s = self.stack
        return {
            "stack_id": s.fingerprint_id,
            "stack_name": s.name,
            "fingerprint": s.fingerprint,
            "shape": s.shape(),
            "lm_id": s.lm_fingerprint_id,
            "prompt": s.prompt,
            "units": s.n_layers * s.d_mlp,
            "load": s.load_args,
        }

    def decode(self, convention: str) -> list[list[dict]]:
        from mmtui.run.decoding import decode_units

        return list(decode_units(self.stack, convention))

    def run(self, batch: list[WorkItem], settings: Settings) -> list[Event]:
        return attribute_batch(self.stack, batch, settings)


def attribute_images_ray(
    load_args: dict[str, Any],
    store: Store,
    paths: Iterable[Path],
    settings: Settings,
    *,
    workers: int = 2,
    gpus_per_worker: float = 0.0,
    cpus_per_worker: float = 1.0,
    address: str | None = None,
) -> Iterator[Event]:
    """Like `pipeline.attribute_images`, with the model work spread over `workers` Ray actors.

    load_args: what `load_stack` takes (preset, lm, encoder, projection, prompt, ...). address: an existing
    Ray cluster ("auto"), or None to start Ray on this machine.
    """
    try:
        import ray
        from ray.util import ActorPool
    except ImportError as err:
        raise MmtuiError("--engine ray needs Ray: pip install 'mmtui[ray]'") from err
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False)
    device = "cuda" if gpus_per_worker > 0 else "cpu"
    actor: Any = ray.remote(num_cpus=cpus_per_worker, num_gpus=gpus_per_worker)(AttributionWorker)
    pool_actors = [actor.remote(load_args, device) for _ in range(workers)]
    infos = ray.get([a.info.remote() for a in pool_actors])
    if len({i["stack_id"] for i in infos}) != 1:
        raise MmtuiError("Ray workers loaded different stacks (check that every node has the same model files)")
    info = infos[0]
    paths = list(paths)
    run_id = store.ensure_run(
        stack_id=info["stack_id"],
        stack_name=info["stack_name"],
        fingerprint=info["fingerprint"],
        shape=info["shape"],
        lm_id=info["lm_id"],
        prompt=info["prompt"],
        site=settings.site,
        y_kind=settings.y_kind,
        settings={"keep": settings.keep, "max_new_tokens": settings.max_new_tokens, "load": info["load"]},
    )
    yield Event("start", message=run_id, total=len(paths))
    if store.count_tokens(info["lm_id"], settings.convention) != info["units"]:
        yield Event("decoding", message="decoding units on a worker", total=1)
        for rows in ray.get(pool_actors[0].decode.remote(settings.convention)):
            store.add_tokens(info["lm_id"], settings.convention, rows)
        yield Event("decoding", total=1)
    pool = ActorPool(pool_actors)
    warned: set[str] = set()
    in_flight = 0
    size = settings.batch_size if settings.batch_size > 0 else 4  # "auto" is decided per local device only
    writer = StoreWriter(store.path, run_id, timeout=store.timeout)
    try:
        for batch in batches(plan(paths, settings, store.done_keys(run_id), decode=False), size):
            if isinstance(batch, Event):
                yield from route([batch], writer, warned)
                continue
            pool.submit(lambda a, b: a.run.remote(b, settings), batch)
            in_flight += 1
            while in_flight >= 2 * workers:  # keep every worker busy, the driver's memory bounded
                yield from route(pool.get_next_unordered(), writer, warned)
                in_flight -= 1
        while in_flight:
            yield from route(pool.get_next_unordered(), writer, warned)
            in_flight -= 1
        yield from writer.finish()
    finally:
        writer.close()
