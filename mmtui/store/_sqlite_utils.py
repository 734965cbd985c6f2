"""sqlite-utils, imported without pandas.

sqlite-utils imports pandas when it is installed (bert-score brings it) only to map pandas.Timestamp to TEXT,
which the store never writes; that import is a third of the start-up of `mmtui browse` and the query commands.
Import sqlite-utils with pandas hidden, then unhide it for whatever needs it later (BERTScore).
"""

from __future__ import annotations

import sys

if "sqlite_utils" not in sys.modules and "pandas" not in sys.modules:
    sys.modules["pandas"] = None  # type: ignore[assignment]  # `import pandas` now raises ImportError
    try:
        import sqlite_utils  # noqa: F401
    finally:
        del sys.modules["pandas"]

from sqlite_utils import Database, Migrations  # noqa: E402

__all__ = ["Database", "Migrations"]
