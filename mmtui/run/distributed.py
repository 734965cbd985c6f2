"""Attribution on Ray: one model replica per worker (a GPU each, or CPU cores), results streamed back to the
driver, which alone writes the SQLite cache (single writer, resumable as a local run).

Install with `pip install 'mmtui[ray]'`. Images travel to the workers as bytes, so the workers need no
shared file system; a bad image is reported by the worker that fails to decode it. The run itself (the run
row, decoding, planning, writing) is `pipeline.run_attribution`'s; this module is its RayEngine.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from mmtui.errors import MmtuiError
from mmtui.run.events import Event
from mmtui.run.pipeline import Settings, WorkItem, attribute_batch, run_attribution
from mmtui.store import StackIdentity, Store


class AttributionWorker:
    """A Ray actor holding one stack (loaded once, from the driver's load arguments)."""

    def __init__(self, load_args: dict[str, Any], device: str) -> None:
        from mmtui.stacks.presets import load_stack

        args = dict(load_args)
        self.stack = load_stack(args.pop("preset"), device=device, **args)

    def info(self) -> tuple[StackIdentity, dict[str, Any]]:
        """The stack's identity and its load arguments."""
        return self.stack.identify(), self.stack.load_args

    def decode(self, convention: str) -> list[list[dict]]:
        from mmtui.run.decoding import decode_units

        return list(decode_units(self.stack, convention))

    def run(self, batch: list[WorkItem], settings: Settings) -> list[Event]:
        return attribute_batch(self.stack, batch, settings)


class RayEngine:
    """The model work of a run on a pool of Ray actors: batches go to whichever is free, at most two per
    worker in flight (every worker busy, the driver's memory bounded)."""

    decodes_images = False  # the workers decode the bytes
    decoding_steps = 1  # one worker decodes every unit in one call

    def __init__(self, actors: list[Any]) -> None:
        import ray

        self.actors = actors
        infos = ray.get([a.info.remote() for a in actors])
        if len({identity.id for identity, _ in infos}) != 1:
            raise MmtuiError("Ray workers loaded different stacks (check that every node has the same model files)")
        self.identity, self.load_args = infos[0]

    def decodings(self, convention: str) -> Iterator[list[dict[str, Any]]]:
        import ray

        layers = ray.get(self.actors[0].decode.remote(convention))
        yield [row for rows in layers for row in rows]

    def prepare(self, settings: Settings) -> Iterator[Event]:
        if settings.batch_size <= 0:
            settings.batch_size = 4  # "auto" is decided per local device only
        yield from ()

    def results(self, work: Iterator[list[WorkItem] | Event], settings: Settings) -> Iterator[list[Event]]:
        from ray.util import ActorPool

        pool = ActorPool(self.actors)
        in_flight = 0
        for batch in work:
            if not isinstance(batch, list):
                yield [batch]
                continue
            pool.submit(lambda a, b: a.run.remote(b, settings), batch)
            in_flight += 1
            while in_flight >= 2 * len(self.actors):
                yield pool.get_next_unordered()
                in_flight -= 1
        while in_flight:
            yield pool.get_next_unordered()
            in_flight -= 1


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
    except ImportError as err:
        raise MmtuiError("--engine ray needs Ray: pip install 'mmtui[ray]'") from err
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False)
    device = "cuda" if gpus_per_worker > 0 else "cpu"
    actor = ray.remote(num_cpus=cpus_per_worker, num_gpus=gpus_per_worker)(AttributionWorker)
    engine = RayEngine([actor.remote(load_args, device) for _ in range(workers)])
    yield from run_attribution(engine, store, paths, settings)
