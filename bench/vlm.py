"""Attribution overhead on whole VLM stacks (`--vlm`): mmtui's pass against a plain forward + backward of the VLM.

    python bench/vlm.py                                  # the tiny LLaVA-1.5 and LLaVA-NeXT, CPU, batch 4
    python bench/vlm.py --batch 2 --reps 5 --context 12
    python bench/vlm.py --vlm llava-hf/llava-v1.6-mistral-7b-hf --device cuda --batch 1   # a real checkpoint

Per checkpoint, on the same batch (same photos, the stack's chat template, the same caption tokens before the
target), the methods taking turns:
- mmtui: `Stack.encode` (vision tower, projector; NeXT's packing) and `score_targets` (the LM forward with the
  hooks, logits at the read position, backward to the MLP activations, g reduced to the top triples and per-unit
  max / sum), at the post site.
- plain: the VLM's own forward from the processor's input ids and pixels (`model(**inputs)`: tower, projector,
  the LM with logits everywhere) and a backward of the same y = P(target) to the LM's input embeddings, the
  least any attribution to image tokens needs (what bench/families.py calls plain).
Both start from preprocessed pixels. The ratio mmtui / plain is the overhead; y of both is checked equal. The
tiny configs make fixed costs (hooks, Python, the processor-free packing) loom larger than on a real model.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from attribution import fixed_targets, images, interleaved  # noqa: E402

from mmtui.run.attribution import score_targets  # noqa: E402
from mmtui.stacks.base import Stack  # noqa: E402


def load(spec: str, device: str) -> tuple[Stack, Any, Any]:
    """(the stack, the checkpoint's own model, its processor) for a VLM folder or hub id."""
    import transformers
    from transformers import AutoConfig, AutoProcessor

    from mmtui.stacks import load_stack
    from mmtui.stacks.vlm import _MODEL_TYPES

    stack = load_stack(vlm=spec, device=device)
    model_class = getattr(transformers, _MODEL_TYPES[AutoConfig.from_pretrained(spec).model_type])
    model = model_class.from_pretrained(spec, dtype=stack.dtype).to(stack.device).eval().requires_grad_(False)
    return stack, model, AutoProcessor.from_pretrained(spec)


def measure(stack: Stack, model: Any, processor: Any, batch: int, context: int, reps: int) -> dict[str, Any]:
    photos = images(batch)
    pixels = stack.pixels(photos)
    targets = fixed_targets(stack, batch, context)
    token_ids = torch.tensor([t.token_id for t in targets], device=stack.device)
    fit = getattr(stack.encoder, "fit", lambda image: image)
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": stack.prompt}]}],
        add_generation_prompt=True,
    )
    inputs = processor(images=[fit(p) for p in photos], text=[text] * batch, return_tensors="pt").to(stack.device)
    context_ids = torch.tensor([t.context_ids for t in targets], device=stack.device)
    inputs["input_ids"] = torch.cat([inputs["input_ids"], context_ids], dim=1)
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    leaves: list[torch.Tensor] = []

    def leaf(_module: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """The LM's input embeddings (image features scattered in) made the leaf that backward reaches."""
        kwargs["inputs_embeds"] = kwargs["inputs_embeds"].detach().requires_grad_(True)
        leaves.append(kwargs["inputs_embeds"])
        return args, kwargs

    def plain() -> torch.Tensor:
        leaves.clear()
        with torch.enable_grad():
            logits = model(**inputs, use_cache=False).logits[:, -1]
            y = torch.softmax(logits.float(), dim=-1)[torch.arange(batch), token_ids]
            torch.autograd.grad(y.sum(), leaves)
        return y.detach()

    def ours() -> list:
        return score_targets(stack, stack.encode(pixels), targets, site="post")

    handle = model.model.language_model.register_forward_pre_hook(leaf, with_kwargs=True)
    try:
        theirs, mine = plain(), ours()
        torch.testing.assert_close(torch.tensor([a.y_c for a in mine]), theirs.cpu().float(), rtol=1e-3, atol=1e-6)
        times = interleaved({"plain": plain, "mmtui": ours}, stack.device, reps)
    finally:
        handle.remove()
    return {"tokens": inputs["input_ids"].shape[1], **times}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vlm", action="append", help="a VLM folder or hub id (repeatable); default: the tiny ones")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--context", type=int, default=12, help="caption tokens before the target")
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    table = Table(title=f"whole VLM stacks, {args.device}, batch {args.batch}, {args.context} caption tokens")
    for column in ("VLM", "image tokens", "tokens", "plain fwd+bwd ms", "mmtui ms", "mmtui / plain"):
        table.add_column(column, justify="left" if column == "VLM" else "right")
    with tempfile.TemporaryDirectory() as tmp:
        specs = args.vlm
        if not specs:
            from mmtui.stacks.tiny import save_tiny_vlm

            specs = [str(save_tiny_vlm(Path(tmp) / f"tiny-{kind}", kind)) for kind in ("llava", "llava_next")]
        for spec in specs:
            stack, model, processor = load(spec, args.device)
            t = measure(stack, model, processor, args.batch, args.context, args.reps)
            name = stack.fingerprint["vlm"] + (f" ({Path(spec).name})" if Path(spec).is_dir() else f" {spec}")
            table.add_row(
                name,
                str(stack.n_patches),
                str(t["tokens"]),
                f"{t['plain'] * 1e3:.1f}",
                f"{t['mmtui'] * 1e3:.1f}",
                f"{t['mmtui'] / t['plain']:.2f}",
            )
    Console(width=160).print(table)


if __name__ == "__main__":
    main()
