"""Train the projection (linear, or LLaVA's MLP) of a stack with its LM and image encoder frozen (LiMBeR's recipe).

Loss: the LM's next-token loss on a human caption read after [image prefix] + prompt, the caption ending in
the LM's end-of-sequence token so that greedy captions stop. Only the projection's weights train. Encoder
features are computed once per image and cached on disk. Progress goes through a callback; a checkpoint is
written every few steps and on Ctrl-C, and a rerun with the same data and settings resumes from it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mmtui.stacks.base import DEFAULT_PROMPT, Stack
from mmtui.stacks.projection import KINDS, BaseProjection, MLPProjection, Projection
from mmtui.training.caption_data import CaptionSource, encoder_key
from mmtui.training.caption_loss import caption_examples, caption_nll, evaluate
from mmtui.training.data import (
    ProgressFn,
    TrainingData,
    TrainingError,
    TrainingInterrupted,
    TrainProgress,
    prepare_data,
    word_embedding_norm,
)

CARD_FORMAT = "mmtui-projection-card/1"
CAPTION_MODES = ("all", "one")


@dataclass
class TrainConfig:
    """Settings of one training run (all recorded in the card).

    norm: "auto" rescales every projected token to the mean L2 norm of the LM's word embeddings, a number to
    that norm, None keeps the plain linear map. learn_scale: that norm is a trained parameter.
    captions: "all" (every caption of every image is one sample per epoch) or "one" (one random caption per
    image per epoch). epochs may be fractional. kind: "linear" (LiMBeR) or "mlp" (LLaVA's Linear-GELU-Linear).
    """

    epochs: float = 4.0
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.0
    warmup: float = 0.05
    norm: float | str | None = "auto"
    learn_scale: bool = False
    captions: str = "all"
    seed: int = 0
    kind: str = "linear"
    max_tokens: int = 40
    checkpoint_every: int = 100
    amp: bool = True  # bfloat16 autocast of the frozen LM on CUDA


@dataclass
class TrainResult:
    projection: BaseProjection
    card: dict[str, Any]
    path: Path


def _epoch_samples(data: TrainingData, config: TrainConfig, epoch: int) -> list[tuple[int, list[int]]]:
    """This epoch's (feature row, caption tokens) samples in order; deterministic in (seed, epoch)."""
    gen = torch.Generator().manual_seed(config.seed * 100_003 + epoch)
    if config.captions == "all":
        samples = [(im.row, toks) for im in data.train for toks in im.tokens]
    else:
        picks = torch.randint(0, 1 << 30, (len(data.train),), generator=gen).tolist()
        samples = [(im.row, im.tokens[p % len(im.tokens)]) for im, p in zip(data.train, picks, strict=True)]
    return [samples[i] for i in torch.randperm(len(samples), generator=gen).tolist()]


def _schedule(config: TrainConfig, total: int) -> Callable[[int], float]:
    """Linear warm-up then cosine decay to zero (one cycle)."""
    warm = max(1, int(config.warmup * total))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total - warm))))

    return factor


def _run_id(stack: Stack, data: TrainingData, config: TrainConfig) -> str:
    keep = {k: v for k, v in dataclasses.asdict(config).items() if k != "checkpoint_every"}
    if keep["kind"] == "linear":  # the runs of before `kind` existed keep their ids (and their checkpoints)
        del keep["kind"]
    parts = {"config": keep, "data": data.sha256, "lm": stack.identity.get("lm"), "prompt": stack.prompt}
    parts["encoder"] = encoder_key(stack.identity, stack.encoder.name, stack.dtype)
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _save_checkpoint(path: Path, run_id: str, step: int, proj: BaseProjection, opt, sched, loss: float) -> None:
    state = {
        "run_id": run_id,
        "step": step,
        "loss": loss,
        "projection": proj.state_dict(),
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
    }
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def load_training_stack(
    preset: str = "smol",
    *,
    lm: str | None = None,
    encoder: str | None = None,
    device: str = "auto",
    prompt: str = DEFAULT_PROMPT,
) -> Stack:
    """A preset's frozen LM and encoder with a placeholder projection: training needs no projection file.

    Weights stay float32 (on CUDA the LM runs under bfloat16 autocast while training).
    """
    from mmtui.stacks import presets

    if preset not in presets.PRESETS:
        raise TrainingError(f"unknown preset {preset!r}; choose one of {', '.join(presets.PRESETS)}")
    return presets.load_stack(
        preset, lm=lm, encoder=encoder, device=device, dtype=torch.float32, prompt=prompt, untrained_projection=True
    )


def new_projection(stack: Stack, config: TrainConfig) -> BaseProjection:
    """An untrained projection of the config's kind for the stack, seeded; its norm resolved from the config."""
    if config.kind not in KINDS:
        raise TrainingError(f"projection kind must be one of {', '.join(KINDS)}, not {config.kind!r}")
    norm = config.norm
    if norm == "auto":
        norm = word_embedding_norm(stack)
    if isinstance(norm, str):
        raise TrainingError(f"norm must be 'auto', a number or None, not {norm!r}")
    torch.manual_seed(config.seed)
    kind = MLPProjection if config.kind == "mlp" else Projection
    return kind(stack.encoder.dim, stack.adapter.embedding().shape[1], norm, config.learn_scale)


def fit(
    stack: Stack,
    data: TrainingData,
    config: TrainConfig,
    checkpoint: Path | str,
    *,
    on_progress: ProgressFn | None = None,
) -> tuple[BaseProjection, dict[str, Any]]:
    """Train a projection on `data.train`; resume from `checkpoint` when it holds this very run.

    Returns the projection (eval mode, frozen) and the training facts for the card. Ctrl-C saves the
    checkpoint and raises TrainingInterrupted.
    """
    if config.captions not in CAPTION_MODES:
        raise TrainingError(f"captions must be one of {', '.join(CAPTION_MODES)}, not {config.captions!r}")
    checkpoint = Path(checkpoint)
    run_id = _run_id(stack, data, config)
    proj = new_projection(stack, config).to(stack.device).train()
    params = [p for p in proj.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    per_epoch = math.ceil(len(_epoch_samples(data, config, 0)) / config.batch_size)
    total = max(1, math.ceil(config.epochs * per_epoch))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule(config, total))
    running: float | None = None
    step = 0
    if checkpoint.is_file():
        state = torch.load(checkpoint, map_location=stack.device, weights_only=True)
        if state.get("run_id") != run_id:
            raise TrainingError(
                f"{checkpoint}: checkpoint of another run (other data or settings); delete it to start afresh"
            )
        proj.load_state_dict(state["projection"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        step, running = int(state["step"]), state.get("loss")
    features = data.features.to(stack.device) if stack.device.type == "cuda" else data.features
    started, resumed_at = time.monotonic(), step
    epoch, samples = -1, []
    try:
        while step < total:
            if step // per_epoch != epoch:
                epoch = step // per_epoch
                samples = _epoch_samples(data, config, epoch)
            offset = (step % per_epoch) * config.batch_size
            batch = samples[offset : offset + config.batch_size]
            nll, count = caption_nll(stack, proj, features[[r for r, _ in batch]], [t for _, t in batch], config.amp)
            loss = nll / count
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
            if step % config.checkpoint_every == 0 or step == total:
                _save_checkpoint(checkpoint, run_id, step, proj, opt, sched, running)
            if on_progress is not None:
                on_progress(TrainProgress("train", step, total, running, float(sched.get_last_lr()[0])))
    except KeyboardInterrupt:
        _save_checkpoint(checkpoint, run_id, step, proj, opt, sched, running or float("nan"))
        raise TrainingInterrupted(step, checkpoint) from None
    facts = {
        "steps": total,
        "steps_per_epoch": per_epoch,
        "samples_per_epoch": len(_epoch_samples(data, config, 0)),
        "train_loss": running,
        "norm_value": proj.norm,
        "final_scale": float(proj.log_scale.detach().exp()) if proj.learn_scale else proj.norm,
        "resumed_at_step": resumed_at or None,
        "train_seconds": round(time.monotonic() - started, 1),
    }
    return proj.eval().requires_grad_(False), facts


def heldout_report(
    stack: Stack,
    proj: BaseProjection,
    data: TrainingData,
    *,
    batch_size: int = 64,
    amp: bool = True,
    examples: int = 8,
    on_progress: ProgressFn | None = None,
) -> tuple[dict[str, Any], list[dict[str, str]]]:
    """Matched vs shuffled held-out losses per source, and greedy captions of a few held-out images each."""
    features = data.features.to(stack.device) if stack.device.type == "cuda" else data.features
    losses: dict[str, Any] = {}
    shown: list[dict[str, str]] = []
    for done, (name, images) in enumerate(sorted(data.heldout.items()), 1):
        losses[name] = evaluate(stack, proj, features, images, batch_size=batch_size, amp=amp)
        shown += [{"source": name, **ex} for ex in caption_examples(stack, proj, features, images[:examples])]
        if on_progress is not None:
            on_progress(TrainProgress("eval", done, len(data.heldout)))
    return losses, shown


def train_projection(
    stack: Stack,
    sources: Sequence[CaptionSource],
    out: Path | str,
    config: TrainConfig | None = None,
    *,
    cache_dir: Path | str,
    checkpoint: Path | str | None = None,
    exclude: Iterable[str] = (),
    examples: int = 8,
    workers: int = 4,
    on_progress: ProgressFn | None = None,
) -> TrainResult:
    """Features -> training -> held-out report -> `out` (safetensors with its card in the metadata, and the
    same card beside it as `<out>.json`). checkpoint defaults to `<out>.ckpt`."""
    config = config or TrainConfig()
    out = Path(out)
    checkpoint = Path(checkpoint) if checkpoint else out.with_name(out.name + ".ckpt")
    started = time.monotonic()
    data = prepare_data(
        stack,
        sources,
        cache_dir,
        exclude=exclude,
        max_tokens=config.max_tokens,
        workers=workers,
        on_progress=on_progress,
    )
    proj, facts = fit(stack, data, config, checkpoint, on_progress=on_progress)
    losses, shown = heldout_report(
        stack, proj, data, batch_size=config.batch_size, amp=config.amp, examples=examples, on_progress=on_progress
    )
    card = make_card(stack, data, config, facts, losses, shown, time.monotonic() - started)
    out.parent.mkdir(parents=True, exist_ok=True)
    proj.cpu().save(out, card=card)
    out.with_name(out.name + ".json").write_text(json.dumps(card, indent=2, ensure_ascii=False) + "\n")
    return TrainResult(proj, card, out)


def make_card(
    stack: Stack,
    data: TrainingData,
    config: TrainConfig,
    facts: dict[str, Any],
    losses: dict[str, Any],
    examples: list[dict[str, str]],
    seconds: float,
) -> dict[str, Any]:
    """The JSON card stored with a trained projection: what it was trained on, how, and how well."""
    from mmtui import __version__

    parts = {k: v for k, v in stack.identity.items() if k.startswith(("lm", "encoder"))}
    return {
        "format": CARD_FORMAT,
        "mmtui": __version__,
        "projection_kind": config.kind,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "stack": {
            **parts,
            "prompt": stack.prompt,
            "d_in": stack.encoder.dim,
            "d_out": stack.adapter.embedding().shape[1],
            "n_patches": stack.encoder.n_patches,
            "device": str(stack.device),
            "amp": bool(config.amp and stack.device.type == "cuda"),
            "torch": torch.__version__,
        },
        "data": data.sources,
        "unreadable_images": len(data.problems),
        "config": dataclasses.asdict(config),
        "training": facts,
        "heldout": losses,
        "examples": examples,
        "seconds": round(seconds, 1),
    }
