"""Idefics3 and SmolVLM checkpoints as stacks: transformers' Idefics3ForConditionalGeneration (Idefics3, and the
SmolVLM 256M / 500M / 2.2B checkpoints, whose configs are `idefics3`) and SmolVLMForConditionalGeneration (SmolVLM2),
reached with `--vlm` (mmtui.stacks.vlm.load_vlm dispatches on model_type).

The checkpoint's parts take the Stack's three roles:
- encoder: the SigLIP-style vision model's `last_hidden_state` (its post-layernorm applied) over a side x side patch
  grid, then the connector's parameter-free pixel shuffle, which merges each scale x scale block of patches into one
  token of width d_vision * scale^2: the image tokens are the cells of the merged (side/scale) x (side/scale) grid,
  row-major (SmolVLM-256M: 512 px / 16 px = 32 x 32 patches, scale 4, 8 x 8 = 64 tokens; Idefics3-8B: 364 / 14 =
  26 x 26 patches, scale 2, 13 x 13 = 169 tokens);
- projection: the connector's `modality_projection` (one Linear, no bias);
- LM: a causal-LM view sharing the checkpoint's text model and `lm_head` (mmtui.stacks.vlm.causal_view).

Image splitting is off: each image is the processor's global image only, resized (as the processor does with
`do_image_splitting=False`) to a max_image_size square, so every image gives the same `image_seq_len` tokens in one
contiguous run, `<fake_token_around_image><global-img>` before it and `<fake_token_around_image>` after it (both in
the template's text around the image). With splitting on (the checkpoints' default), the processor cuts the image
into R x C tiles of max_image_size, R and C following the image's size, and writes
`<fake_token_around_image><row_r_col_c>` + image_seq_len image tokens per tile, a newline after each row of tiles,
then the global image as above: the image tokens are interleaved with text and their count varies per image.
Supporting that would need (1) a fixed layout: the tiling follows the aspect ratio only (the longest edge is first
resized to size["longest_edge"]), so images cropped or resized to a square all give (longest_edge / max_image_size)^2
tiles (SmolVLM-256M: 2048 / 512, 4 x 4 tiles + the global image = 17 x 64 = 1,088 image tokens); (2) an image run
that carries the text tokens between tiles (positions whose embeddings are the words', not the projection's, with
cell -1), which the Stack's one-prefix-per-image contract does not have; and (3) cells over a (tile, row, col) map,
the global image's tokens mapped onto the same picture at a coarser scale. None of that is built here.

As with LLaVA, the LM was trained together with the connector, so its units are not those of a frozen text-only
LM; see the README.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from PIL import Image
from torch import nn

from mmtui.errors import StackError
from mmtui.stacks.base import Stack
from mmtui.stacks.vision import VisionEncoder
from mmtui.stacks.vlm import CheckpointProjection, checkpoint_stack, load_checkpoint

# model_type -> the transformers class that loads it
IDEFICS_CLASSES = {"idefics3": "Idefics3ForConditionalGeneration", "smolvlm": "SmolVLMForConditionalGeneration"}


def global_pixels(image_processor: Callable[..., Any], images: Sequence[Image.Image]) -> torch.Tensor:
    """The processor's global image of each PIL image, without splitting: [B, 3, m, m] (m = max_image_size)."""
    out = image_processor(images=[[image] for image in images], do_image_splitting=False, return_tensors="pt")
    return out["pixel_values"][:, 0]  # [B, 1 image each, 3, m, m]


class IdeficsEncoder(VisionEncoder):
    """An Idefics3 / SmolVLM vision model followed by the connector's pixel shuffle: [B, n_tokens, d_vision * scale^2].

    grid: the merged grid (patches per side / scale); cells: the identity (token t is merged cell t, row-major).
    """

    def __init__(
        self,
        vision_model: nn.Module,
        pixel_shuffle: Callable[[torch.Tensor, int], torch.Tensor],
        image_processor: Callable[..., Any],
        scale: int,
        image_px: int,
        name: str,
    ) -> None:
        super().__init__(lambda images: global_pixels(image_processor, images))
        self.model = vision_model.eval().requires_grad_(False)
        self.pixel_shuffle = pixel_shuffle
        self.name = name
        cfg: Any = vision_model.config
        side = image_px // cfg.patch_size
        if side * cfg.patch_size != image_px or side % scale:
            raise StackError(
                f"{name}: a {image_px} px image in {cfg.patch_size} px patches does not merge by the scale factor {scale}"
            )
        self.scale = scale
        self.patch_side = side  # patches per side before the shuffle
        self.grid = (side // scale, side // scale)
        self.dim = cfg.hidden_size * scale * scale
        self._set_cells()

    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        pixels = pixels.to(next(self.model.parameters()).dtype)
        hidden = self.model(pixel_values=pixels).last_hidden_state  # [B, side^2, d_vision]
        return self.pixel_shuffle(hidden, self.scale)  # [B, (side / scale)^2, d_vision * scale^2]


def _real_vocab(tokenizer: Any) -> int:
    """Token ids below this are words: the base vocabulary, without the tokens the checkpoint added (the image,
    `<fake_token_around_image>`, `<global-img>`, the `<row_r_col_c>` tags, `<end_of_utterance>`)."""
    return min(int(tokenizer.vocab_size), len(tokenizer))


def load_idefics(
    spec: str,
    model_type: str,
    *,
    revision: str | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | None = None,
    instruction: str,
    progress: Callable[[str], None] | None = None,
) -> Stack:
    """A Stack from an Idefics3 or SmolVLM checkpoint (hub id with `revision`, or a save_pretrained folder),
    global image only (see the module docstring). Raises StackError naming the problem."""
    model, processor = load_checkpoint(spec, IDEFICS_CLASSES[model_type], revision, dtype)
    cfg: Any = model.config
    image_processor = processor.image_processor
    image_processor.do_image_splitting = False  # the global image only: one run of image_seq_len tokens
    image_px = int(image_processor.max_image_size["longest_edge"])
    connector = model.model.connector
    encoder = IdeficsEncoder(
        model.model.vision_model,
        connector.pixel_shuffle,
        image_processor,
        int(cfg.scale_factor),
        image_px,
        f"{spec}:vision_model",
    )
    if encoder.n_patches != processor.image_seq_len:
        raise StackError(
            f"--vlm {spec}: the processor's image_seq_len is {processor.image_seq_len}, but a {image_px} px image "
            f"gives {encoder.n_patches} tokens after the pixel shuffle"
        )
    projection = CheckpointProjection(connector.modality_projection, encoder.dim, cfg.text_config.hidden_size)
    return checkpoint_stack(
        spec,
        model,
        processor,
        encoder,
        projection,
        revision=revision,
        instruction=instruction,
        real_vocab=_real_vocab(processor.tokenizer),
        device=device or torch.device("cpu"),
        dtype=dtype,
        identity={"vlm_image": f"global {image_px}px, no splitting"},
        progress=progress,
    )
