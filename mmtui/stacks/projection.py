"""Projections from image-encoder features to LM input embeddings, applied per image position.

Kinds:
- linear: LiMBeR's `nn.Linear(d_vision, d_model)` (`Projection`).
- mlp: LLaVA's projector, Linear -> GELU -> Linear with LLaVA's names `linear_1`, `linear_2` (`MLPProjection`).
- module: any `nn.Module` given from Python (`ModuleProjection`, see `as_projection`); not saved by us.
Each may rescale every projected token to a fixed or learned L2 norm.

File formats:
- LiMBeR's `proj.ckpt`: a `torch.save`d state dict of `nn.Linear(d_vision, d_model)` (loaded with weights_only);
  LLaVA's `mm_projector.bin` (`*.0.*`, `*.2.*` of its nn.Sequential) loads as an mlp.
- ours: safetensors holding the kind's tensors (`weight`, `bias`; or `linear_1.weight`, ... `linear_2.bias`)
  and `log_scale` when the output norm is learned, with the settings (`kind` among them) in the metadata.
  A file without `kind` is linear; a safetensors file without our settings holding `linear_1` / `linear_2`
  under any prefix (`multi_modal_projector.linear_1.weight`, as in a LLaVA checkpoint) is an mlp.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mmtui.defaults import PROJECTION_KINDS
from mmtui.errors import ProjectionError
from mmtui.store.records import file_sha256 as file_sha256  # re-exported: stacks hash their files with it

FORMAT = "mmtui-projection/1"
KINDS = PROJECTION_KINDS  # the kinds a file holds ("module" is Python-only)


class BaseProjection(nn.Module):
    """x [B, P, d_in] -> [B, P, d_out] = body(x), then optionally each token rescaled to a norm.

    norm: None keeps the plain map. A number rescales every projected token to that L2 norm (the mean norm
    of the LM's word embeddings keeps the prefix in distribution); with learn_scale the norm is a trained
    parameter initialised at that number.
    """

    kind: str = ""

    def __init__(self, norm: float | None = None, learn_scale: bool = False) -> None:
        super().__init__()
        self.norm = norm
        self.learn_scale = learn_scale and norm is not None
        if learn_scale and norm is not None:
            self.log_scale = nn.Parameter(torch.tensor(math.log(norm)))

    @property
    def d_in(self) -> int:
        raise NotImplementedError

    @property
    def d_out(self) -> int:
        raise NotImplementedError

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def body(self, features: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        out = self.body(features.to(self.dtype))
        if self.norm is None:
            return out
        scale = self.log_scale.exp() if self.learn_scale else self.norm
        return out * (scale / out.norm(dim=-1, keepdim=True).clamp_min(1e-6))

    def settings(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "kind": self.kind,
            "d_in": self.d_in,
            "d_out": self.d_out,
            "norm": self.norm,
            "learn_scale": self.learn_scale,
        }

    def tensors(self) -> dict[str, torch.Tensor]:
        """The body's tensors under the file's names."""
        raise NotImplementedError

    def save(self, path: Path | str, card: dict | None = None) -> None:
        """Write safetensors with the settings (and an optional training card) in its metadata."""
        from safetensors.torch import save_file

        tensors = {k: v.detach().float().contiguous() for k, v in self.tensors().items()}
        if self.learn_scale:
            tensors["log_scale"] = self.log_scale.detach().float().reshape(1)
        meta = {"settings": json.dumps(self.settings())}
        if card is not None:
            meta["card"] = json.dumps(card)
        save_file(tensors, str(path), metadata=meta)


class Projection(BaseProjection):
    """LiMBeR's linear projection: W x + b (kind "linear")."""

    kind = "linear"

    def __init__(self, d_in: int, d_out: int, norm: float | None = None, learn_scale: bool = False) -> None:
        super().__init__(norm, learn_scale)
        self.linear = nn.Linear(d_in, d_out)

    @property
    def d_in(self) -> int:
        return self.linear.in_features

    @property
    def d_out(self) -> int:
        return self.linear.out_features

    def body(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear(features)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"weight": self.linear.weight, "bias": self.linear.bias}


class MLPProjection(BaseProjection):
    """LLaVA's multi-modal projector: linear_2(GELU(linear_1(x))), hidden width d_out as in LLaVA (kind "mlp")."""

    kind = "mlp"

    def __init__(
        self,
        d_in: int,
        d_out: int,
        norm: float | None = None,
        learn_scale: bool = False,
        d_hidden: int | None = None,
    ) -> None:
        super().__init__(norm, learn_scale)
        self.linear_1 = nn.Linear(d_in, d_hidden or d_out)
        self.act = nn.GELU()  # exact (erf), LLaVA's "gelu"
        self.linear_2 = nn.Linear(d_hidden or d_out, d_out)

    @property
    def d_in(self) -> int:
        return self.linear_1.in_features

    @property
    def d_out(self) -> int:
        return self.linear_2.out_features

    @property
    def d_hidden(self) -> int:
        return self.linear_1.out_features

    def body(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(features)))

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "d_hidden": self.d_hidden}

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f"{layer}.{param}": t for layer in ("linear_1", "linear_2") for param, t in self._params(layer)}

    def _params(self, layer: str) -> list[tuple[str, torch.Tensor]]:
        lin = getattr(self, layer)
        return [("weight", lin.weight), ("bias", lin.bias)]


class ModuleProjection(BaseProjection):
    """Any nn.Module mapping [B, P, d_in] -> [B, P, d_out], given from Python (kind "module").

    Its identity in a stack's fingerprint: `module_identity`; mmtui does not save it.
    """

    kind = "module"

    def __init__(self, module: nn.Module, d_in: int, d_out: int) -> None:
        super().__init__()
        self.module = module
        self._dims = (d_in, d_out)

    @property
    def d_in(self) -> int:
        return self._dims[0]

    @property
    def d_out(self) -> int:
        return self._dims[1]

    @property
    def dtype(self) -> torch.dtype:
        first = next(self.module.parameters(), None)
        return first.dtype if first is not None else torch.float32

    def body(self, features: torch.Tensor) -> torch.Tensor:
        return self.module(features)

    def tensors(self) -> dict[str, torch.Tensor]:
        raise ProjectionError("a projection given as a Python module is saved by its own code, not by mmtui")


def module_identity(module: nn.Module) -> dict[str, str]:
    """A projection given from Python, for the stack's fingerprint: its class, and a sha256 of its state dict
    (names, dtypes, bytes) so that other weights give another fingerprint."""
    inner = module.module if isinstance(module, ModuleProjection) else module
    digest = hashlib.sha256()
    for key, value in sorted(inner.state_dict().items()):
        digest.update(key.encode())
        digest.update(str(value.dtype).encode())
        digest.update(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    cls = type(inner)
    return {"projection": f"module:{cls.__module__}.{cls.__qualname__}", "projection_sha256": digest.hexdigest()}


def as_projection(module: nn.Module, d_in: int, d_out: int) -> BaseProjection:
    """`module` as a stack's projection: ours as it is, any other nn.Module wrapped, after checking on a zero
    input that it maps [1, 2, d_in] to [1, 2, d_out]. Raises ProjectionError naming what it gave instead."""
    if isinstance(module, BaseProjection):
        proj: BaseProjection = module
    elif isinstance(module, nn.Module):
        proj = ModuleProjection(module, d_in, d_out)
    else:
        raise ProjectionError(f"a projection must be an nn.Module or a file path, not {type(module).__name__}")
    if proj.d_in != d_in:
        raise ProjectionError(f"the projection takes {proj.d_in} features but the image encoder gives {d_in}")
    first = next(proj.parameters(), None)
    with torch.no_grad():
        try:
            out = proj(torch.zeros(1, 2, d_in, device=first.device if first is not None else None))
        except Exception as err:  # a user's module may raise anything on a wrong shape
            raise ProjectionError(
                f"the projection module failed on a [1, 2, {d_in}] input ({type(err).__name__}: {err})"
            ) from err
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (1, 2, d_out):
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ProjectionError(
            f"the projection module maps [1, 2, {d_in}] to {got}, not [1, 2, {d_out}] (the LM's input width)"
        )
    return proj


def _strip_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keys under any module prefix to our names: `proj.weight` -> `weight`; LLaVA's
    `multi_modal_projector.linear_1.weight` -> `linear_1.weight`; LLaVA's original `model.mm_projector.0.weight`
    (nn.Sequential: Linear, GELU, Linear) -> `linear_1.weight`, `.2.` -> `linear_2`."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        m = re.search(r"(?:^|\.)(linear_[12]|0|2)\.(weight|bias)$", key)
        if m and (m.group(1).startswith("linear_") or "mm_projector" in key):
            layer = {"0": "linear_1", "2": "linear_2"}.get(m.group(1), m.group(1))
            name = f"{layer}.{m.group(2)}"
        else:
            name = key.rsplit(".", 1)[-1]
        if name in out:
            raise ProjectionError(f"projection file holds several '{name}' tensors ({key}); pass the projection alone")
        out[name] = value
    return out


def _read_state(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(settings, tensors) of a projection file, ours or another's (see the module's docstring)."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as fh:
                settings = json.loads((fh.metadata() or {}).get("settings", "{}"))
                state = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118
        except Exception as err:  # safetensors raises its own error types
            raise ProjectionError(f"{path}: not a readable safetensors projection ({err})") from err
        return settings, (state if settings else _strip_prefix(state))
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # pickle, zip and weights_only errors all mean: not a state dict we accept
        raise ProjectionError(
            f"{path}: not a LiMBeR projection checkpoint ({type(err).__name__}); "
            "expected a torch.save'd state dict of nn.Linear"
        ) from err
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ProjectionError(f"{path}: expected a state dict of tensors (weight, bias), got {type(state).__name__}")
    return {}, _strip_prefix(state)


def _check_shape(path: Path, state: dict[str, torch.Tensor], name: str, shape: tuple[int, ...]) -> torch.Tensor:
    if tuple(state[name].shape) != shape:
        raise ProjectionError(
            f"{path}: {name} has shape {tuple(state[name].shape)}, not {shape}; use the projection trained for "
            "this encoder and LM (image-encoder width -> LM width)"
        )
    return state[name]


def load_projection(path: Path | str, d_in: int, d_out: int) -> BaseProjection:
    """Load a projection file (ours, LiMBeR's or LLaVA's projector) and check it maps d_in -> d_out.

    Raises ProjectionError naming the file and the problem.
    """
    path = Path(path)
    if not path.is_file():
        raise ProjectionError(f"{path}: projection file not found; pass --projection PATH")
    settings, state = _read_state(path)
    kind = settings.get("kind") or ("mlp" if "linear_1.weight" in state else "linear")
    if kind not in KINDS:
        raise ProjectionError(f"{path}: projection kind {kind!r} is not one mmtui reads ({', '.join(KINDS)})")
    norm, learn_scale = settings.get("norm"), bool(settings.get("learn_scale"))
    proj: BaseProjection
    if kind == "linear":
        if "weight" not in state or "bias" not in state:
            raise ProjectionError(f"{path}: needs 'weight' and 'bias' tensors, found {sorted(state)}")
        weight, bias = state["weight"], state["bias"]
        if tuple(weight.shape) != (d_out, d_in) or tuple(bias.shape) != (d_out,):
            raise ProjectionError(
                f"{path}: projection maps {tuple(weight.shape)[::-1]} but this stack needs {d_in} -> {d_out} "
                "(image-encoder width -> LM width); use the projection trained for this encoder and LM"
            )
        proj = Projection(d_in, d_out, norm=norm, learn_scale=learn_scale)
    else:
        names = ("linear_1.weight", "linear_1.bias", "linear_2.weight", "linear_2.bias")
        if missing := [n for n in names if n not in state]:
            raise ProjectionError(f"{path}: an mlp projection needs {', '.join(missing)}, found {sorted(state)}")
        hidden = state["linear_1.weight"].shape[0]
        _check_shape(path, state, "linear_1.weight", (hidden, d_in))
        _check_shape(path, state, "linear_2.weight", (d_out, hidden))
        proj = MLPProjection(d_in, d_out, norm=norm, learn_scale=learn_scale, d_hidden=hidden)
    with torch.no_grad():
        for name, tensor in proj.tensors().items():
            tensor.copy_(_check_shape(path, state, name, tuple(tensor.shape)).float())
        if proj.learn_scale:
            proj.log_scale.copy_(state["log_scale"].float().reshape(()))
    return proj.eval().requires_grad_(False)


def read_card(path: Path | str) -> dict | None:
    """The training card stored in one of our projection files, or None."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        card = (fh.metadata() or {}).get("card")
    return json.loads(card) if card else None
