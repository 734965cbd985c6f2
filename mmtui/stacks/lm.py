"""Where the MLP neurons are, for each LM family. The only module that knows the models' module names.

A neuron (unit) of layer l is one hidden unit of that layer's MLP. Its activation is an entry of the vector
the MLP's output matrix multiplies ("post" site, the default), or of the first matrix's output before the
nonlinearity ("pre" site; for a gated MLP the gate's). Its output weights are a column of the output matrix:
W_out[:, k], shape [d_model].

A family is found from the model's own modules where transformers names them consistently (a block list
under the body, an `mlp` with gate/up/down, fc_in/fc_out, ...: see `discover`); the table `FAMILIES` holds
the layouts written out by hand, and `MODEL_TYPES` the model types that take one of them as they are.
Besides the module names, a family has three conventions that decoding and the logits must follow, all read
from the model: the final norm's gain (its weight, or 1 + weight for Gemma's RMSNorm), the input embedding's
scale (Gemma's embedding module multiplies by sqrt(d_model)), and the final logit soft-capping (Gemma 2).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from mmtui.defaults import SITES
from mmtui.errors import StackError

if TYPE_CHECKING:
    from transformers import PreTrainedModel


@dataclass(frozen=True)
class LMFamily:
    """Module names and conventions of one LM family.

    blocks: path from the CausalLM to the list of transformer blocks.
    mlp: attribute of a block holding its MLP.
    w_in: the MLP's first matrix (its output is the "pre" site; for gated MLPs, the gate).
    w_out: the MLP's output matrix (its input is the "post" site).
    final_norm: path from the CausalLM to the norm applied before the unembedding.
    conv1d: GPT-2 style Conv1D weights, stored transposed ([in, out]).
    fused_gate: w_in computes [gate, up] in one matrix (Phi-3's gate_up_proj); the "pre" site is the gate
        half, the first d_mlp outputs.
    norm_offset: the final norm's gain is norm_offset + its weight (Gemma's RMSNorm: 1 + weight).
    """

    name: str
    blocks: str
    mlp: str
    w_in: str
    w_out: str
    final_norm: str
    conv1d: bool = False
    fused_gate: bool = False
    norm_offset: float = 0.0


FAMILIES: dict[str, LMFamily] = {
    "gptj": LMFamily("gptj", "transformer.h", "mlp", "fc_in", "fc_out", "transformer.ln_f"),
    "gpt2": LMFamily("gpt2", "transformer.h", "mlp", "c_fc", "c_proj", "transformer.ln_f", conv1d=True),
    "gpt_neox": LMFamily(
        "gpt_neox", "gpt_neox.layers", "mlp", "dense_h_to_4h", "dense_4h_to_h", "gpt_neox.final_layer_norm"
    ),
    "llama": LMFamily("llama", "model.layers", "mlp", "gate_proj", "down_proj", "model.norm"),
}
# model_type values of transformers configs that take one of FAMILIES' layouts as it is (an override of
# `discover`, and the family name recorded in a run's shape)
MODEL_TYPES = {
    "gptj": "gptj",
    "gpt2": "gpt2",
    "gpt_neox": "gpt_neox",
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "llama",
}
# the model types tests/test_families.py builds and checks (tiny random models from their configs); others
# whose modules `discover` finds also run, untested
TESTED = (
    "gemma2",
    "gemma3_text",
    "gpt2",
    "gpt_neox",
    "gptj",
    "llama",
    "mistral",
    "olmo2",
    "phi3",
    "qwen2",
    "qwen3",
)

# the names transformers gives the parts, tried in this order
BLOCK_LISTS = ("layers", "h", "blocks")
MLPS = ("mlp", "feed_forward")
MATRICES: tuple[tuple[str, str, bool], ...] = (  # (w_in, w_out, fused gate)
    ("gate_proj", "down_proj", False),
    ("gate_up_proj", "down_proj", True),
    ("fc_in", "fc_out", False),
    ("c_fc", "c_proj", False),
    ("dense_h_to_4h", "dense_4h_to_h", False),
    ("fc1", "fc2", False),
)
FINAL_NORMS = ("norm", "ln_f", "final_layer_norm", "final_layernorm")


def _get(obj: Any, path: str) -> Any:
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def weight_of(module: nn.Module) -> torch.Tensor:
    """A layer's `weight` parameter (torch types every module attribute as Tensor | Module)."""
    weight = module.weight
    if not isinstance(weight, torch.Tensor):
        raise StackError(f"{type(module).__name__}.weight is a {type(weight).__name__}, not a tensor")
    return weight


def _unsupported(model: PreTrainedModel, why: str) -> StackError:
    model_type = getattr(model.config, "model_type", None)
    return StackError(
        f"LM family {model_type!r} ({type(model).__name__}) is not supported: {why} (supported: "
        f"{', '.join(TESTED)}, and models with their module names); add an LMFamily in mmtui/stacks/lm.py"
    )


def discover(model: PreTrainedModel) -> LMFamily:
    """The family of a CausalLM from its modules' names: the body's block list, each block's MLP with a known
    pair of matrices, and the final norm. Raises StackError (one line) when a part is not found."""
    prefix = getattr(model, "base_model_prefix", "")
    body = getattr(model, prefix, None) if prefix else None
    if not isinstance(body, nn.Module):
        body, prefix = model, ""
    at = f"{prefix}." if prefix else ""
    blocks = next((n for n in BLOCK_LISTS if isinstance(getattr(body, n, None), nn.ModuleList)), None)
    if blocks is None or not len(getattr(body, blocks)):
        raise _unsupported(model, f"no block list ({', '.join(BLOCK_LISTS)}) in its body")
    first = getattr(body, blocks)[0]
    mlp = next((n for n in MLPS if isinstance(getattr(first, n, None), nn.Module)), None)
    if mlp is None:
        raise _unsupported(model, f"its blocks have no MLP ({', '.join(MLPS)})")
    names = dict(getattr(first, mlp).named_children())
    pair = next(((i, o, f) for i, o, f in MATRICES if i in names and o in names), None)
    if pair is None:
        raise _unsupported(model, f"its MLP ({', '.join(names) or 'no children'}) has no known pair of matrices")
    w_in, w_out, fused = pair
    for i, block in enumerate(getattr(body, blocks)):  # a hybrid's other blocks (Mamba, MoE) have no such MLP
        if not all(isinstance(getattr(getattr(block, mlp, None), m, None), nn.Module) for m in (w_in, w_out)):
            raise _unsupported(model, f"block {i} has no {mlp}.{w_in} and {mlp}.{w_out} as block 0 has")
    norm = next((n for n in FINAL_NORMS if isinstance(getattr(body, n, None), nn.Module)), None)
    if norm is None:
        raise _unsupported(model, f"no final norm ({', '.join(FINAL_NORMS)}) in its body")
    from transformers.pytorch_utils import Conv1D

    family = LMFamily(
        name=str(getattr(model.config, "model_type", type(model).__name__)),
        blocks=at + blocks,
        mlp=mlp,
        w_in=w_in,
        w_out=w_out,
        final_norm=at + norm,
        conv1d=isinstance(names[w_out], Conv1D),
        fused_gate=fused,
    )
    offset = norm_offset(getattr(body, norm))
    if offset is None:
        raise _unsupported(
            model,
            f"its final norm {type(getattr(body, norm)).__name__} multiplies by neither its weight nor 1 + weight",
        )
    return replace(family, norm_offset=offset)


@torch.no_grad()
def norm_offset(norm: nn.Module) -> float | None:
    """0.0 when a norm's gain is its weight, 1.0 when it is 1 + weight (Gemma's RMSNorm), None when neither
    (or it has no weight vector). From the norm's own forward, on a float32 copy, at a vector x of mean 0 and
    RMS 1: gain = (norm(x) - norm(-x)) / 2x (a bias cancels; eps changes it by 1 / sqrt(1 + eps))."""
    weight = getattr(norm, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.ndim != 1 or weight.shape[0] < 2:
        return None
    probe = copy.deepcopy(norm).float()
    x = torch.ones(weight.shape[0], device=weight.device)
    x[1::2] = -1
    if weight.shape[0] % 2:
        x[-1] = 0
    keep = x != 0
    gain = (probe(x[None]) - probe(-x[None]))[0].float()[keep] / (2 * x[keep]) * x.pow(2).mean().sqrt()
    for offset in (0.0, 1.0):
        if torch.allclose(gain, weight.float()[keep] + offset, rtol=1e-4, atol=1e-4):
            return offset
    return None


def family_of(model: PreTrainedModel) -> LMFamily:
    """The table's family for a listed model type, else the one `discover` finds in the modules."""
    model_type = getattr(model.config, "model_type", None)
    if model_type in MODEL_TYPES:
        return FAMILIES[MODEL_TYPES[model_type]]
    return discover(model)


class LMAdapter:
    """Access to the MLP neurons of one causal LM, and its output conventions."""

    def __init__(self, model: PreTrainedModel) -> None:
        self.family = family_of(model)
        self.model = model
        self.blocks: list[nn.Module] = list(_get(model, self.family.blocks))
        scale = getattr(model.get_input_embeddings(), "embed_scale", None)
        # Gemma's embedding module multiplies the looked-up rows by sqrt(d_model); `inputs_embeds` are taken
        # as they are, so the image prefix and text_embeds (made by that module) share the scaled space
        self.embed_scale = 1.0 if scale is None else float(scale)
        # Gemma 2 caps the final logits: cap * tanh(logits / cap)
        cap = getattr(model.config, "final_logit_softcapping", None)
        self.logit_softcap: float | None = float(cap) if cap else None

    @property
    def n_layers(self) -> int:
        return len(self.blocks)

    def mlp(self, layer: int) -> nn.Module:
        return getattr(self.blocks[layer], self.family.mlp)

    def w_out_module(self, layer: int) -> nn.Module:
        return getattr(self.mlp(layer), self.family.w_out)

    def w_in_module(self, layer: int) -> nn.Module:
        return getattr(self.mlp(layer), self.family.w_in)

    @property
    def d_mlp(self) -> int:
        return self.out_weight(0).shape[1]

    def out_weight(self, layer: int) -> torch.Tensor:
        """W_out of one layer as [d_model, d_mlp]: column k is unit k's output weights."""
        weight = weight_of(self.w_out_module(layer))
        return weight.T if self.family.conv1d else weight

    def final_norm(self) -> nn.Module:
        return _get(self.model, self.family.final_norm)

    def final_gain(self) -> torch.Tensor:
        """The final norm's elementwise gain [d_model]: its weight, plus the family's norm_offset (Gemma: 1)."""
        weight = weight_of(self.final_norm()).detach()
        return weight + self.family.norm_offset if self.family.norm_offset else weight

    def unembedding(self) -> torch.Tensor:
        """W_U as [vocab, d_model] (tied to the input embeddings or not, the output layer's weight)."""
        return weight_of(self.model.get_output_embeddings())

    def embedding(self) -> torch.Tensor:
        """The input embeddings as the LM's body takes them (`inputs_embeds`), [vocab, d_model]: the
        embedding matrix times the family's embedding scale (1, or Gemma's sqrt(d_model))."""
        weight = weight_of(self.model.get_input_embeddings())
        if self.embed_scale == 1.0:
            return weight
        return weight * torch.tensor(self.embed_scale, dtype=weight.dtype)  # as the module rounds it

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The LM's output layer on final hidden states [..., d_model] -> [..., V], soft-capped as the model
        caps them (Gemma 2's final_logit_softcapping)."""
        logits = self.model.get_output_embeddings()(hidden)
        if self.logit_softcap is not None:
            logits = torch.tanh(logits / self.logit_softcap) * self.logit_softcap
        return logits

    def site_hook(
        self, layer: int, site: str, fn: Callable[[torch.Tensor], torch.Tensor | None]
    ) -> torch.utils.hooks.RemovableHandle:
        """Register `fn(act) -> act or None` on the activation of `layer` at `site`; act is [B, T, d_mlp].

        post: a forward pre-hook on the output matrix (its input); pre: a forward hook on the first matrix's
        output (with a fused gate: its first d_mlp outputs, the gate). A returned tensor replaces the
        activation in the forward pass.
        """
        if site == "post":

            def pre_hook(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...] | None:
                new = fn(args[0])
                return None if new is None else (new, *args[1:])

            return self.w_out_module(layer).register_forward_pre_hook(pre_hook)
        if site == "pre":
            if self.family.fused_gate:
                d_mlp = self.d_mlp

                def gate_hook(
                    _module: nn.Module, _args: tuple[torch.Tensor, ...], output: torch.Tensor
                ) -> torch.Tensor | None:
                    # the returned gate goes back in front of the up half, so that what the MLP splits off
                    # is the tensor fn returned (its gradient hooks then fire)
                    new = fn(output[..., :d_mlp])
                    return None if new is None else torch.cat([new, output[..., d_mlp:]], dim=-1)

                return self.w_in_module(layer).register_forward_hook(gate_hook)

            def hook(_module: nn.Module, _args: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor | None:
                return fn(output)

            return self.w_in_module(layer).register_forward_hook(hook)
        raise StackError(f"unknown neuron site {site!r}; use one of {', '.join(SITES)}")
