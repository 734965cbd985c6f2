"""Model stacks: image encoder -> linear projection -> frozen causal LM."""

from mmtui.stacks.base import DEFAULT_PROMPT, Stack
from mmtui.stacks.presets import DEFAULT_PRESET, PRESETS, load_stack

__all__ = ["DEFAULT_PRESET", "DEFAULT_PROMPT", "PRESETS", "Stack", "load_stack"]
