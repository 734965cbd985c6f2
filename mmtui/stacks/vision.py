"""Image encoders: each turns a batch of PIL images into a sequence of patch features [B, P, d_vision].

P is a row-major grid (grid_h x grid_w); the heatmaps and IoU of later experiments depend on that order.
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

from mmtui.errors import StackError


class VisionEncoder(nn.Module):
    """A frozen image encoder with its preprocessing. Subclasses set name, dim, grid and `features`."""

    name: str
    dim: int
    grid: tuple[int, int]

    def __init__(self, preprocess: Callable[[Sequence[Image.Image]], torch.Tensor]) -> None:
        super().__init__()
        self._preprocess = preprocess

    def preprocess(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """PIL images -> pixel tensor [B, 3, H, W] (float32, normalised)."""
        return self._preprocess(images)

    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels [B, 3, H, W] -> patch features [B, P, dim]."""
        return self.features(pixels)

    @property
    def n_patches(self) -> int:
        return self.grid[0] * self.grid[1]


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


class TimmEncoder(VisionEncoder):
    """Any timm model whose `forward_features` is a feature map [B, C, H, W] or patch tokens [B, N, C]."""

    def __init__(self, model: Any, name: str, crop: int, preprocess: Callable) -> None:
        super().__init__(preprocess)
        self.model = model.eval().requires_grad_(False)
        self.name = name
        with torch.no_grad():
            probe = self.features(torch.zeros(1, 3, crop, crop))  # in the model's dtype
        self.dim = probe.shape[-1]
        self.grid = self._last_grid

    def _grid_features(self, pixels: torch.Tensor) -> torch.Tensor:
        out = self.model.forward_features(pixels)
        if out.ndim == 4:  # [B, C, H, W]
            self._last_grid = (out.shape[2], out.shape[3])
            return out.flatten(2).transpose(1, 2)  # [B, H*W, C]
        if out.ndim == 3:  # [B, prefix + N, C]
            out = out[:, getattr(self.model, "num_prefix_tokens", 0) :]
            side = math.isqrt(out.shape[1])
            if side * side != out.shape[1]:
                raise StackError(f"timm model {self.name}: {out.shape[1]} tokens do not form a square patch grid")
            self._last_grid = (side, side)
            return out
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
