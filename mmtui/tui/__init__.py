"""The Textual browser of a store (`mmtui browse`). Importing it never imports torch: the model loads in a
worker thread when a heatmap or an ablation first needs it.
"""

import mmtui.store  # noqa: F401  first: it imports sqlite-utils without pandas
from mmtui.tui.app import BrowseApp, make_app  # noqa: E402

__all__ = ["BrowseApp", "make_app"]
