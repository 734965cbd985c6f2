"""The LiMBeR-style linear projection from image-encoder features to LM input embeddings, applied per patch.

Two file formats:
- LiMBeR's `proj.ckpt`: a `torch.save`d state dict of `nn.Linear(d_vision, d_model)` (loaded with weights_only).
- ours: safetensors holding `weight`, `bias` (and `log_scale` when the output norm is learned), with the
  settings in the safetensors metadata.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import torch
from torch import nn

from mmtui.errors import ProjectionError

FORMAT = "mmtui-projection/1"


class Projection(nn.Module):
    """x [B, P, d_in] -> [B, P, d_out] = W x + b, then optionally each token rescaled to a norm.

    norm: None keeps LiMBeR's plain linear map. A number rescales every projected token to that L2 norm
    (the mean norm of the LM's word embeddings keeps the prefix in distribution); with learn_scale the
    norm is a trained parameter initialised at that number.
    """

    def __init__(self, d_in: int, d_out: int, norm: float | None = None, learn_scale: bool = False) -> None:
        super().__init__()
        self.linear = nn.Linear(d_in, d_out)
        self.norm = norm
        self.learn_scale = learn_scale and norm is not None
        if learn_scale and norm is not None:
            self.log_scale = nn.Parameter(torch.tensor(math.log(norm)))

    @property
    def d_in(self) -> int:
        return self.linear.in_features

    @property
    def d_out(self) -> int:
        return self.linear.out_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        out = self.linear(features.to(self.linear.weight.dtype))
        if self.norm is None:
            return out
        scale = self.log_scale.exp() if self.learn_scale else self.norm
        return out * (scale / out.norm(dim=-1, keepdim=True).clamp_min(1e-6))

    def settings(self) -> dict:
        return {
            "format": FORMAT,
            "d_in": self.d_in,
            "d_out": self.d_out,
            "norm": self.norm,
            "learn_scale": self.learn_scale,
        }

    def save(self, path: Path | str, card: dict | None = None) -> None:
        """Write safetensors with the settings (and an optional training card) in its metadata."""
        from safetensors.torch import save_file

        tensors = {
            "weight": self.linear.weight.detach().float().contiguous(),
            "bias": self.linear.bias.detach().float(),
        }
        if self.learn_scale:
            tensors["log_scale"] = self.log_scale.detach().float().reshape(1)
        meta = {"settings": json.dumps(self.settings())}
        if card is not None:
            meta["card"] = json.dumps(card)
        save_file(tensors, str(path), metadata=meta)


def file_sha256(path: Path | str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _strip_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Accept `weight`/`bias` under any module prefix (`proj.weight`, `image_prefix.proj.weight`, ...)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        leaf = key.rsplit(".", 1)[-1]
        if leaf in out:
            raise ProjectionError(f"projection file holds several '{leaf}' tensors ({key}); pass the projection alone")
        out[leaf] = value
    return out


def load_projection(path: Path | str, d_in: int, d_out: int) -> Projection:
    """Load a projection file (ours or LiMBeR's) and check it maps d_in -> d_out.

    Raises ProjectionError naming the file and the problem.
    """
    path = Path(path)
    if not path.is_file():
        raise ProjectionError(f"{path}: projection file not found; pass --projection PATH")
    settings: dict = {}
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as fh:
                settings = json.loads((fh.metadata() or {}).get("settings", "{}"))
                state = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118
        except Exception as err:  # safetensors raises its own error types
            raise ProjectionError(f"{path}: not a readable safetensors projection ({err})") from err
    else:
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as err:  # pickle, zip and weights_only errors all mean: not a state dict we accept
            raise ProjectionError(
                f"{path}: not a LiMBeR projection checkpoint ({type(err).__name__}); "
                "expected a torch.save'd state dict of nn.Linear"
            ) from err
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise ProjectionError(
                f"{path}: expected a state dict of tensors (weight, bias), got {type(state).__name__}"
            )
        state = _strip_prefix(state)
    if "weight" not in state or "bias" not in state:
        raise ProjectionError(f"{path}: needs 'weight' and 'bias' tensors, found {sorted(state)}")
    weight, bias = state["weight"], state["bias"]
    if tuple(weight.shape) != (d_out, d_in) or tuple(bias.shape) != (d_out,):
        raise ProjectionError(
            f"{path}: projection maps {tuple(weight.shape)[::-1]} but this stack needs {d_in} -> {d_out} "
            "(image-encoder width -> LM width); use the projection trained for this encoder and LM"
        )
    proj = Projection(d_in, d_out, norm=settings.get("norm"), learn_scale=bool(settings.get("learn_scale")))
    with torch.no_grad():
        proj.linear.weight.copy_(weight.float())
        proj.linear.bias.copy_(bias.float())
        if proj.learn_scale:
            proj.log_scale.copy_(state["log_scale"].float().reshape(()))
    return proj.eval().requires_grad_(False)


def read_card(path: Path | str) -> dict | None:
    """The training card stored in one of our projection files, or None."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        card = (fh.metadata() or {}).get("card")
    return json.loads(card) if card else None
