"""mmtui: find and explain multimodal neurons in frozen text-only language models.

Importing this package is cheap: the model code (torch, transformers) loads on first use of `load_stack` or
`attribute`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from mmtui.run.attribution import attribute
    from mmtui.stacks import Stack, load_stack

__all__ = ["Stack", "__version__", "attribute", "load_stack"]


def __getattr__(name: str) -> Any:
    if name in ("load_stack", "Stack"):
        from mmtui import stacks

        return getattr(stacks, name)
    if name == "attribute":
        from mmtui.run.attribution import attribute

        return attribute
    raise AttributeError(f"module 'mmtui' has no attribute {name!r}")
