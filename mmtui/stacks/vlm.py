"""Whole VLM checkpoints as stacks: transformers' LlavaForConditionalGeneration (LLaVA-1.5 and its kin).

The checkpoint's parts take the Stack's three roles:
- encoder: the vision tower's hidden states at `vision_feature_layer` (one layer, or several concatenated),
  CLS dropped with `vision_feature_select_strategy` "default", kept with "full" (LLaVA's own features);
- projection: the checkpoint's `multi_modal_projector` (Linear-GELU-Linear);
- LM: a causal-LM view that shares the checkpoint's language model and `lm_head` (so `LMAdapter` finds its MLPs).
The text around the image comes from the processor's chat template: a user turn with the image and an
instruction, then the assistant header. The processor's own tokenization of that text is split at the image
tokens: what precedes them becomes `Stack.before_ids` (so the image positions are not the first ones), what
follows them `Stack.after_ids`. The caption is the model's greedy continuation, as `model.generate` gives it.

Unlike the default stacks, the LM here was trained together with the projector (the visual instruction tuning
of LLaVA), so its units are not those of a frozen text-only LM; see the README.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn

from mmtui.errors import StackError
from mmtui.stacks.base import Stack
from mmtui.stacks.vision import VisionEncoder

DEFAULT_INSTRUCTION = "Describe the image in one sentence."
VLM_CLASSES = ("LlavaForConditionalGeneration", "Idefics3ForConditionalGeneration", "SmolVLMForConditionalGeneration")


class LlavaEncoder(VisionEncoder):
    """A LLaVA vision tower's features as LLaVA selects them: [B, n_tokens, d_vision * n_layers].

    cells: per image token, its cell of the row-major patch grid, -1 for a CLS token ("full" strategy).
    """

    def __init__(
        self,
        tower: nn.Module,
        image_processor: Callable[..., Any],
        layer: int | Sequence[int],
        strategy: str,
        n_extra: int,
        name: str,
    ) -> None:
        super().__init__(lambda images: image_processor(images=list(images), return_tensors="pt")["pixel_values"])
        if strategy not in ("default", "full"):
            raise StackError(f"{name}: vision_feature_select_strategy {strategy!r} is not one LLaVA defines")
        self.model = tower.eval().requires_grad_(False)
        self.name = name
        cfg: Any = tower.config
        side = cfg.image_size // cfg.patch_size
        self.grid = (side, side)
        self.layers = [layer] if isinstance(layer, int) else list(layer)
        self.strategy = strategy
        self.dim = cfg.hidden_size * len(self.layers)
        kept_extra = n_extra - (1 if strategy == "default" else 0)  # "default" drops the first (CLS) token
        if kept_extra < 0:
            raise StackError(f"{name}: strategy 'default' drops a CLS token, but the tower has none")
        self.cells = [-1] * kept_extra + list(range(side * side))

    @property
    def n_patches(self) -> int:
        """Image tokens per image (LLaVA-1.5: 576), patches or not."""
        return len(self.cells)

    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        pixels = pixels.to(next(self.model.parameters()).dtype)
        hidden = self.model(pixel_values=pixels, output_hidden_states=True).hidden_states
        start = 1 if self.strategy == "default" else 0
        return torch.cat([hidden[layer][:, start:] for layer in self.layers], dim=-1)


class CheckpointProjection(nn.Module):
    """A checkpoint's own projector (features [B, P, d_in] -> [B, P, d_out]), run in its weights' dtype."""

    def __init__(self, projector: nn.Module, d_in: int, d_out: int) -> None:
        super().__init__()
        self.projector = projector.eval().requires_grad_(False)
        self.d_in, self.d_out = d_in, d_out

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.projector(features.to(next(self.projector.parameters()).dtype))


def causal_view(vlm: Any) -> Any:
    """A CausalLM of the checkpoint's text config whose body and head are the checkpoint's own modules
    (no weight is copied: built on the meta device, then given the language model and lm_head)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        causal = AutoModelForCausalLM.from_config(vlm.config.text_config)
    prefix = causal.base_model_prefix  # "model" for Llama, Mistral, Qwen2, ...
    body = vlm.model.language_model if hasattr(vlm.model, "language_model") else vlm.model.text_model  # Idefics3
    setattr(causal, prefix, body)
    causal.lm_head = vlm.lm_head
    return causal


def folder_sha256(folder: Path) -> str:
    """One sha256 over the files of a checkpoint folder (names and contents; each file's hash memoized)."""
    from mmtui.stacks.converted import gguf_sha256

    digest = hashlib.sha256()
    for path in sorted(p for p in folder.iterdir() if p.is_file()):
        digest.update(f"{path.name}\0{gguf_sha256(path)}\n".encode())
    return digest.hexdigest()


def template_ids(processor: Any, instruction: str, n_tokens: int) -> tuple[list[int], list[int], str]:
    """(ids before the image tokens, ids after them, the templated text) for one image and `instruction`,
    from the processor's chat template and its own tokenization of a probe image and that text."""
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": instruction}]}]
    if getattr(processor, "chat_template", None) is None:
        raise StackError("the checkpoint's processor has no chat template; it cannot place the image")
    text = processor.apply_chat_template(conversation, add_generation_prompt=True)
    probe = Image.new("RGB", (64, 64), (128, 128, 128))
    ids = processor(images=[probe], text=text, return_tensors="pt")["input_ids"][0].tolist()
    at = [i for i, t in enumerate(ids) if t == processor.image_token_id]
    if not at or at != list(range(at[0], at[0] + len(at))):
        raise StackError(f"the chat template places {len(at)} image tokens, not one contiguous run")
    if len(at) != n_tokens:
        raise StackError(f"the processor gives {len(at)} image tokens, the vision tower {n_tokens}")
    return ids[: at[0]], ids[at[-1] + 1 :], text


def _real_vocab(processor: Any) -> int:
    """Token ids below this are words: the image token (and the padding after it) added past the LM's
    vocabulary are not (LLaVA-1.5: <image> 32000, <pad> 32001)."""
    tok = processor.tokenizer
    image_id = int(processor.image_token_id)
    return image_id if image_id >= tok.vocab_size else len(tok)


def load_vlm(
    spec: str,
    *,
    revision: str | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | None = None,
    instruction: str | None = None,
    progress: Callable[[str], None] | None = None,
) -> Stack:
    """A Stack from a LLaVA checkpoint: a hub id (with `revision`) or a local folder saved with save_pretrained;
    an Idefics3 or SmolVLM checkpoint goes to mmtui.stacks.idefics.

    instruction: the user turn's text after the image (default DEFAULT_INSTRUCTION). Raises StackError naming
    the problem.
    """
    from transformers import AutoConfig, AutoProcessor, LlavaForConditionalGeneration
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    instruction = instruction or DEFAULT_INSTRUCTION
    device = device or torch.device("cpu")
    if spec.startswith(("/", ".", "~")) and not Path(spec).expanduser().is_dir():
        raise StackError(
            f"--vlm {spec}: no such folder; pass a checkpoint folder (save_pretrained) or a hub id such as "
            "llava-hf/llava-1.5-7b-hf"
        )
    if progress:
        progress(f"loading {spec}")
    try:
        config = AutoConfig.from_pretrained(spec, revision=revision)
        arch = (getattr(config, "architectures", None) or [type(config).__name__])[0]
        if config.model_type in ("idefics3", "smolvlm"):
            from mmtui.stacks.idefics import load_idefics

            return load_idefics(
                spec,
                config.model_type,
                revision=revision,
                dtype=dtype,
                device=device,
                instruction=instruction,
                progress=progress,
            )
        if config.model_type != "llava":
            raise StackError(
                f"--vlm {spec}: a {arch} checkpoint (model_type {config.model_type!r}); supported: "
                f"{', '.join(VLM_CLASSES)}"
            )
        model = LlavaForConditionalGeneration.from_pretrained(spec, revision=revision or "main", dtype=dtype)
        processor = AutoProcessor.from_pretrained(spec, revision=revision)
    except (OSError, ValueError) as err:
        raise StackError(f"cannot load the VLM {spec!r}: {str(err).splitlines()[0]}") from err
    model.eval().requires_grad_(False)
    cfg: Any = model.config
    tower = model.model.vision_tower
    encoder = LlavaEncoder(
        tower,
        processor.image_processor,
        cfg.vision_feature_layer,
        cfg.vision_feature_select_strategy,
        int(getattr(processor, "num_additional_image_tokens", 0) or 0),
        f"{spec}:vision_tower",
    )
    d_model = cfg.text_config.hidden_size
    projection = CheckpointProjection(model.model.multi_modal_projector, encoder.dim, d_model)
    before, after, text = template_ids(processor, instruction, encoder.n_patches)
    folder = Path(spec)
    identity: dict[str, Any] = {
        "vlm": type(model).__name__,
        "lm": spec if not folder.is_dir() else f"folder:{folder.resolve().name}",
        "lm_revision": revision,
        "lm_commit": getattr(cfg, "_commit_hash", None),
        "vlm_template": hashlib.sha256(repr((before, after)).encode()).hexdigest()[:16],
    }
    if folder.is_dir():
        if progress:
            progress("hashing the checkpoint folder")
        identity["lm_sha256"] = folder_sha256(folder)
    return Stack(
        name=f"vlm:{folder.name if folder.is_dir() else spec}",
        encoder=encoder.to(device),
        projection=projection.to(device),  # type: ignore[arg-type]  # duck-typed: d_in, d_out, forward
        lm=causal_view(model).to(device),
        tokenizer=processor.tokenizer,
        real_vocab=_real_vocab(processor),
        identity=identity,
        prompt=instruction,
        device=device,
        dtype=dtype,
        before_ids=before,
        after_ids=after,
    )
