"""The cache's schema as named forward migrations, each applied in its own transaction on every open.

Tables
- stacks: one row per stack fingerprint (what makes results comparable), with its shape.
- runs: a stack + the attribution settings (prompt, site, y kind); results of different runs never mix.
- images: one row per distinct image (sha256 of its bytes), with the last path it was seen at.
- results: one row per (run, image, target spec): the target, caption, y_c, P(target), and every unit's
  max and sum of g over the image positions as compressed float16 arrays [n_layers, d_mlp].
- top_neurons: the top (layer, unit, patch) triples of each result, by rank.
- neuron_stats: per (run, layer, unit) aggregates over the results, kept up to date on every write.
- neuron_tokens: each unit's decoded top tokens, per LM and decoding convention.
"""

from __future__ import annotations

from sqlite_utils import Database, Migrations

MIGRATION_SET = "mmtui"
migrations = Migrations(MIGRATION_SET)


@migrations()
def m001_create_tables(db: Database) -> None:
    db["stacks"].create(
        {"id": str, "name": str, "fingerprint": str, "shape": str, "lm_id": str, "created": str},
        pk="id",
    )
    db["runs"].create(
        {
            "id": str,
            "stack_id": str,
            "prompt": str,
            "site": str,
            "y_kind": str,
            "settings": str,
            "created": str,
        },
        pk="id",
        foreign_keys=[("stack_id", "stacks", "id")],
    )
    db["images"].create({"sha256": str, "path": str, "width": int, "height": int, "added": str}, pk="sha256")
    db["results"].create(
        {
            "id": int,
            "run_id": str,
            "image_sha256": str,
            "target_spec": str,
            "target": str,
            "target_token_id": int,
            "target_token": str,
            "target_source": str,
            "target_split": int,
            "caption": str,
            "context": str,
            "context_ids": str,
            "human_caption": str,
            "y_c": float,
            "p_target": float,
            "n_top": int,
            "unit_max": bytes,
            "unit_sum": bytes,
            "seconds": float,
            "created": str,
        },
        pk="id",
        foreign_keys=[("run_id", "runs", "id"), ("image_sha256", "images", "sha256")],
    )
    db["results"].create_index(["run_id", "image_sha256", "target_spec"], unique=True)
    db["results"].create_index(["image_sha256"])
    db.execute(
        """
        CREATE TABLE top_neurons (
            result_id INTEGER NOT NULL REFERENCES results(id),
            rank INTEGER NOT NULL,
            layer INTEGER NOT NULL,
            unit INTEGER NOT NULL,
            patch INTEGER NOT NULL,
            score REAL NOT NULL,
            PRIMARY KEY (result_id, rank)
        ) WITHOUT ROWID
        """
    )
    db["top_neurons"].create_index(["layer", "unit", "score"])
    db.execute(
        """
        CREATE TABLE neuron_stats (
            run_id TEXT NOT NULL REFERENCES runs(id),
            layer INTEGER NOT NULL,
            unit INTEGER NOT NULL,
            n_top INTEGER NOT NULL,
            n_images INTEGER NOT NULL,
            max_score REAL NOT NULL,
            sum_score REAL NOT NULL,
            mean_score REAL NOT NULL,
            best_result_id INTEGER,
            PRIMARY KEY (run_id, layer, unit)
        ) WITHOUT ROWID
        """
    )
    for column in ("max_score", "n_top", "mean_score"):
        db["neuron_stats"].create_index(["run_id", column])
    db.execute(
        """
        CREATE TABLE neuron_tokens (
            lm_id TEXT NOT NULL,
            convention TEXT NOT NULL,
            layer INTEGER NOT NULL,
            unit INTEGER NOT NULL,
            tokens TEXT NOT NULL,
            token_ids TEXT NOT NULL,
            logits TEXT NOT NULL,
            text TEXT NOT NULL,
            interpretable INTEGER NOT NULL,
            PRIMARY KEY (lm_id, convention, layer, unit)
        ) WITHOUT ROWID
        """
    )
