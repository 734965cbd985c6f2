"""The cache's schema as named forward migrations, each applied in its own transaction on every open.

Tables
- stacks: one row per stack fingerprint (what makes results comparable), with its shape.
- runs: a stack + the attribution settings (prompt, site, y kind); results of different runs never mix. Each
  has a text id (a hash of those settings) and a small integer run_key (m008) that the per-unit tables use.
- images: one row per distinct image (sha256 of its bytes), with the last path it was seen at.
- results: one row per (run, image, target spec): the target, caption, y_c, P(target), every unit's
  max and sum of g over the image positions as compact arrays [n_layers, d_mlp], and the top (layer, unit,
  patch, score) triples by rank as one blob (`top`, m006; formats: mmtui.store.arrays).
- neuron_stats: per (run_key, layer, unit) aggregates over the results, folded in many results at a time.
- neuron_images: per (run_key, layer, unit) the unit's best NEURON_IMAGES results (m005).
- neuron_tokens: each unit's decoded top tokens, per LM and decoding convention.
- unit_moments: per (run_key, layer) the sum and sum of squares of every unit's unit_max over the run (m010).
- unit_labels, category_auroc: units explained from the data, per run (m011, `mmtui explain`); unit_labels is
  indexed by q and by p (m012): counting the labels below an FDR and the least p read index ranges.
"""

from __future__ import annotations

from mmtui.defaults import NEURON_IMAGES
from mmtui.store._sqlite_utils import Database, Migrations

MIGRATION_SET = "mmtui"
migrations = Migrations(MIGRATION_SET)


@migrations()
def m001_create_tables(db: Database) -> None:
    db.table("stacks").create(
        {"id": str, "name": str, "fingerprint": str, "shape": str, "lm_id": str, "created": str},
        pk="id",
    )
    db.table("runs").create(
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
    db.table("images").create({"sha256": str, "path": str, "width": int, "height": int, "added": str}, pk="sha256")
    db.table("results").create(
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
    db.table("results").create_index(["run_id", "image_sha256", "target_spec"], unique=True)
    db.table("results").create_index(["image_sha256"])
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
    db.table("top_neurons").create_index(["layer", "unit", "score"])
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
        db.table("neuron_stats").create_index(["run_id", column])
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


@migrations()
def m002_create_experiment_tables(db: Database) -> None:
    """Tables of the experiments (issue 4); written through mmtui.store.experiments.

    - ablation_points: one dose-response point per (result, mode, unit mode, condition, k, seed).
    - unit_means: per-unit mean activations over a run's images (mean ablation), float32 [n_layers, d_mlp].
    - activation_maps: a unit's activations over the patch grid of one image, float32 [grid_h, grid_w].
    - prompt_texts: decoded image prompts, random vectors, caption nouns and model captions with their scores.
    - ks_tests: two-sample KS tests between two samples of one experiment.
    - specificity: IoU of a unit's (or the mean of several units') thresholded heatmap with a COCO mask.
    - agreement: the Table 1 scores of an image: decoded top units, a random pairing, the model's caption.
    `settings` is the JSON of the choices that make rows comparable; `settings_id` its short hash.
    """
    db.execute(
        """
        CREATE TABLE ablation_points (
            id INTEGER PRIMARY KEY,
            run_id TEXT NOT NULL REFERENCES runs(id),
            result_id INTEGER NOT NULL REFERENCES results(id),
            mode TEXT NOT NULL,
            unit_mode TEXT NOT NULL,
            condition TEXT NOT NULL,
            k INTEGER NOT NULL,
            seed INTEGER NOT NULL,
            n_ablated INTEGER NOT NULL,
            n_units INTEGER NOT NULL,
            p_before REAL NOT NULL,
            p_after REAL NOT NULL,
            relative_drop REAL NOT NULL,
            caption_before TEXT,
            caption TEXT,
            bertscore REAL,
            bertscore_model TEXT,
            settings TEXT NOT NULL,
            created TEXT NOT NULL
        )
        """
    )
    db.table("ablation_points").create_index(["result_id", "mode", "unit_mode", "condition", "k", "seed"], unique=True)
    db.table("ablation_points").create_index(["run_id", "mode", "unit_mode"])
    db.execute(
        """
        CREATE TABLE unit_means (
            run_id TEXT NOT NULL REFERENCES runs(id),
            site TEXT NOT NULL,
            n_images INTEGER NOT NULL,
            means BLOB NOT NULL,
            created TEXT NOT NULL,
            PRIMARY KEY (run_id, site)
        ) WITHOUT ROWID
        """
    )
    db.execute(
        """
        CREATE TABLE activation_maps (
            stack_id TEXT NOT NULL REFERENCES stacks(id),
            image_sha256 TEXT NOT NULL REFERENCES images(sha256),
            site TEXT NOT NULL,
            layer INTEGER NOT NULL,
            unit INTEGER NOT NULL,
            grid_h INTEGER NOT NULL,
            grid_w INTEGER NOT NULL,
            acts BLOB NOT NULL,
            PRIMARY KEY (stack_id, image_sha256, site, layer, unit)
        ) WITHOUT ROWID
        """
    )
    db.execute(
        """
        CREATE TABLE prompt_texts (
            id INTEGER PRIMARY KEY,
            stack_id TEXT NOT NULL REFERENCES stacks(id),
            settings_id TEXT NOT NULL,
            kind TEXT NOT NULL,
            image_sha256 TEXT NOT NULL REFERENCES images(sha256),
            idx INTEGER NOT NULL,
            text TEXT NOT NULL,
            bertscore REAL,
            bertscore_model TEXT,
            clipscore REAL,
            clipscore_model TEXT,
            settings TEXT NOT NULL,
            created TEXT NOT NULL
        )
        """
    )
    db.table("prompt_texts").create_index(["stack_id", "settings_id", "kind", "image_sha256", "idx"], unique=True)
    db.execute(
        """
        CREATE TABLE ks_tests (
            id INTEGER PRIMARY KEY,
            experiment TEXT NOT NULL,
            scope TEXT NOT NULL,
            settings_id TEXT NOT NULL,
            metric TEXT NOT NULL,
            sample_a TEXT NOT NULL,
            sample_b TEXT NOT NULL,
            n_a INTEGER NOT NULL,
            n_b INTEGER NOT NULL,
            d REAL NOT NULL,
            p REAL NOT NULL,
            model TEXT,
            settings TEXT NOT NULL,
            created TEXT NOT NULL
        )
        """
    )
    db.table("ks_tests").create_index(
        ["experiment", "scope", "settings_id", "metric", "sample_a", "sample_b"], unique=True
    )
    db.execute(
        """
        CREATE TABLE specificity (
            id INTEGER PRIMARY KEY,
            run_id TEXT NOT NULL REFERENCES runs(id),
            result_id INTEGER NOT NULL REFERENCES results(id),
            settings_id TEXT NOT NULL,
            category TEXT NOT NULL,
            category_source TEXT NOT NULL,
            kind TEXT NOT NULL,
            seed INTEGER NOT NULL,
            layer INTEGER NOT NULL,
            unit INTEGER NOT NULL,
            iou REAL NOT NULL,
            settings TEXT NOT NULL,
            created TEXT NOT NULL
        )
        """
    )
    db.table("specificity").create_index(
        ["run_id", "settings_id", "result_id", "kind", "seed", "layer", "unit"], unique=True
    )
    db.execute(
        """
        CREATE TABLE agreement (
            id INTEGER PRIMARY KEY,
            run_id TEXT NOT NULL REFERENCES runs(id),
            result_id INTEGER NOT NULL REFERENCES results(id),
            settings_id TEXT NOT NULL,
            kind TEXT NOT NULL,
            metric TEXT NOT NULL,
            value REAL NOT NULL,
            model TEXT NOT NULL,
            n_units INTEGER NOT NULL,
            best_text TEXT,
            partner_result_id INTEGER,
            settings TEXT NOT NULL,
            created TEXT NOT NULL
        )
        """
    )
    db.table("agreement").create_index(["run_id", "settings_id", "result_id", "kind", "metric"], unique=True)


TEXT_KEY_BITS = 20  # neuron_text rowid = token set id << 40 | layer << 20 | unit (units and layers below 2**20)


@migrations()
def m003_index_browse_queries(db: Database) -> None:
    """Indexes for `mmtui browse`: sort the units of a run by any column, in one layer or all, in
    milliseconds at GPT-J scale; read a run's last write without touching the result blobs; and find units
    by a substring of their decoded tokens.

    - token_sets: one small id per (lm_id, convention) of neuron_tokens.
    - neuron_text: FTS5 trigram index of every unit's decoded tokens text (lower case), rowid =
      token set id << 40 | layer << 20 | unit, kept in step with neuron_tokens by triggers (which use no
      conflict clause of their own: an INSERT OR REPLACE into neuron_tokens imposes REPLACE on them).
      Skipped when this SQLite has no FTS5 (the browser then scans neuron_tokens instead).
    """
    import sqlite3

    for columns in (
        ["run_id", "n_images"],
        ["run_id", "unit", "layer"],
        ["run_id", "layer", "max_score"],
        ["run_id", "layer", "mean_score"],
        ["run_id", "layer", "n_top"],
        ["run_id", "layer", "n_images"],
    ):
        db.table("neuron_stats").create_index(columns)
    db.table("results").create_index(["run_id", "created"])
    db.table("neuron_tokens").create_index(["lm_id", "convention", "text"])
    db.execute(
        """
        CREATE TABLE token_sets (
            id INTEGER PRIMARY KEY,
            lm_id TEXT NOT NULL,
            convention TEXT NOT NULL,
            UNIQUE (lm_id, convention)
        )
        """
    )
    db.execute("INSERT INTO token_sets (lm_id, convention) SELECT DISTINCT lm_id, convention FROM neuron_tokens")
    try:
        db.execute("CREATE VIRTUAL TABLE neuron_text USING fts5(text, tokenize = 'trigram', detail = 'none')")
    except sqlite3.OperationalError:
        return  # no FTS5 (or no trigram tokenizer) in this SQLite
    key = f"(ts.id << 40) | (t.layer << {TEXT_KEY_BITS}) | t.unit"
    db.execute(
        f"""INSERT INTO neuron_text (rowid, text)
            SELECT {key}, lower(t.text) FROM neuron_tokens t JOIN token_sets ts USING (lm_id, convention)"""
    )
    new_key = (
        "((SELECT id FROM token_sets WHERE lm_id = new.lm_id AND convention = new.convention) << 40)"
        f" | (new.layer << {TEXT_KEY_BITS}) | new.unit"
    )
    db.execute(
        f"""
        CREATE TRIGGER neuron_tokens_text AFTER INSERT ON neuron_tokens BEGIN
            INSERT INTO token_sets (lm_id, convention) SELECT new.lm_id, new.convention
                WHERE NOT EXISTS (SELECT 1 FROM token_sets WHERE lm_id = new.lm_id AND convention = new.convention);
            INSERT OR REPLACE INTO neuron_text (rowid, text) VALUES ({new_key}, lower(new.text));
        END
        """
    )
    db.execute(
        f"""
        CREATE TRIGGER neuron_tokens_text_delete AFTER DELETE ON neuron_tokens BEGIN
            DELETE FROM neuron_text WHERE rowid = {new_key.replace("new.", "old.")};
        END
        """
    )


@migrations()
def m004_track_results_in_stats(db: Database) -> None:
    """results.in_stats: whether a result is counted in neuron_stats yet. A fast attribute run writes results
    without touching neuron_stats and folds them in, many at a time, with `Store.refresh_stats`."""
    db.table("results").add_column("in_stats", int, not_null_default=1)
    db.table("results").create_index(["run_id", "in_stats"])


@migrations()
def m005_neuron_images(db: Database) -> None:
    """neuron_images replaces the (layer, unit, score) index on top_neurons.

    That index took a random insert for each of an image's 6,400 triples: at GPT-J scale it made every
    write dirty thousands of pages (160 ms an image, growing with the cache) and cost 165 kB an image.
    neuron_images keeps, per (run, unit), the unit's best NEURON_IMAGES results: its best score there, the
    rank and patch of that triple. `Store.refresh_stats` maintains it with neuron_stats, many results at a
    time. Filled here from the results already counted in neuron_stats.
    """
    db.execute(
        """
        CREATE TABLE neuron_images (
            run_id TEXT NOT NULL REFERENCES runs(id),
            layer INTEGER NOT NULL,
            unit INTEGER NOT NULL,
            result_id INTEGER NOT NULL REFERENCES results(id),
            score REAL NOT NULL,
            rank INTEGER NOT NULL,
            patch INTEGER NOT NULL,
            PRIMARY KEY (run_id, layer, unit, result_id)
        ) WITHOUT ROWID
        """
    )
    db.execute(
        f"""INSERT INTO neuron_images (run_id, layer, unit, result_id, score, rank, patch)
            SELECT run_id, layer, unit, result_id, score, rank, patch FROM (
                SELECT r.run_id, t.layer, t.unit, t.result_id, t.score, t.rank, t.patch,
                       row_number() OVER (PARTITION BY r.run_id, t.layer, t.unit
                                          ORDER BY t.score DESC, t.result_id) AS k
                FROM (SELECT result_id, min(rank) AS rank FROM top_neurons GROUP BY result_id, layer, unit) b
                JOIN top_neurons t ON t.result_id = b.result_id AND t.rank = b.rank
                JOIN results r ON r.id = b.result_id AND r.in_stats = 1)
            WHERE k <= {NEURON_IMAGES}"""
    )
    db.execute("DROP INDEX IF EXISTS idx_top_neurons_layer_unit_score")


@migrations()
def m006_pack_top_triples(db: Database) -> None:
    """results.top: a result's top triples as one blob (mmtui.store.arrays.pack_triples) replace the top_neurons table.

    As rows, 6,400 triples an image took ~190 kB and 6,400 inserts (a fifth of the cache at GPT-J scale, and
    the slowest part of a write); packed they take ~40 kB and one. Nothing reads them by unit any more
    (neuron_images does that), so rows bought nothing. Converted here result by result; the freed pages are
    reused by later writes (`VACUUM` gives them back to the disk).
    """
    import numpy as np

    from mmtui.store.arrays import pack_triples

    db.table("results").add_column("top", bytes)
    if "top_neurons" not in db.table_names():  # not written by mmtui; nothing to convert
        return
    ids = [r[0] for r in db.execute("SELECT id FROM results ORDER BY id")]
    for result_id in ids:
        rows = db.execute(
            "SELECT layer, unit, patch, score FROM top_neurons WHERE result_id = ? ORDER BY rank", [result_id]
        ).fetchall()
        layer, unit, patch = (np.array([r[i] for r in rows], dtype=np.int64) for i in range(3))
        score = np.array([r[3] for r in rows], dtype=np.float32)
        db.execute("UPDATE results SET top = ? WHERE id = ?", [pack_triples(layer, unit, patch, score), result_id])
    db.execute("DROP TABLE top_neurons")


@migrations()
def m007_neuron_images_floor(db: Database) -> None:
    """neuron_stats.images_floor: the score of the unit's NEURON_IMAGES-th best result in neuron_images, set by
    `Store.prune_neuron_images` (NULL: not known yet, or fewer kept). A result scoring at or below it can't enter
    the unit's best (new results have higher ids, which lose ties), so `Store.refresh_stats` skips it: in a long
    run most (result, unit) pairs, where neuron_images took most of the write time."""
    db.table("neuron_stats").add_column("images_floor", float)


STATS_INDEXES = (  # neuron_stats' indexes as m008 rebuilt them (m001, m003); m009 drops the (layer, ...) ones
    ("max_score",),
    ("n_top",),
    ("mean_score",),
    ("n_images",),
    ("unit", "layer"),
    ("layer", "max_score"),
    ("layer", "mean_score"),
    ("layer", "n_top"),
    ("layer", "n_images"),
)


@migrations()
def m008_integer_run_keys_and_unit_lists(db: Database) -> None:
    """runs.run_key: a small integer per run, which neuron_stats and neuron_images key their rows by (run_key)
    in place of the 12-character run id; and neuron_images holds one row per unit, its best NEURON_IMAGES
    results packed in one blob (`best`, mmtui.store.arrays.pack_unit_images), in place of a row per (unit, result).

    The id sat in every entry of ten B-trees (neuron_stats, its nine indexes, neuron_images): ~12 bytes a
    row of each, a sixth of the cache at GPT-J scale when units seldom recur (bench/store_write.py --spread).
    A row per (unit, result) made each fold insert a row for every unit of every new result (3,000 an image
    there) and a prune delete all but the best 20 again later; a list per unit is merged in numpy and
    written once per fold, only where it changed. images_floor (m007), which spared the prune's rows, goes.
    Both tables are rebuilt here, in key order.
    """
    import numpy as np

    from mmtui.store.fold import by_unit, merge_best_images, split_key

    db.execute("ALTER TABLE runs ADD COLUMN run_key INTEGER")
    db.execute("UPDATE runs SET run_key = (SELECT count(*) FROM runs r WHERE r.rowid <= runs.rowid)")
    db.execute("CREATE UNIQUE INDEX idx_runs_run_key ON runs (run_key)")
    db.execute(
        """
        CREATE TABLE neuron_stats_new (
            run_key INTEGER NOT NULL REFERENCES runs(run_key),
            layer INTEGER NOT NULL,
            unit INTEGER NOT NULL,
            n_top INTEGER NOT NULL,
            n_images INTEGER NOT NULL,
            max_score REAL NOT NULL,
            sum_score REAL NOT NULL,
            mean_score REAL NOT NULL,
            best_result_id INTEGER,
            PRIMARY KEY (run_key, layer, unit)
        ) WITHOUT ROWID
        """
    )
    db.execute(
        """INSERT INTO neuron_stats_new
           SELECT r.run_key, s.layer, s.unit, s.n_top, s.n_images, s.max_score, s.sum_score, s.mean_score,
                  s.best_result_id
           FROM neuron_stats s JOIN runs r ON r.id = s.run_id ORDER BY r.run_key, s.layer, s.unit"""
    )
    db.execute("DROP TABLE neuron_stats")  # and its indexes
    db.execute("ALTER TABLE neuron_stats_new RENAME TO neuron_stats")
    for columns in STATS_INDEXES:
        db.table("neuron_stats").create_index(["run_key", *columns])
    db.execute(
        """
        CREATE TABLE neuron_images_new (
            run_key INTEGER NOT NULL REFERENCES runs(run_key),
            layer INTEGER NOT NULL,
            unit INTEGER NOT NULL,
            best BLOB NOT NULL,
            PRIMARY KEY (run_key, layer, unit)
        ) WITHOUT ROWID
        """
    )
    layers = db.execute(  # a layer at a time: a large cache holds millions of rows
        "SELECT DISTINCT r.id, r.run_key, i.layer FROM neuron_images i JOIN runs r ON r.id = i.run_id ORDER BY 2, 3"
    ).fetchall()
    for run_id, run_key, layer_index in layers:
        rows = db.execute(
            "SELECT result_id, layer, unit, rank, patch, score FROM neuron_images WHERE run_id = ? AND layer = ?",
            [run_id, layer_index],
        ).fetchall()
        columns = np.array(rows, dtype=np.float64).T
        best = {k: columns[i].astype(np.int64) for i, k in enumerate(("result_id", "layer", "unit", "rank", "patch"))}
        best["score"] = columns[5]
        keys, lists = merge_best_images([], best, *by_unit(best), NEURON_IMAGES)
        layer, unit = (a.tolist() for a in split_key(keys))
        db.conn.executemany(
            "INSERT INTO neuron_images_new (run_key, layer, unit, best) VALUES (?, ?, ?, ?)",
            zip([run_key] * len(keys), layer, unit, lists, strict=True),
        )
    db.execute("DROP TABLE neuron_images")
    db.execute("ALTER TABLE neuron_images_new RENAME TO neuron_images")


@migrations()
def m009_drop_per_layer_sort_indexes(db: Database) -> None:
    """Drop neuron_stats' four (run_key, layer, column) indexes. A fold updated every index of every unit it
    touched, and these four were half of that work (bench/store_write.py --spread: 5.8 -> 3.1 s a fold of 512
    results at GPT-J scale). A sort within one layer now reads the layer's rows by the primary key and sorts
    them (16,384 at GPT-J scale: a few ms; `mmtui.store.queries`); sorts over all layers keep their indexes."""
    per_layer = {("run_key", *columns) for columns in STATS_INDEXES if columns[0] == "layer"}
    for index in db.table("neuron_stats").indexes:
        if tuple(index.columns) in per_layer:
            db.execute(f"DROP INDEX [{index.name}]")


@migrations()
def m010_unit_max_moments(db: Database) -> None:
    """unit_moments: per (run_key, layer), over the run's n folded results, the sum and the sum of squares of
    every unit's unit_max (its max of g over the image positions), as float64 arrays of d_mlp values. They give
    each unit's mean and std over the run's images, hence the lift of a unit on an image (its z-score;
    `mmtui.store.prevalence`). neuron_stats has rows only for the units that reached some result's stored
    triples, while a z-score needs the unit's values in every result; so the moments are arrays, one row per
    layer (16,384 x 2 x 8 bytes at GPT-J scale), folded by `Store.refresh_stats` with the other aggregates.
    Filled here from the results already folded. A rowid table (its rows are large); run_key without a foreign
    key, so that a rebuild of runs (as m008's) never has to mind it."""
    from mmtui.store.prevalence import fold_moments

    db.execute(
        """
        CREATE TABLE unit_moments (
            run_key INTEGER NOT NULL,
            layer INTEGER NOT NULL,
            n INTEGER NOT NULL,
            sum BLOB NOT NULL,
            sum_sq BLOB NOT NULL
        )
        """
    )
    db.execute("CREATE UNIQUE INDEX idx_unit_moments_run_key_layer ON unit_moments (run_key, layer)")
    for run_id, run_key in db.execute("SELECT id, run_key FROM runs ORDER BY run_key").fetchall():
        ids = [r[0] for r in db.execute("SELECT id FROM results WHERE run_id = ? AND in_stats = 1", [run_id])]
        fold_moments(db, run_id, run_key, ids)


@migrations()
def m011_unit_labels(db: Database) -> None:
    """Labels of units from the data (`mmtui explain`, mmtui.experiments.explain), per run.

    unit_labels: per (run_key, kind word|category, control 0|1, layer, unit) the caption word or COCO category most
    enriched among the unit's best images against the run's base rate: k of the unit's n best images carry it,
    k_all of the n_all results that could carry it do (K and N in the code; SQLite's column names ignore case).
    p: the hypergeometric upper tail; q: Benjamini-Hochberg over every (unit, label) tested. control = 1: the same
    computation with the labels shuffled across images (the chance level). n_results: the run's results when it
    was computed (a run that has grown since is recomputed). agreement: BERTScore F1 of the label against the
    unit's decoded tokens (NULL when not scored).
    category_auroc: per (run_key, control, category) its best units by AUROC of unit_max (images with the category
    vs without); control = 1 with the category labels shuffled across images.
    """
    db.execute(
        """
        CREATE TABLE unit_labels (
            run_key INTEGER NOT NULL,
            kind TEXT NOT NULL,
            control INTEGER NOT NULL,
            layer INTEGER NOT NULL,
            unit INTEGER NOT NULL,
            label TEXT NOT NULL,
            k INTEGER NOT NULL,
            n INTEGER NOT NULL,
            k_all INTEGER NOT NULL,
            n_all INTEGER NOT NULL,
            p REAL NOT NULL,
            q REAL NOT NULL,
            source TEXT NOT NULL,
            n_results INTEGER NOT NULL,
            agreement REAL,
            PRIMARY KEY (run_key, kind, control, layer, unit)
        ) WITHOUT ROWID
        """
    )
    db.execute("CREATE INDEX unit_labels_label ON unit_labels (run_key, label)")
    db.execute(
        """
        CREATE TABLE category_auroc (
            run_key INTEGER NOT NULL,
            control INTEGER NOT NULL,
            category TEXT NOT NULL,
            rank INTEGER NOT NULL,
            layer INTEGER NOT NULL,
            unit INTEGER NOT NULL,
            auroc REAL NOT NULL,
            n_pos INTEGER NOT NULL,
            N INTEGER NOT NULL,
            n_results INTEGER NOT NULL,
            PRIMARY KEY (run_key, control, category, rank)
        ) WITHOUT ROWID
        """
    )


@migrations()
def m012_unit_labels_by_q_and_p(db: Database) -> None:
    """Indexes of unit_labels by (run_key, kind, control, q) and by (..., p): `explain`'s summary counts the units
    with q below the FDR and reads the least p as index ranges and ends, instead of aggregating every stored
    label (0.8 s on a GPT-J-scale run's 917K label rows)."""
    db.execute("CREATE INDEX unit_labels_q ON unit_labels (run_key, kind, control, q)")
    db.execute("CREATE INDEX unit_labels_p ON unit_labels (run_key, kind, control, p)")
