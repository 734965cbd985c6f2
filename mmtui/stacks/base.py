"""A stack: frozen image encoder -> linear projection -> frozen causal LM.

The LM sees [lead tokens] + [P image-prompt embeddings] + the prompt tokens and captions greedily. The lead is
empty on the default stacks ("A picture of", no BOS: the image sits at positions [0, P)); `bos` puts the LM's
document-start token first, and a VLM checkpoint's chat template puts its user-turn header there
(mmtui.stacks.vlm). `Stack.image_slice` says where the image positions are.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property, partial
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image

from mmtui.defaults import DEFAULT_MAX_NEW_TOKENS, DEFAULT_PROMPT
from mmtui.errors import StackError
from mmtui.stacks.lm import LMAdapter
from mmtui.stacks.projection import BaseProjection
from mmtui.stacks.vision import VisionEncoder
from mmtui.store import StackIdentity

if TYPE_CHECKING:
    from transformers import PreTrainedModel

# document-start tokens by family (GPT-2/J/NeoX, SmolLM, Qwen; Llama 1/2, Mistral; Llama 3; Gemma), first found wins
DOCUMENT_START = ("<|endoftext|>", "<s>", "<|begin_of_text|>", "<bos>")


def _short_version(module_name: str) -> str:
    import importlib

    version = getattr(importlib.import_module(module_name), "__version__", "?")
    return ".".join(version.split("+")[0].split(".")[:2])


@dataclass
class Stack:
    """The three frozen parts plus what is needed to run them.

    real_vocab: only token ids below this are real words (LiMBeR's added `<|image|>` and GPT-J's padding
    rows are excluded from decoding and nearest-token search).
    identity: what the parts are (model ids and revisions or file hashes); see `fingerprint`.
    """

    name: str
    encoder: VisionEncoder
    projection: BaseProjection
    lm: PreTrainedModel
    tokenizer: Any
    real_vocab: int
    identity: dict[str, Any]
    prompt: str = DEFAULT_PROMPT
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.float32
    load_args: dict[str, Any] = field(default_factory=dict)  # how to load it again (see load_stack_for_run)
    before_ids: list[int] = field(default_factory=list)  # tokens before the image (a chat template's header)
    after_ids: list[int] | None = None  # tokens after the image instead of the tokenized prompt (a chat template)
    bos: bool = False  # the LM's document-start token first, before `before_ids` (recorded in the fingerprint)
    adapter: LMAdapter = field(init=False)

    def __post_init__(self) -> None:
        self.lm.eval().requires_grad_(False)
        self.adapter = LMAdapter(self.lm)

    # -- shape facts -----------------------------------------------------------------------------------
    @property
    def n_layers(self) -> int:
        return self.adapter.n_layers

    @property
    def d_mlp(self) -> int:
        return self.adapter.d_mlp

    @property
    def n_patches(self) -> int:
        return self.encoder.n_patches

    @property
    def grid(self) -> tuple[int, int]:
        return self.encoder.grid

    @property
    def lead_ids(self) -> list[int]:
        """Token ids before the image positions: the document-start token (with `bos`), then `before_ids`."""
        return ([self.document_start_id] if self.bos else []) + list(self.before_ids)

    @property
    def image_slice(self) -> slice:
        """The image positions in the LM's input: [len(lead_ids), len(lead_ids) + n_patches)."""
        start = len(self.lead_ids)
        return slice(start, start + self.n_patches)

    @property
    def cells(self) -> list[int]:
        """Per image position, its cell of the row-major patch grid (row * grid_w + col), -1 where the token is
        no patch (a CLS token kept by a VLM's encoder). The identity on the default stacks."""
        cells = getattr(self.encoder, "cells", None)
        return list(cells) if cells is not None else list(range(self.n_patches))

    @cached_property
    def document_start_id(self) -> int:
        """The LM's document-start token: the first of DOCUMENT_START in the vocabulary, else the tokenizer's
        BOS (SmolLM2's BOS is the chat marker <|im_start|>, its document start <|endoftext|>)."""
        vocab = self.tokenizer.get_vocab()
        for text in DOCUMENT_START:
            if text in vocab:
                return int(vocab[text])
        if self.tokenizer.bos_token_id is None:
            raise StackError("--bos: this LM's tokenizer has no document-start (BOS) token; run without --bos")
        return int(self.tokenizer.bos_token_id)

    @property
    def fingerprint(self) -> dict[str, Any]:
        """What makes results comparable: the parts' identities, dtype, and library major.minor versions."""
        return {
            **self.identity,
            **({"bos": self.token_text(self.document_start_id)} if self.bos else {}),
            "dtype": str(self.dtype).removeprefix("torch."),
            "torch": _short_version("torch"),
            "transformers": _short_version("transformers"),
        }

    @property
    def fingerprint_id(self) -> str:
        blob = json.dumps(self.fingerprint, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    @property
    def lm_fingerprint_id(self) -> str:
        """Identity of the LM alone (neuron decodings depend on nothing else)."""
        lm = {k: v for k, v in self.identity.items() if k.startswith("lm") or k == "image_token"}
        blob = json.dumps({**lm, "real_vocab": self.real_vocab}, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def identify(self) -> StackIdentity:
        """What a run records of this stack (Store.ensure_run)."""
        return StackIdentity(
            id=self.fingerprint_id,
            name=self.name,
            fingerprint=self.fingerprint,
            shape=self.shape(),
            lm_id=self.lm_fingerprint_id,
            prompt=self.prompt,
        )

    def shape(self) -> dict[str, Any]:
        return {
            "n_layers": self.n_layers,
            "d_mlp": self.d_mlp,
            "n_patches": self.n_patches,
            "grid": list(self.grid),
            "d_model": self.projection.d_out,
            "family": self.adapter.family.name,
        }

    # -- inputs ----------------------------------------------------------------------------------------
    def tokenize(self, text: str) -> list[int]:
        """Token ids of `text` with no BOS or other special tokens."""
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    @property
    def eos_token_id(self) -> int | None:
        return self.tokenizer.eos_token_id

    def pixels(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """The encoder's preprocessing on the CPU: [B, 3, H, W], in pinned memory when the stack is on a GPU
        (so the copy to the device can overlap compute). Thread-safe: prefetch threads call it."""
        pixels = self.encoder.preprocess(images)
        return pixels.pin_memory() if self.device.type == "cuda" else pixels

    @torch.no_grad()
    def encode(self, images: Sequence[Image.Image] | torch.Tensor) -> torch.Tensor:
        """PIL images (or their `pixels`) -> image-prompt embeddings [B, P, d_model] in the LM's input space."""
        pixels = images if isinstance(images, torch.Tensor) else self.pixels(images)
        feats = self.encoder(pixels.to(self.device, non_blocking=True))  # [B, P, d_vision]
        return self.projection(feats.float()).to(self.dtype)  # [B, P, d_model]

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm.get_input_embeddings()(ids.to(self.device))

    def prompt_ids(self) -> list[int]:
        """The tokens between the image and the caption: `after_ids`, else the prompt's tokens."""
        return list(self.after_ids) if self.after_ids is not None else self.tokenize(self.prompt)

    def build_inputs(
        self, prefix: torch.Tensor, continuations: Sequence[Sequence[int]]
    ) -> tuple[torch.Tensor, list[int]]:
        """[lead] + [prefix] + prompt + each item's continuation tokens, right-padded with zeros.

        prefix: [B, P, d], placed at `image_slice`. Returns (embeds [B, T, d], lengths): with causal attention,
        the padding after an item's last token cannot change anything at or before it, so no attention mask is
        needed.
        """
        prompt = self.prompt_ids()
        text, lengths = self.text_embeds([list(prompt) + list(c) for c in continuations])
        parts = [prefix.to(text.dtype), text]
        lead = self.lead_ids
        if lead:
            ids = torch.tensor([lead], dtype=torch.long)
            parts.insert(0, self.embed_tokens(ids).expand(prefix.shape[0], -1, -1).to(text.dtype))
        embeds = torch.cat(parts, dim=1)  # [B, lead + P + width, d]
        return embeds, [len(lead) + prefix.shape[1] + n for n in lengths]

    def text_embeds(self, rows: Sequence[Sequence[int]]) -> tuple[torch.Tensor, list[int]]:
        """Token rows embedded and right-padded with zero vectors: ([B, width, d], the rows' lengths)."""
        width = max(len(r) for r in rows)
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        text = self.embed_tokens(ids)  # [B, width, d]
        for i, row in enumerate(rows):
            text[i, len(row) :] = 0
        return text, [len(r) for r in rows]

    # -- running the LM --------------------------------------------------------------------------------
    @property
    def stop_token_ids(self) -> list[int]:
        """Tokens that end a caption: EOS and every other special token (SmolLM2 ends a greedy caption with
        <|im_start|>, whose embedding is nearly <|im_end|>'s)."""
        ids = [self.eos_token_id, *getattr(self.tokenizer, "all_special_ids", [])]
        return list(dict.fromkeys(i for i in ids if i is not None))

    def new_cache(self) -> Any:
        """An empty KV cache for `run_lm`, filled in place."""
        from transformers import DynamicCache

        return DynamicCache(config=self.lm.config)

    def cache_copy(self, cache: Any) -> Any:
        """A cache holding `cache`'s keys and values, detached: what runs on it leaves `cache` as it is."""
        copy = self.new_cache()
        for i, layer in enumerate(cache.layers):
            copy.update(layer.keys.detach(), layer.values.detach(), i)
        return copy

    def run_lm(self, cache: Any, **inputs: torch.Tensor) -> torch.Tensor:
        """The LM's body over new tokens (`inputs_embeds=` or `input_ids=`) after what `cache` holds, which
        takes their keys and values. Returns the hidden states [B, T, d_model] (logits: `self.logits`)."""
        return self.lm.base_model(**inputs, use_cache=True, **{self._cache_arg: cache}).last_hidden_state

    @cached_property
    def _cache_arg(self) -> str:
        """transformers 5.x renames the body's `past_key_values=` to `cache=` (5.24 warns on the old name)."""
        import inspect

        return "cache" if "cache" in inspect.signature(self.lm.base_model.forward).parameters else "past_key_values"

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The LM's output layer on final hidden states [..., d_model] -> [..., V], with the family's logit
        soft-capping (Gemma 2), as the CausalLM's own forward computes them."""
        return self.adapter.logits(hidden)

    @torch.no_grad()
    def generate(self, prefix: torch.Tensor, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS) -> list[list[int]]:
        """Greedy (temperature 0) continuation of [lead] + [prefix] + prompt, with the KV cache; stops at a special token."""
        embeds, _ = self.build_inputs(prefix, [[] for _ in range(prefix.shape[0])])
        cache = self.new_cache()
        return self.greedy(self.run_lm(cache, inputs_embeds=embeds)[:, -1], cache, max_new_tokens)

    @torch.no_grad()
    def greedy(self, hidden: torch.Tensor, cache: Any, max_new_tokens: int) -> list[list[int]]:
        """Greedy tokens on from the last position's hidden state [B, d_model], extending `cache`; each row
        cut before its first special token. What `transformers`' greedy `generate` gives (tested)."""
        stops = self.stop_token_ids
        stop_ids = torch.tensor(stops or [-1], device=hidden.device)
        finished = torch.zeros(hidden.shape[0], dtype=torch.bool, device=hidden.device)
        tokens = []
        for step in range(max_new_tokens):
            token = self.logits(hidden).argmax(dim=-1)  # [B]
            token = torch.where(finished, stop_ids[0], token)  # a finished row repeats its stop
            tokens.append(token)
            finished |= torch.isin(token, stop_ids)
            if step == max_new_tokens - 1 or bool(finished.all()):
                break
            hidden = self.run_lm(cache, input_ids=token[:, None])[:, -1]
        rows: list[list[int]] = []
        for row in torch.stack(tokens, dim=1).tolist() if tokens else [[] for _ in range(hidden.shape[0])]:
            cut = next((i for i, t in enumerate(row) if t in stops), len(row))
            rows.append(row[:cut])
        return rows

    def caption_text(self, ids: Sequence[int]) -> str:
        """Decoded caption, cut at the first line break."""
        return self.tokenizer.decode(list(ids), skip_special_tokens=True).split("\n")[0].strip()

    def caption(self, images: Sequence[Image.Image], max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS) -> list[str]:
        """Greedy captions of PIL images."""
        return [self.caption_text(ids) for ids in self.generate(self.encode(images), max_new_tokens)]

    @contextmanager
    def hooks(self, fn: Callable[[int, torch.Tensor], torch.Tensor | None], site: str = "post") -> Iterator[None]:
        """Run `fn(layer, act)` on every layer's MLP activation [B, T, d_mlp] while the block is open.

        Hooks are always removed on exit. Keep the block open until gradients are read: the autograd
        graph holds what the hooks returned, but nothing is re-run on exit.
        """
        handles = []
        try:
            for layer in range(self.n_layers):
                handles.append(self.adapter.site_hook(layer, site, partial(fn, layer)))
            yield
        finally:
            for handle in handles:
                handle.remove()
