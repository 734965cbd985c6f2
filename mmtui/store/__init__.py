"""The cache: the only package that runs SQL or imports sqlite3 / sqlite_utils; it never imports torch."""

from mmtui.store.core import (
    COUNT_TOP,
    STATS_EVERY,
    ResultRecord,
    Run,
    StackIdentity,
    Store,
    pack_result,
)
from mmtui.store.records import target_mode

__all__ = ["COUNT_TOP", "STATS_EVERY", "ResultRecord", "Run", "StackIdentity", "Store", "pack_result", "target_mode"]
