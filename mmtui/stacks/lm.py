"""Where the MLP neurons are, for each LM family. The only module that knows the models' module names.

A neuron (unit) of layer l is one hidden unit of that layer's MLP. Its activation is an entry of the vector
the MLP's output matrix multiplies ("post" site, the default), or of the first matrix's output before the
nonlinearity ("pre" site). Its output weights are a column of the output matrix: W_out[:, k], shape [d_model].
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from mmtui.defaults import SITES
from mmtui.errors import StackError

if TYPE_CHECKING:
    from transformers import PreTrainedModel


@dataclass(frozen=True)
class LMFamily:
    """Module names of one LM family.

    blocks: path from the CausalLM to the list of transformer blocks.
    mlp: attribute of a block holding its MLP.
    w_in: the MLP's first matrix (its output is the "pre" site; for gated MLPs, the gate).
    w_out: the MLP's output matrix (its input is the "post" site).
    final_norm: path from the CausalLM to the norm applied before the unembedding.
    conv1d: GPT-2 style Conv1D weights, stored transposed ([in, out]).
    """

    name: str
    blocks: str
    mlp: str
    w_in: str
    w_out: str
    final_norm: str
    conv1d: bool = False


FAMILIES: dict[str, LMFamily] = {
    "gptj": LMFamily("gptj", "transformer.h", "mlp", "fc_in", "fc_out", "transformer.ln_f"),
    "gpt2": LMFamily("gpt2", "transformer.h", "mlp", "c_fc", "c_proj", "transformer.ln_f", conv1d=True),
    "gpt_neox": LMFamily(
        "gpt_neox", "gpt_neox.layers", "mlp", "dense_h_to_4h", "dense_4h_to_h", "gpt_neox.final_layer_norm"
    ),
    "llama": LMFamily("llama", "model.layers", "mlp", "gate_proj", "down_proj", "model.norm"),
}
# model_type values of transformers configs that share a family's layout
MODEL_TYPES = {
    "gptj": "gptj",
    "gpt2": "gpt2",
    "gpt_neox": "gpt_neox",
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "llama",
}


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


class LMAdapter:
    """Access to the MLP neurons of one causal LM."""

    def __init__(self, model: PreTrainedModel) -> None:
        model_type = getattr(model.config, "model_type", None)
        if model_type not in MODEL_TYPES:
            raise StackError(
                f"LM family {model_type!r} is not supported (supported: {', '.join(sorted(MODEL_TYPES))}); "
                "add an LMFamily in mmtui/stacks/lm.py"
            )
        self.family = FAMILIES[MODEL_TYPES[model_type]]
        self.model = model
        self.blocks: list[nn.Module] = list(_get(model, self.family.blocks))

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

    def unembedding(self) -> torch.Tensor:
        """W_U as [vocab, d_model]."""
        return weight_of(self.model.get_output_embeddings())

    def embedding(self) -> torch.Tensor:
        """The input embeddings as [vocab, d_model]."""
        return weight_of(self.model.get_input_embeddings())

    def site_hook(
        self, layer: int, site: str, fn: Callable[[torch.Tensor], torch.Tensor | None]
    ) -> torch.utils.hooks.RemovableHandle:
        """Register `fn(act) -> act or None` on the activation of `layer` at `site`; act is [B, T, d_mlp].

        post: a forward pre-hook on the output matrix (its input); pre: a forward hook on the first matrix's
        output. A returned tensor replaces the activation in the forward pass.
        """
        if site == "post":

            def pre_hook(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...] | None:
                new = fn(args[0])
                return None if new is None else (new, *args[1:])

            return self.w_out_module(layer).register_forward_pre_hook(pre_hook)
        if site == "pre":

            def hook(_module: nn.Module, _args: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor | None:
                return fn(output)

            return self.w_in_module(layer).register_forward_hook(hook)
        raise StackError(f"unknown neuron site {site!r}; use one of {', '.join(SITES)}")
