"""The Textual browser of a store (`mmtui browse`). Importing it never imports torch: the model loads in a
worker thread when a heatmap or an ablation first needs it.
"""

import sys


def _import_sqlite_utils_without_pandas() -> None:
    """sqlite-utils imports pandas when it is installed (bert-score brings it) only to map pandas.Timestamp
    to TEXT, which the store never writes; that is a third of the browser's start-up. Import sqlite-utils
    with pandas hidden, then unhide it for whatever needs it later (BERTScore in an ablation)."""
    if "sqlite_utils" in sys.modules or "pandas" in sys.modules:
        return
    sys.modules["pandas"] = None  # type: ignore[assignment]  # `import pandas` now raises ImportError
    try:
        import sqlite_utils  # noqa: F401
    finally:
        del sys.modules["pandas"]


_import_sqlite_utils_without_pandas()

from mmtui.tui.app import BrowseApp, make_app  # noqa: E402

__all__ = ["BrowseApp", "make_app"]
