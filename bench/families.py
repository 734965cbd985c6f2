"""Attribution overhead per LM family on the tiny configs: mmtui's pass against a plain forward + backward.

    python bench/families.py                 # every tested family, CPU, batch 8
    python bench/families.py --families qwen3,gemma2 --batch 4 --reps 5

Per family (mmtui.stacks.tiny.FAMILY_CONFIGS, plus the tiny GPT-J), on the same batch (same images, targets
and context lengths), the methods taking turns:
- mmtui: `score_targets` (forward with the hooks, logits at the read position, backward to the activations,
  g reduced to the top triples and per-unit max / sum), at the post and the pre site.
- plain: the CausalLM's own forward (logits everywhere, soft-capped where the family caps them) and a backward
  to the input embeddings: what a user's first try costs (bench/attribution.py's "naive floor").
The ratio mmtui / plain is the overhead. The toy sizes make fixed costs (hooks, Python) loom larger than on
a real model; bench/attribution.py measures the real default stack.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from attribution import fixed_targets, images, interleaved, y_full_logits  # noqa: E402

from mmtui.run.attribution import score_targets  # noqa: E402
from mmtui.stacks.base import Stack  # noqa: E402
from mmtui.stacks.lm import TESTED  # noqa: E402


def tiny_stack(family: str) -> Stack:
    from mmtui.stacks.tiny import tiny_parts
    from mmtui.stacks.vision import BeitEncoder

    lm, beit, processor, proj, tok = tiny_parts(0, torch.float32, family=family)
    return Stack(
        name=family,
        encoder=BeitEncoder(beit, processor, "tiny-beit"),
        projection=proj,
        lm=lm,
        tokenizer=tok,
        real_vocab=len(tok),
        identity={"family": family},
    )


def measure(stack: Stack, batch: int, context: int, reps: int) -> dict[str, float]:
    prefix = stack.encode(images(batch))
    targets = fixed_targets(stack, batch, context)
    embeds, lengths = stack.build_inputs(prefix, [t.context_ids for t in targets])
    token_ids = torch.tensor([t.token_id for t in targets])

    def plain() -> None:
        with torch.enable_grad():
            e = embeds.detach().requires_grad_(True)
            torch.autograd.grad(y_full_logits(stack, e, lengths, token_ids).sum(), e)

    methods = {
        "plain": plain,
        "post": lambda: score_targets(stack, prefix, targets, site="post"),
        "pre": lambda: score_targets(stack, prefix, targets, site="pre"),
    }
    return {"tokens": embeds.shape[1], **interleaved(methods, stack.device, reps)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", default=",".join(TESTED))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--context", type=int, default=12, help="caption tokens before the target")
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    table = Table(title=f"tiny LM families, CPU float32, batch {args.batch}, {args.context} caption tokens")
    for column in ("family", "layout", "tokens", "plain fwd+bwd ms", "mmtui post ms", "post / plain"):
        table.add_column(column, justify="left" if column in ("family", "layout") else "right")
    table.add_column("mmtui pre ms", justify="right")
    table.add_column("pre / plain", justify="right")
    for family in args.families.split(","):
        stack = tiny_stack(family)
        f = stack.adapter.family
        layout = f"{f.w_in}/{f.w_out}" + (" (fused)" if f.fused_gate else "") + (", 1+w norm" if f.norm_offset else "")
        t = measure(stack, args.batch, args.context, args.reps)
        table.add_row(
            family,
            layout,
            str(t["tokens"]),
            f"{t['plain'] * 1e3:.1f}",
            f"{t['post'] * 1e3:.1f}",
            f"{t['post'] / t['plain']:.2f}",
            f"{t['pre'] * 1e3:.1f}",
            f"{t['pre'] / t['plain']:.2f}",
        )
    Console(width=160).print(table)


if __name__ == "__main__":
    main()
