"""The Store's neuron tokens: each LM unit's decoded tokens (logit lens), per LM and decoding convention."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from mmtui.store.connection import Connection


class TokensMixin(Connection):
    """Decoded tokens of the LM's units, keyed by the LM's fingerprint id and the convention."""

    def count_tokens(self, lm_id: str, convention: str) -> int:
        """How many units of this LM have decoded tokens in this convention (all of them once complete)."""
        row = self.db.execute(
            "SELECT count(*) FROM neuron_tokens WHERE lm_id = ? AND convention = ?", [lm_id, convention]
        ).fetchone()
        return int(row[0])

    def has_tokens(self, lm_id: str, convention: str) -> bool:
        return self.count_tokens(lm_id, convention) > 0

    def add_tokens(self, lm_id: str, convention: str, rows: Sequence[dict[str, Any]]) -> None:
        """Store decoded tokens: rows of layer, unit, tokens, token_ids, logits, interpretable."""
        with self._write():
            self.db.conn.executemany(
                """INSERT OR REPLACE INTO neuron_tokens
                       (lm_id, convention, layer, unit, tokens, token_ids, logits, text, interpretable)
                   VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)""",
                [
                    (
                        lm_id,
                        convention,
                        r["layer"],
                        r["unit"],
                        json.dumps(r["tokens"], ensure_ascii=False),
                        json.dumps(r["token_ids"]),
                        json.dumps([round(float(x), 4) for x in r["logits"]]),
                        ", ".join(t.strip() for t in r["tokens"]),
                        int(r["interpretable"]),
                    )
                    for r in rows
                ],
            )

    def tokens(self, lm_id: str, convention: str, layer: int, unit: int) -> dict[str, Any] | None:
        row = self.db.execute(
            "SELECT tokens, token_ids, logits, interpretable FROM neuron_tokens "
            "WHERE lm_id = ? AND convention = ? AND layer = ? AND unit = ?",
            [lm_id, convention, layer, unit],
        ).fetchone()
        if row is None:
            return None
        return {
            "tokens": json.loads(row[0]),
            "token_ids": json.loads(row[1]),
            "logits": json.loads(row[2]),
            "interpretable": bool(row[3]),
        }

    def conventions(self, lm_id: str) -> list[str]:
        """The decoding conventions stored for this LM, in name order. One primary-key seek per convention
        (the next name after the last found): SELECT DISTINCT walked every unit's row (458,752 a convention at
        GPT-J scale; most of `mmtui neuron`'s time)."""
        found: list[str] = []
        while True:
            row = self.db.execute(
                "SELECT min(convention) FROM neuron_tokens WHERE lm_id = ? AND convention > ?",
                [lm_id, found[-1] if found else ""],
            ).fetchone()
            if row[0] is None:
                return found
            found.append(row[0])
