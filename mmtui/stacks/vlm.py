"""Whole VLM checkpoints as stacks: transformers' LlavaForConditionalGeneration (LLaVA-1.5 and its kin) and
LlavaNextForConditionalGeneration (LLaVA-NeXT / LLaVA-1.6).

The checkpoint's parts take the Stack's three roles:
- encoder: the vision tower's hidden states at `vision_feature_layer` (one layer, or several concatenated),
  CLS dropped with `vision_feature_select_strategy` "default", kept with "full" (LLaVA's own features);
- projection: the checkpoint's `multi_modal_projector` (Linear-GELU-Linear);
- LM: a causal-LM view that shares the checkpoint's language model and `lm_head` (so `LMAdapter` finds its MLPs).
The text around the image comes from the processor's chat template: a user turn with the image and an
instruction, then the assistant header. The processor's own tokenization of that text is split at the image
tokens: what precedes them becomes `Stack.before_ids` (so the image positions are not the first ones), what
follows them `Stack.after_ids`. The caption is the model's greedy continuation, as `model.generate` gives it.

LLaVA-NeXT ("anyres") cuts an image into a base tile (the whole image resized to the tower's size) and the tiles
of a high-resolution grid chosen per image from `image_grid_pinpoints`, unpads that grid to the image's aspect
ratio and ends each of its rows with the learnt `image_newline` token, so its token count depends on the image's
size. A run keeps a fixed number of image positions (the store's n_patches, the attribution buffer, the heatmap
grid), so every image is stretched to one pinpoint first: the largest (llava-v1.6: 672 x 672, 2 x 2 tiles), which
NeXT's own selection picks for an image of exactly that size, with nothing to unpad. That gives one token count
for every image (llava-v1.6, CLIP-L/336: 576 base + 48 x 48 high-res + 48 newlines = 2928) and one grid. The
alternative, a per-image token count, would make n_patches, the attribution buffer and the cells per image. The
stretch distorts a non-square photo's aspect ratio, as NeXT's own base tile does; what the stack computes is
exactly what the model computes on the stretched image (tested against `model(**processor(...))`).
- encoder: the tower over the base tile and the high-res tiles, in the processor's order;
- projection: the checkpoint's projector, then NeXT's packing (its own `pack_image_features`, read once as a
  token order): base tile, high-res grid row by row with a newline token after each row;
- cells: the high-res grid (48 x 48 on llava-v1.6) is the heatmap grid; the base tile's tokens (a coarser view
  of the same picture) and the newline tokens are not cells (-1). Their scores count like any image token's in
  the run; a heatmap shows the high-res tokens.

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
VLM_CLASSES = (
    "LlavaForConditionalGeneration",
    "LlavaNextForConditionalGeneration",
    "Idefics3ForConditionalGeneration",
    "SmolVLMForConditionalGeneration",
)
_MODEL_TYPES = {"llava": "LlavaForConditionalGeneration", "llava_next": "LlavaNextForConditionalGeneration"}


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


class LlavaNextEncoder(LlavaEncoder):
    """LLaVA-NeXT's tower over the tiles of one fixed anyres resolution (see the module docstring).

    Every image is stretched to `resolution` (height, width), one of the checkpoint's pinpoints, before the
    processor: it gives the base tile and rows x cols high-res tiles ([B, 1 + rows * cols, 3, h, w]), and
    `features` the tower's selected tokens of each tile in that order, [B, n_tiles * side^2, d_vision].
    order: the packed token order (NextProjection): per image token, the feature row it takes, -1 for a newline.
    grid: the high-res grid; cells: per image token its cell there, -1 for the base tile and the newlines.
    """

    def __init__(
        self,
        tower: nn.Module,
        image_processor: Callable[..., Any],
        layer: int | Sequence[int],
        strategy: str,
        n_extra: int,
        name: str,
        resolution: tuple[int, int],
        order: Sequence[int],
    ) -> None:
        super().__init__(tower, image_processor, layer, strategy, n_extra, name)
        if self.cells[0] < 0:
            raise StackError(f"{name}: LLaVA-NeXT tiles hold patches only; the strategy keeps a CLS token")
        cfg: Any = tower.config
        side, tile = self.grid[0], cfg.image_size
        self.resolution = resolution
        self.tiles = (resolution[0] // tile, resolution[1] // tile)
        self.grid = (self.tiles[0] * side, self.tiles[1] * side)
        per_tile = side * side
        self.cells = [-1 if i < per_tile else self._cell(i - per_tile, side) for i in order]

    def _cell(self, index: int, side: int) -> int:
        """The high-res grid cell of feature row `index` past the base tile (tiles row-major, patches row-major)."""
        tile, patch = divmod(index, side * side)
        (tile_row, tile_col), (row, col) = divmod(tile, self.tiles[1]), divmod(patch, side)
        return (tile_row * side + row) * self.grid[1] + tile_col * side + col

    def fit(self, image: Image.Image) -> Image.Image:
        """The image stretched to the stack's anyres resolution (what the processor is given)."""
        height, width = self.resolution
        return image.convert("RGB").resize((width, height), Image.Resampling.BICUBIC)

    def preprocess(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """PIL images -> the processor's tiles [B, 1 + rows * cols, 3, h, w] of each image stretched by `fit`."""
        return super().preprocess([self.fit(image) for image in images])

    def view(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """The high-res tiles put back together: [B, 3, height, width], the frame of the heatmap grid."""
        tiles = self.preprocess(images)[:, 1:]
        batch, _, channels, h, w = tiles.shape
        rows, cols = self.tiles
        return (
            tiles.view(batch, rows, cols, channels, h, w)
            .permute(0, 3, 1, 4, 2, 5)
            .reshape(batch, channels, rows * h, cols * w)
        )

    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        batch, n_tiles = pixels.shape[:2]
        tokens = super().features(pixels.flatten(0, 1))  # [B * n_tiles, side^2, d]
        return tokens.reshape(batch, n_tiles * tokens.shape[1], tokens.shape[2])


class CheckpointProjection(nn.Module):
    """A checkpoint's own projector (features [B, P, d_in] -> [B, P, d_out]), run in its weights' dtype."""

    def __init__(self, projector: nn.Module, d_in: int, d_out: int) -> None:
        super().__init__()
        self.projector = projector.eval().requires_grad_(False)
        self.d_in, self.d_out = d_in, d_out

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.projector(features.to(next(self.projector.parameters()).dtype))


class NextProjection(CheckpointProjection):
    """LLaVA-NeXT's projection: the checkpoint's projector on every tile token, then its packing as a fixed
    gather: [B, n_tiles * side^2, d_in] -> [B, P, d_out], with the checkpoint's `image_newline` where `order`
    has -1 (the order comes from the model's own `pack_image_features`, see `next_order`)."""

    order: torch.Tensor  # [P] rows of [projected tiles; newline], a buffer

    def __init__(self, projector: nn.Module, newline: nn.Parameter, order: Sequence[int], d_in: int, d_out: int):
        super().__init__(projector, d_in, d_out)
        self.newline = newline  # the checkpoint's own parameter (shared, frozen)
        n_rows = max(order) + 1
        self.register_buffer("order", torch.tensor([n_rows if i < 0 else i for i in order]), persistent=False)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        projected = super().forward(features)  # [B, n_rows, d_out]
        newline = self.newline.to(projected.dtype).expand(projected.shape[0], 1, -1)
        return torch.cat([projected, newline], dim=1)[:, self.order]


def anyres_resolution(pinpoints: Sequence[Sequence[int]]) -> tuple[int, int]:
    """The pinpoint every image is stretched to: the largest (then the squarest), which NeXT's own
    `select_best_resolution` must pick for an image of exactly its size."""
    from transformers.image_processing_utils import select_best_resolution

    best = max(pinpoints, key=lambda p: (p[0] * p[1], -abs(p[0] - p[1])))
    resolution = (int(best[0]), int(best[1]))
    if tuple(select_best_resolution(resolution, [list(p) for p in pinpoints])) != resolution:
        raise StackError(f"image_grid_pinpoints {list(pinpoints)}: an image of {resolution} does not map onto itself")
    return resolution


def next_order(model: Any, resolution: tuple[int, int], n_tiles: int, per_tile: int) -> list[int]:
    """NeXT's packing of one image of `resolution` as a token order: per packed token, the row of the tile
    features [n_tiles * per_tile] it is, -1 for a newline. Read off the model's own `pack_image_features` run on
    the rows' indices, so base tile, unpadding and newlines are placed by the model's code."""
    index = torch.arange(n_tiles * per_tile, dtype=torch.float64).view(n_tiles, per_tile, 1)
    packed, _ = model.model.pack_image_features(
        [index],
        torch.tensor([resolution]),
        model.config.vision_feature_select_strategy,
        image_newline=torch.tensor([-1.0], dtype=torch.float64),
    )
    return [int(v) for v in packed[0][:, 0].tolist()]


def _next_parts(model: Any, processor: Any, spec: str) -> tuple[LlavaNextEncoder, NextProjection]:
    """The encoder and projection of a LlavaNextForConditionalGeneration (see the module docstring)."""
    cfg: Any = model.config
    pinpoints = [list(p) for p in cfg.image_grid_pinpoints]
    theirs = [list(p) for p in getattr(processor.image_processor, "image_grid_pinpoints", None) or []]
    if theirs != pinpoints:
        raise StackError(f"--vlm {spec}: the processor's image_grid_pinpoints {theirs} differ from the model's")
    resolution = anyres_resolution(pinpoints)
    vision: Any = cfg.vision_config
    if resolution[0] % vision.image_size or resolution[1] % vision.image_size:
        raise StackError(f"--vlm {spec}: pinpoint {resolution} is not a whole number of {vision.image_size}-px tiles")
    side = vision.image_size // vision.patch_size
    n_tiles = 1 + (resolution[0] // vision.image_size) * (resolution[1] // vision.image_size)
    order = next_order(model, resolution, n_tiles, side * side)
    encoder = LlavaNextEncoder(
        model.model.vision_tower,
        processor.image_processor,
        cfg.vision_feature_layer,
        cfg.vision_feature_select_strategy,
        int(getattr(processor, "num_additional_image_tokens", 0) or 0),
        f"{spec}:vision_tower",
        resolution,
        order,
    )
    d_model = cfg.text_config.hidden_size
    projection = NextProjection(
        model.model.multi_modal_projector, model.model.image_newline, order, encoder.dim, d_model
    )
    return encoder, projection


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


def template_ids(
    processor: Any, instruction: str, n_tokens: int, probe_size: tuple[int, int] = (64, 64)
) -> tuple[list[int], list[int], str]:
    """(ids before the image tokens, ids after them, the templated text) for one image and `instruction`,
    from the processor's chat template and its own tokenization of a probe image (`probe_size` (width,
    height)) and that text."""
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": instruction}]}]
    if getattr(processor, "chat_template", None) is None:
        raise StackError("the checkpoint's processor has no chat template; it cannot place the image")
    text = processor.apply_chat_template(conversation, add_generation_prompt=True)
    probe = Image.new("RGB", probe_size, (128, 128, 128))
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


def load_checkpoint(spec: str, class_name: str, revision: str | None, dtype: torch.dtype) -> tuple[Any, Any]:
    """(model, processor) of a VLM checkpoint (hub id with `revision`, or a save_pretrained folder) loaded with
    transformers' `class_name`, the model in eval mode and frozen. Raises StackError naming the problem."""
    import transformers
    from transformers import AutoProcessor

    try:
        model = getattr(transformers, class_name).from_pretrained(spec, revision=revision or "main", dtype=dtype)
        processor = AutoProcessor.from_pretrained(spec, revision=revision)
    except (OSError, ValueError, ImportError) as err:  # ImportError: SmolVLM2's processor wants num2words
        raise StackError(f"cannot load the VLM {spec!r}: {str(err).splitlines()[0]}") from err
    return model.eval().requires_grad_(False), processor


def checkpoint_stack(
    spec: str,
    model: Any,
    processor: Any,
    encoder: VisionEncoder,
    projection: CheckpointProjection,
    *,
    revision: str | None,
    instruction: str,
    real_vocab: int,
    device: torch.device,
    dtype: torch.dtype,
    identity: dict[str, Any] | None = None,
    probe_size: tuple[int, int] = (64, 64),
    progress: Callable[[str], None] | None = None,
) -> Stack:
    """The Stack of a loaded VLM checkpoint, given its encoder and projection: the text around the image from
    the chat template (`template_ids` with a probe image of `probe_size`), the LM as `causal_view`, and the
    identity every VLM stack records (class, hub id or folder name, revision and commit, template hash; a
    folder's sha256) plus the loader's own `identity` entries."""
    before, after, _ = template_ids(processor, instruction, encoder.n_patches, probe_size)
    folder = Path(spec)
    is_folder = folder.is_dir()
    cfg: Any = model.config
    ident: dict[str, Any] = {
        **(identity or {}),
        "vlm": type(model).__name__,
        "lm": f"folder:{folder.resolve().name}" if is_folder else spec,
        "lm_revision": revision,
        "lm_commit": getattr(cfg, "_commit_hash", None),
        "vlm_template": hashlib.sha256(repr((before, after)).encode()).hexdigest()[:16],
    }
    if is_folder:
        if progress:
            progress("hashing the checkpoint folder")
        ident["lm_sha256"] = folder_sha256(folder)
    return Stack(
        name=f"vlm:{folder.name if is_folder else spec}",
        encoder=encoder.to(device),
        projection=projection.to(device),  # type: ignore[arg-type]  # duck-typed: d_in, d_out, forward
        lm=causal_view(model).to(device),
        tokenizer=processor.tokenizer,
        real_vocab=real_vocab,
        identity=ident,
        prompt=instruction,
        device=device,
        dtype=dtype,
        before_ids=before,
        after_ids=after,
    )


def load_vlm(
    spec: str,
    *,
    revision: str | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | None = None,
    instruction: str | None = None,
    progress: Callable[[str], None] | None = None,
) -> Stack:
    """A Stack from a LLaVA or LLaVA-NeXT checkpoint: a hub id (with `revision`) or a local folder saved with
    save_pretrained; an Idefics3 or SmolVLM checkpoint goes to mmtui.stacks.idefics.

    instruction: the user turn's text after the image (default DEFAULT_INSTRUCTION). Raises StackError naming
    the problem.
    """
    from transformers import AutoConfig
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
    except (OSError, ValueError) as err:
        raise StackError(f"cannot load the VLM {spec!r}: {str(err).splitlines()[0]}") from err
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
    if config.model_type not in _MODEL_TYPES:
        arch = (getattr(config, "architectures", None) or [type(config).__name__])[0]
        raise StackError(
            f"--vlm {spec}: a {arch} checkpoint (model_type {config.model_type!r}); supported: {', '.join(VLM_CLASSES)}"
        )
    model, processor = load_checkpoint(spec, _MODEL_TYPES[config.model_type], revision, dtype)
    cfg: Any = model.config
    encoder: LlavaEncoder
    projection: CheckpointProjection
    identity: dict[str, Any] = {}
    probe = (64, 64)
    if config.model_type == "llava_next":
        encoder, projection = _next_parts(model, processor, spec)
        identity["vlm_anyres"] = list(encoder.resolution)  # the stretch is mmtui's choice, not the checkpoint's
        probe = (encoder.resolution[1], encoder.resolution[0])
    else:
        encoder = LlavaEncoder(
            model.model.vision_tower,
            processor.image_processor,
            cfg.vision_feature_layer,
            cfg.vision_feature_select_strategy,
            int(getattr(processor, "num_additional_image_tokens", 0) or 0),
            f"{spec}:vision_tower",
        )
        projection = CheckpointProjection(model.model.multi_modal_projector, encoder.dim, cfg.text_config.hidden_size)
    return checkpoint_stack(
        spec,
        model,
        processor,
        encoder,
        projection,
        revision=revision,
        instruction=instruction,
        real_vocab=_real_vocab(processor),
        device=device,
        dtype=dtype,
        identity=identity,
        probe_size=probe,
        progress=progress,
    )
