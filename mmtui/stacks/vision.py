"""Image encoders: each turns a batch of PIL images into a sequence of image features [B, P, d_vision].

The P positions are `prefix_tokens` leading tokens (a kept CLS token, 0 or 1) and then the patches as a
row-major grid (grid_h x grid_w): patch (row, col) is position prefix_tokens + row * grid_w + col. The
heatmaps and IoU of later experiments depend on that order.

Encoder specs (the CLI's --encoder): `efficientnet-lite0`, `beit:<id|folder>`, and for ViTs
`hf:<id|folder>[@LAYER][+cls]` (CLIP / SigLIP vision towers, DINOv2, through transformers) and
`timm:<name>[@LAYER][+cls]`. LAYER indexes the hidden states as LLaVA's `vision_feature_layer` does
(0 = the embeddings, i = after block i, -1 = after the last block, -2 = LLaVA's choice); without it the
features are the model's own output (its final norm applied where it has one). `+cls` keeps the CLS token
in front of the patches (LLaVA's "full" strategy); without it the CLS and any register tokens are dropped
(LLaVA's "default").
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn

from mmtui.defaults import ENCODER_FORMS, EncoderSpec, parse_encoder_spec
from mmtui.errors import StackError

__all__ = [
    "ENCODER_FORMS",
    "BeitEncoder",
    "EncoderSpec",
    "HFVisionEncoder",
    "TimmEncoder",
    "VisionEncoder",
    "parse_encoder_spec",
]


class VisionEncoder(nn.Module):
    """A frozen image encoder with its preprocessing. Subclasses set name, dim, grid and `features`.

    prefix_tokens: image positions before the patch grid (1 when a CLS token is kept, else 0).
    """

    name: str
    dim: int
    grid: tuple[int, int]
    prefix_tokens: int = 0

    def __init__(self, preprocess: Callable[[Sequence[Image.Image]], torch.Tensor]) -> None:
        super().__init__()
        self._preprocess = preprocess

    def preprocess(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """PIL images -> pixel tensor [B, 3, H, W] (float32, normalised)."""
        return self._preprocess(images)

    def view(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """The images in the frame of the patch grid, [B, 3, H, W] (heatmaps): `preprocess` unless the encoder's
        pixels are not one picture (LLaVA-NeXT's tiles)."""
        return self.preprocess(images)

    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels [B, 3, H, W] -> patch features [B, P, dim]."""
        return self.features(pixels)

    @property
    def n_patches(self) -> int:
        """Image positions the LM sees: the prefix tokens, then the grid's cells."""
        return self.prefix_tokens + self.grid[0] * self.grid[1]

    def _set_cells(self) -> None:
        """Stack.cells: per image position its grid cell, -1 for a kept CLS token (once grid is known)."""
        self.cells = [-1] * self.prefix_tokens + list(range(self.grid[0] * self.grid[1]))


def _hidden_index(name: str, layer: int, n_layers: int) -> int:
    """LLaVA-style index into [embeddings, block 1, ..., block n_layers] -> 0..n_layers, or StackError."""
    if not -(n_layers + 1) <= layer <= n_layers:
        raise StackError(
            f"encoder {name}: layer {layer} is out of range; it has hidden states 0..{n_layers} "
            f"(0 = the embeddings, or -{n_layers + 1}..-1 from the end)"
        )
    return layer % (n_layers + 1)


class BeitEncoder(VisionEncoder):
    """transformers BEiT: `last_hidden_state[:, 1:]`, the CLS token dropped (LiMBeR's features)."""

    def __init__(self, model: nn.Module, processor: Callable[..., Any], name: str) -> None:
        super().__init__(lambda images: processor(images=list(images), return_tensors="pt")["pixel_values"])
        self.model = model.eval().requires_grad_(False)
        self.name = name
        cfg: Any = model.config
        side = cfg.image_size // cfg.patch_size
        self.grid = (side, side)
        self.dim = cfg.hidden_size

    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        pixels = pixels.to(next(self.model.parameters()).dtype)
        hidden = self.model(pixel_values=pixels).last_hidden_state  # [B, 1 + P, dim]
        return hidden[:, 1:]


# transformers model types HFVisionEncoder serves -> the vision model class (a full CLIP / SigLIP checkpoint
# loads its vision tower alone). Their token order: [CLS] [registers] patches (SigLIP: patches only).
HF_VISION_CLASSES = {
    "clip": "CLIPVisionModel",
    "clip_vision_model": "CLIPVisionModel",
    "siglip": "SiglipVisionModel",
    "siglip_vision_model": "SiglipVisionModel",
    "dinov2": "Dinov2Model",
    "dinov2_with_registers": "Dinov2WithRegistersModel",
}


def _special_tokens(config: Any) -> tuple[int, bool]:
    """(tokens before the patches, whether the first is a CLS token) for a vision config."""
    kind = config.model_type
    if kind.startswith("siglip"):
        return 0, False
    if kind == "dinov2_with_registers":
        return 1 + int(config.num_register_tokens), True
    return 1, True


class HFVisionEncoder(VisionEncoder):
    """A transformers ViT (CLIP / SigLIP vision tower, DINOv2) with its own image processor.

    layer: None takes `last_hidden_state` (the model's output: SigLIP's and DINOv2's final norm applied);
    an int takes `hidden_states[layer]` as LLaVA's `vision_feature_layer` (0 = embeddings, -2 = penultimate).
    cls: keep the CLS token in front of the patches; register tokens are always dropped.
    The grid is the processor's output size over the patch size (rounded down, as the patch embedding's strided
    conv does), checked against the model's token count.
    """

    def __init__(
        self,
        model: nn.Module,
        processor: Callable[..., Any],
        name: str,
        layer: int | None = None,
        cls: bool = False,
    ) -> None:
        super().__init__(lambda images: processor(images=list(images), return_tensors="pt")["pixel_values"])
        self.model = model.eval().requires_grad_(False)
        self.name = name
        cfg: Any = model.config
        self.special, has_cls = _special_tokens(cfg)
        if cls and not has_cls:
            raise StackError(f"encoder {name}: a {cfg.model_type} model has no CLS token; drop +cls")
        self.layer = None if layer is None else _hidden_index(name, layer, cfg.num_hidden_layers)
        self.cls = cls
        self.prefix_tokens = int(cls)
        self.dim = cfg.hidden_size
        frame = self.preprocess([Image.new("RGB", (64, 48))])  # the processor's output size
        height, width = frame.shape[-2:]
        patch = cfg.patch_size  # the patch embedding is a stride-`patch` conv: a remainder is left out
        self.grid = (height // patch, width // patch)  # (SigLIP so400m: 384 px in 14 px patches, 27 x 27)
        self._set_cells()
        with torch.no_grad():
            self.features(frame)  # checks that the tokens form that grid

    def hidden(self, pixels: torch.Tensor) -> torch.Tensor:
        """The whole token sequence [B, special + P, dim] at the chosen layer."""
        pixels = pixels.to(next(self.model.parameters()).dtype)
        if self.layer is None:
            return self.model(pixel_values=pixels).last_hidden_state
        return self.model(pixel_values=pixels, output_hidden_states=True).hidden_states[self.layer]

    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        seq = self.hidden(pixels)
        patches = seq[:, self.special :]
        cells = self.grid[0] * self.grid[1]
        if patches.shape[1] != cells:
            raise StackError(
                f"encoder {self.name}: {patches.shape[1]} patch tokens for a {self.grid[0]} x {self.grid[1]} grid"
            )
        return torch.cat([seq[:, :1], patches], dim=1) if self.cls else patches


def timm_transform(size: int, crop: int, mean: float | Sequence[float], std: float | Sequence[float]):
    """Short side to `size` (bicubic), centre crop `crop`, scale to [0, 1], normalise."""
    from torchvision import transforms

    mean3 = [mean] * 3 if isinstance(mean, float) else list(mean)
    std3 = [std] * 3 if isinstance(std, float) else list(std)
    tf = transforms.Compose(
        [
            transforms.Resize(size, interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.CenterCrop(crop),
            transforms.ToTensor(),
            transforms.Normalize(mean3, std3),
        ]
    )
    return lambda images: torch.stack([tf(img.convert("RGB")) for img in images])


class _Captured(Exception):  # noqa: N818 - a control-flow signal, not an error
    """Raised by a block hook to stop a timm forward once the chosen layer's tokens are in hand."""

    def __init__(self, tokens: torch.Tensor) -> None:
        super().__init__()
        self.tokens = tokens


class TimmEncoder(VisionEncoder):
    """Any timm model whose `forward_features` is a feature map [B, C, H, W] or patch tokens [B, N, C].

    For a ViT (tokens): its `num_prefix_tokens` (CLS, registers) come first and are dropped, or with cls the
    CLS token alone is kept in front; layer picks a block's output as HFVisionEncoder does (0 = the tokens
    entering the first block, i = after block i; None: `forward_features`, the final norm applied).
    """

    def __init__(
        self,
        model: Any,
        name: str,
        crop: int,
        preprocess: Callable,
        layer: int | None = None,
        cls: bool = False,
    ) -> None:
        super().__init__(preprocess)
        self.model = model.eval().requires_grad_(False)
        self.name = name
        self.cls = cls
        self.prefix_tokens = int(cls)
        blocks = getattr(model, "blocks", None)
        is_vit = isinstance(blocks, nn.Sequential) and hasattr(model, "patch_embed")
        if (layer is not None or cls) and not is_vit:
            raise StackError(f"timm model {name}: @LAYER and +cls apply to ViTs (patch tokens and blocks) only")
        if cls and getattr(model, "cls_token", None) is None:
            raise StackError(f"timm model {name} has no CLS token; drop +cls")
        self.layer = None if layer is None else _hidden_index(name, layer, len(model.blocks))
        with torch.no_grad():
            probe = self.features(torch.zeros(1, 3, crop, crop))  # in the model's dtype
        self.dim = probe.shape[-1]
        self.grid = self._last_grid
        self._set_cells()

    def _tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        if self.layer is None:
            return self.model.forward_features(pixels)
        blocks = self.model.blocks

        def grab(_module: nn.Module, args: tuple, output: Any = None) -> None:
            raise _Captured(args[0] if output is None else output)

        handle = (
            blocks[0].register_forward_pre_hook(grab)
            if self.layer == 0
            else blocks[self.layer - 1].register_forward_hook(grab)
        )
        try:
            self.model.forward_features(pixels)
        except _Captured as got:
            return got.tokens
        finally:
            handle.remove()
        raise StackError(f"timm model {self.name}: its forward_features did not run block {self.layer}")

    def _grid_features(self, pixels: torch.Tensor) -> torch.Tensor:
        out = self._tokens(pixels)
        if out.ndim == 4:  # [B, C, H, W]
            self._last_grid = (out.shape[2], out.shape[3])
            return out.flatten(2).transpose(1, 2)  # [B, H*W, C]
        if out.ndim == 3:  # [B, prefix + N, C]
            patches = out[:, getattr(self.model, "num_prefix_tokens", 0) :]
            grid = getattr(getattr(self.model, "patch_embed", None), "grid_size", None)
            if grid is None or grid[0] * grid[1] != patches.shape[1]:
                side = math.isqrt(patches.shape[1])
                if side * side != patches.shape[1]:
                    raise StackError(
                        f"timm model {self.name}: {patches.shape[1]} tokens do not form a square patch grid"
                    )
                grid = (side, side)
            self._last_grid = (int(grid[0]), int(grid[1]))
            return torch.cat([out[:, :1], patches], dim=1) if self.cls else patches
        raise StackError(f"timm model {self.name}: forward_features gave shape {tuple(out.shape)}, not a patch grid")

    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        return self._grid_features(pixels.to(next(self.model.parameters()).dtype))


# EfficientNet-PyTorch (lukemelas) names -> timm tf_efficientnet_lite0 names
_LITE0_REPEATS = (1, 2, 2, 3, 3, 4, 1)
_FIRST_BLOCK = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_OTHER_BLOCKS = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
_STEM_HEAD = {
    "_conv_stem": "conv_stem",
    "_bn0": "bn1",
    "_conv_head": "conv_head",
    "_bn1": "bn2",
    "_fc": "classifier",
}


def efficientnet_pytorch_to_timm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an EfficientNet-PyTorch EfficientNet-Lite0 state dict into timm's `tf_efficientnet_lite0` names."""
    stage_of: list[tuple[int, int]] = [(s, j) for s, n in enumerate(_LITE0_REPEATS) for j in range(n)]
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.endswith("num_batches_tracked"):
            continue
        m = re.fullmatch(r"_blocks\.(\d+)\.(\w+)\.(\w+)", key)
        if m:
            i, module, param = int(m.group(1)), m.group(2), m.group(3)
            s, j = stage_of[i]
            table = _FIRST_BLOCK if i == 0 else _OTHER_BLOCKS
            out[f"blocks.{s}.{j}.{table[module]}.{param}"] = value
        else:
            module, param = key.split(".", 1)
            out[f"{_STEM_HEAD[module]}.{param}"] = value
    return out


def load_efficientnet_lite0(path: Path | str) -> nn.Module:
    """timm `tf_efficientnet_lite0` with the ImageNet weights of an EfficientNet-PyTorch checkpoint, strict."""
    import timm

    state = torch.load(str(path), map_location="cpu", weights_only=True)
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    mapped = efficientnet_pytorch_to_timm(state)
    expected = {k for k in model.state_dict() if not k.endswith("num_batches_tracked")}
    if set(mapped) != expected:
        missing, extra = sorted(expected - set(mapped)), sorted(set(mapped) - expected)
        raise StackError(
            f"{path}: not an EfficientNet-Lite0 checkpoint (missing {missing[:3]}, unexpected {extra[:3]})"
        )
    for key, value in mapped.items():
        want = model.state_dict()[key].shape
        if value.shape != want:
            raise StackError(f"{path}: {key} has shape {tuple(value.shape)}, expected {tuple(want)}")
    # num_batches_tracked counts training steps and does not affect inference: keep the model's own
    mapped.update({k: v for k, v in model.state_dict().items() if k.endswith("num_batches_tracked")})
    model.load_state_dict(mapped, strict=True)
    return model.eval()
