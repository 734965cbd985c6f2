"""The steering figure (mmtui.experiments.boost) on the tiny stack: one boosted unit per batch row is the same as
steering that unit alone, bit for bit; the label deltas are those of a plain steered pass; the summary's
counts and exact interval against scipy; the choice of units from stored labels."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mmtui.experiments import boost as bx
from mmtui.experiments.ablation_ops import last_logits
from mmtui.experiments.steer import steer_hook
from mmtui.run.images import load_image
from mmtui.store import experiments as xs
from mmtui.store.labels import write_labels


def _prefix(tiny_stack, store_run, batch: int):
    store, run = store_run
    row = xs.result_rows(store, run.id)[0]
    return row, tiny_stack.encode([load_image(row["path"]).image]).expand(batch, -1, -1)


def test_one_unit_per_row_is_steering_that_unit_alone(tiny_stack, store_run):
    row, prefix = _prefix(tiny_stack, store_run, 3)
    plan = [None, (0, 3), (1, 11)]
    rows = last_logits(tiny_stack, prefix, row["context_ids"], bx.row_scale_hook(plan, 8.0, tiny_stack.image_slice))
    plain = last_logits(tiny_stack, prefix[:1], row["context_ids"])
    same_batch = last_logits(tiny_stack, prefix, row["context_ids"])
    assert torch.equal(rows[0], same_batch[0])  # the unsteered row is untouched (bit for bit in the same batch)
    for b, unit in enumerate(plan[1:], start=1):
        alone = last_logits(
            tiny_stack, prefix[:1], row["context_ids"], steer_hook([unit], [8.0], "scale", tiny_stack.image_slice)
        )
        assert torch.allclose(rows[b], alone[0], atol=1e-5)
        assert not torch.equal(rows[b], plain[0])  # the boost moves the logits: the test can fail
    ones = bx.row_scale_hook([(0, 3), (1, 11)], 1.0, tiny_stack.image_slice)
    assert torch.equal(
        last_logits(tiny_stack, prefix[:2], row["context_ids"], ones),
        last_logits(tiny_stack, prefix[:2], row["context_ids"]),
    )


def _units(n: int = 2) -> list[bx.LabelledUnit]:
    return [bx.LabelledUnit(i % 2, 3 + i, "dog", 7 + i, " dog", 1, 1e-6, 1e-3, True) for i in range(n)]


def test_boost_deltas_are_those_of_a_steered_pass(tiny_stack, store_run):
    store, run = store_run
    units = _units()
    result = bx.boost(tiny_stack, store, run, units, n_images=1, scale=4.0, n_random=2, batch_size=2)
    assert result.labelled["logit"].shape == (2, 1) and result.random["logit"].shape == (2, 2, 1)
    row = next(r for r in xs.result_rows(store, run.id) if r["path"] == result.images[0])
    prefix = tiny_stack.encode([load_image(row["path"]).image])
    plain = last_logits(tiny_stack, prefix, row["context_ids"])[0]
    for i, u in enumerate(units):
        hook = steer_hook([(u.layer, u.unit)], [4.0], "scale", tiny_stack.image_slice)
        steered = last_logits(tiny_stack, prefix, row["context_ids"], hook)[0]
        expected = float(steered[u.token_id] - plain[u.token_id])
        assert result.labelled["logit"][i, 0] == pytest.approx(expected, abs=1e-4)
        lp = torch.log_softmax(steered, -1)[u.token_id] - torch.log_softmax(plain, -1)[u.token_id]
        assert result.labelled["logprob"][i, 0] == pytest.approx(float(lp), abs=1e-4)
        assert u.unit not in result.random_units[i] and len(set(result.random_units[i])) == 2


def test_summary_against_scipy():
    from scipy import stats

    rng = np.random.default_rng(0)
    n_units = 20
    lab = rng.normal(1.0, 1.0, (n_units, 3))
    ran = rng.normal(0.0, 1.0, (n_units, 2, 3))
    result = bx.BoostResult(_units(n_units), [[0, 1]] * n_units, ["a", "b", "c"], 8.0, {"logit": lab}, {"logit": ran})
    s = bx.summarize(result, "logit")
    wins = int((lab.mean(-1) > ran.mean(-1).mean(-1)).sum())
    assert s["wins"] == wins and s["units"] == n_units
    exact = stats.binomtest(wins, n_units).proportion_ci(confidence_level=0.95, method="exact")
    assert s["ci"] == pytest.approx((exact.low, exact.high))
    assert s["p_binomial"] == pytest.approx(stats.binomtest(wins, n_units, 0.5).pvalue)
    assert s["pair_ci"][0] <= s["pair_win_rate"] <= s["pair_ci"][1]
    assert bx.clopper_pearson(0, 10)[0] == 0.0 and bx.clopper_pearson(10, 10)[1] == 1.0


def test_units_come_from_the_labels(tiny_stack, store_run):
    store, run = store_run
    with pytest.raises(bx.BoostError, match="mmtui explain"):
        bx.choose_units(store, run, tiny_stack, n_units=5)
    rows = [  # store.labels.LABEL_COLUMNS: layer, unit, label, k, n, K, N, p, q, source, n_results, agreement
        (0, 1, "dog", 3, 3, 3, 3, 1e-5, 0.01, "model", 3, None),
        (0, 2, "dog", 3, 3, 3, 3, 2e-5, 0.02, "model", 3, None),
        (1, 4, "cat", 3, 3, 3, 3, 3e-5, 0.03, "model", 3, None),
        (1, 5, "tree", 1, 3, 1, 3, 0.5, 0.9, "model", 3, None),
    ]
    write_labels(store, run.key, "word", 0, rows)
    chosen = bx.choose_units(store, run, tiny_stack, n_units=5, per_label=1)
    assert [(u.layer, u.unit, u.label) for u in chosen] == [(0, 1, "dog"), (1, 4, "cat")] and all(
        u.passed for u in chosen
    )
    assert chosen[0].token_id == tiny_stack.tokenize(" dog")[0]
    write_labels(store, run.key, "word", 0, [r[:8] + (0.5,) + r[9:] for r in rows])  # none passes the FDR
    fallback = bx.choose_units(store, run, tiny_stack, n_units=2)
    assert [(u.layer, u.unit) for u in fallback] == [(0, 1), (0, 2)] and not any(u.passed for u in fallback)
