"""Are image prompts already words? (method.md, experiment 1; the paper's Table 2 and Fig. 3)

Each image-prompt embedding (one per patch) is mapped to its k nearest real tokens by cosine in the LM's input
embedding matrix; the tokens, stripped and joined with ", ", are scored with BERTScore against the image's human
captions (mean over them) and with CLIPScore against the image. The same is done for random vectors of matched
statistics (default: Gaussian with the prompts' per-dimension mean and standard deviation; random vector i is
paired with image i mod n), for five nouns of the human captions, and for the model's own greedy caption.
Two-sample KS tests compare the distributions: prompts vs random, and caption nouns vs prompts.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from mmtui.errors import MmtuiError
from mmtui.experiments.stats import KSResult, ks_test
from mmtui.run.images import LoadedImage
from mmtui.store import Store
from mmtui.store import experiments as xs

if TYPE_CHECKING:
    import torch

    from mmtui.experiments.metrics import BertScorer, ClipScorer
    from mmtui.stacks.base import Stack

RANDOM_KINDS = ("matched", "isotropic")
KINDS = ("prompt", "random", "nouns", "caption")
KS_PAIRS = (("prompt", "random"), ("nouns", "prompt"))
METRICS = ("bertscore", "clipscore")
DEFAULT_K = 5
DEFAULT_RANDOM = 1000
NOUNS_PER_IMAGE = 5


class PromptsError(MmtuiError):
    """The prompt experiment cannot run as asked."""


@dataclass
class PromptsResult:
    """Scored texts per kind (rows: kind, image_sha256, idx, text, bertscore, clipscore), KS tests, models."""

    stack_id: str
    settings: dict[str, Any]
    rows: list[dict[str, Any]]
    tests: list[dict[str, Any]] = field(default_factory=list)
    bertscore_model: str | None = None
    clipscore_model: str | None = None

    def scores(self, kind: str, metric: str) -> np.ndarray:
        vals = [r[metric] for r in self.rows if r["kind"] == kind and r[metric] is not None]
        return np.asarray(vals, dtype=np.float64)


def nearest_tokens(stack: Stack, vectors: torch.Tensor, k: int = DEFAULT_K, chunk: int = 512) -> torch.Tensor:
    """Ids of the k real tokens whose input embeddings have the highest cosine with each vector: [N, k].

    vectors: [N, d_model]. Only ids below stack.real_vocab take part (no added or padding rows).
    """
    import torch

    emb = stack.adapter.embedding()[: stack.real_vocab].detach().float()  # [V, d]
    emb = emb / emb.norm(dim=-1, keepdim=True).clamp_min(1e-8)
    out = []
    with torch.no_grad():
        for start in range(0, vectors.shape[0], chunk):
            v = vectors[start : start + chunk].float().to(emb.device)
            v = v / v.norm(dim=-1, keepdim=True).clamp_min(1e-8)
            out.append((v @ emb.T).topk(k, dim=-1).indices.cpu())  # [n, k]
    return torch.cat(out) if out else torch.zeros(0, k, dtype=torch.long)


def random_vectors(prompts: torch.Tensor, n: int, seed: int = 0, kind: str = "matched") -> torch.Tensor:
    """n random vectors [n, d] of the prompts' statistics (prompts: [M, d_model]).

    matched: Gaussian with the prompts' per-dimension mean and standard deviation.
    isotropic: standard Gaussian directions scaled to the prompts' mean norm (only direction matters for cosine).
    """
    import torch

    if kind not in RANDOM_KINDS:
        raise PromptsError(f"unknown random kind {kind!r}; use one of {', '.join(RANDOM_KINDS)}")
    gen = torch.Generator().manual_seed(seed)
    x = prompts.detach().float().cpu()
    noise = torch.randn(n, x.shape[1], generator=gen)
    if kind == "matched":
        return x.mean(0) + noise * x.std(0)
    return noise / noise.norm(dim=-1, keepdim=True) * x.norm(dim=-1).mean()


def token_text(stack: Stack, ids: Sequence[int]) -> str:
    """The tokens of `ids`, each decoded alone and stripped, joined with ', ' (method.md's comma lists)."""
    return ", ".join(stack.tokenizer.decode([int(i)]).strip() for i in ids)


def caption_nouns(captions: Sequence[str], n: int = NOUNS_PER_IMAGE, seed: int = 0) -> list[str]:
    """Up to n distinct nouns of the human captions (all their nouns, a seeded sample of n, in caption order)."""
    from mmtui.run.nouns import first_noun

    found: list[str] = []
    for caption in captions:
        start = 0
        while (noun := first_noun(caption, start)) is not None:
            word = noun.word.lower()
            if word not in found:
                found.append(word)
            start = noun.start + len(noun.word)
    if len(found) <= n:
        return found
    keep = sorted(np.random.default_rng(seed).choice(len(found), size=n, replace=False).tolist())
    return [found[i] for i in keep]


def decode_prompts(
    stack: Stack,
    store: Store,
    images: Sequence[LoadedImage],
    captions: dict[str, list[str]] | None,
    *,
    k: int = DEFAULT_K,
    n_random: int = DEFAULT_RANDOM,
    seed: int = 0,
    random_kind: str = "matched",
    bertscore: BertScorer | None = None,
    clipscore: ClipScorer | None = None,
    batch_size: int = 8,
    progress: Callable[[str, int, int], None] | None = None,
) -> PromptsResult:
    """Decode and score every image prompt of `images`, random vectors, caption nouns and model captions;
    KS-test the distributions; write it all to the store (tables prompt_texts and ks_tests).

    captions: human captions per image file name (BERTScore needs them; images without any get no BERTScore).
    progress(stage, done, total) is called as the work goes.
    """
    import torch

    if not images:
        raise PromptsError("no images to decode")
    if bertscore is None and clipscore is None:
        raise PromptsError("no metric to score with: BERTScore needs a model and captions, CLIPScore a CLIP model")
    if n_random < 1 or k < 1:
        raise PromptsError("--random and --k must be at least 1")
    refs = [(captions or {}).get(im.path.name, []) for im in images]
    if bertscore is not None and not any(refs):
        raise PromptsError("no image has human captions in the caption file (matched by file name); check --captions")
    report = progress or (lambda *_: None)

    xs.ensure_stack(store, stack.identify())
    prefixes, model_captions = [], []
    report("encoding", 0, len(images))
    for start in range(0, len(images), batch_size):
        chunk = images[start : start + batch_size]
        prefix = stack.encode([im.image for im in chunk])  # [b, P, d_model]
        prefixes.append(prefix.float().cpu())
        model_captions += [stack.caption_text(ids) for ids in stack.generate(prefix)]
        report("encoding", min(start + batch_size, len(images)), len(images))
    prompts = torch.cat(prefixes)  # [N, P, d_model]
    n_img, n_patch, d = prompts.shape
    flat = prompts.reshape(-1, d)
    rand = random_vectors(flat, n_random, seed, random_kind)
    prompt_ids = nearest_tokens(stack, flat, k).tolist()
    random_ids = nearest_tokens(stack, rand, k).tolist()

    rows: list[dict[str, Any]] = []
    for i, im in enumerate(images):
        xs.ensure_image(store, sha256=im.sha256, path=str(im.path), width=im.size[0], height=im.size[1])
        for p in range(n_patch):
            rows.append(_row("prompt", i, im, p, token_text(stack, prompt_ids[i * n_patch + p])))
        if refs[i]:
            rows.append(_row("nouns", i, im, 0, ", ".join(caption_nouns(refs[i], seed=seed))))
        rows.append(_row("caption", i, im, 0, model_captions[i]))
    for j, ids in enumerate(random_ids):
        rows.append(_row("random", j % n_img, images[j % n_img], j, token_text(stack, ids)))
    _score(rows, images, refs, bertscore, clipscore, report)

    settings = {
        "k": k,
        "n_random": n_random,
        "seed": seed,
        "random": random_kind,
        "bertscore_model": bertscore.name if bertscore else None,
        "clipscore_model": clipscore.name if clipscore else None,
        "n_images": n_img,
    }
    for r in rows:
        r["bertscore_model"] = bertscore.name if bertscore and r["bertscore"] is not None else None
        r["clipscore_model"] = clipscore.name if clipscore and r["clipscore"] is not None else None
    xs.add_prompt_texts(store, stack.fingerprint_id, settings, rows)
    result = PromptsResult(
        stack.fingerprint_id,
        settings,
        rows,
        bertscore_model=bertscore.name if bertscore else None,
        clipscore_model=clipscore.name if clipscore else None,
    )
    result.tests = ks_tests_for(result)
    for t in result.tests:
        xs.put_ks_test(store, experiment="prompts", scope=stack.fingerprint_id, settings=settings, **t)
    return result


def _row(kind: str, image_index: int, image: LoadedImage, idx: int, text: str) -> dict[str, Any]:
    return {
        "kind": kind,
        "image_index": image_index,
        "image_sha256": image.sha256,
        "idx": idx,
        "text": text,
        "bertscore": None,
        "clipscore": None,
    }


def _score(
    rows: list[dict[str, Any]],
    images: Sequence[LoadedImage],
    refs: Sequence[list[str]],
    bertscore: BertScorer | None,
    clipscore: ClipScorer | None,
    report: Callable[[str, int, int], None],
) -> None:
    """Fill each row's bertscore (mean F1 over its image's captions) and clipscore (vs its image), in chunks."""
    chunk = 256
    if bertscore is not None:
        todo = [r for r in rows if refs[r["image_index"]]]
        report("BERTScore", 0, len(todo))
        for start in range(0, len(todo), chunk):
            part = todo[start : start + chunk]
            f1 = bertscore.f1_mean([r["text"] for r in part], [refs[r["image_index"]] for r in part])
            for r, v in zip(part, f1.tolist(), strict=True):
                r["bertscore"] = float(v)
            report("BERTScore", min(start + chunk, len(todo)), len(todo))
    if clipscore is not None:
        report("CLIPScore", 0, len(rows))
        for start in range(0, len(rows), chunk):
            part = rows[start : start + chunk]
            vals = clipscore.score([images[r["image_index"]].image for r in part], [r["text"] for r in part])
            for r, v in zip(part, vals.tolist(), strict=True):
                r["clipscore"] = float(v)
            report("CLIPScore", min(start + chunk, len(rows)), len(rows))


def ks_tests_for(result: PromptsResult) -> list[dict[str, Any]]:
    """The KS tests of KS_PAIRS for every metric that has scores in both samples."""
    tests = []
    for metric in METRICS:
        model = result.bertscore_model if metric == "bertscore" else result.clipscore_model
        for a, b in KS_PAIRS:
            sa, sb = result.scores(a, metric), result.scores(b, metric)
            if sa.size and sb.size:
                ks: KSResult = ks_test(sa, sb)
                tests.append(
                    {
                        "metric": metric,
                        "sample_a": a,
                        "sample_b": b,
                        "n_a": ks.n_a,
                        "n_b": ks.n_b,
                        "d": ks.d,
                        "p": ks.p,
                        "model": model,
                    }
                )
    return tests


def table(result: PromptsResult) -> list[dict[str, Any]]:
    """Table 2: per kind, the mean (and n) of each metric."""
    out = []
    for kind in ("random", "prompt", "caption", "nouns"):
        row: dict[str, Any] = {"kind": kind}
        for metric in METRICS:
            vals = result.scores(kind, metric)
            row[metric] = float(vals.mean()) if vals.size else None
            row[f"n_{metric}"] = int(vals.size)
        out.append(row)
    return out
