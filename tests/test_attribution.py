"""Attribution scores against independent computations: Captum, finite differences, batch invariance."""

from __future__ import annotations

import pytest
import torch

from mmtui.run.attribution import Target, attribute, resolve_target, score_targets


def _targets(stack, prefix, words):
    generated = stack.generate(prefix)
    return [resolve_target(stack, ids, w) for ids, w in zip(generated, words, strict=True)]


def _y_of(stack, embeds, lengths, token_ids):
    """y_c = P(c) at each item's last position: the quantity attributed, written out independently."""
    hidden = stack.lm.base_model(inputs_embeds=embeds).last_hidden_state
    last = hidden[torch.arange(len(lengths)), torch.tensor(lengths) - 1]
    probs = torch.softmax(stack.lm.get_output_embeddings()(last), dim=-1)
    return probs[torch.arange(len(lengths)), token_ids]


@pytest.fixture
def batch(tiny_stack64, pil_images):
    stack = tiny_stack64
    prefix = stack.encode(pil_images)
    # different context lengths in one batch: padding must not leak into any item
    targets = _targets(stack, prefix, [None, "dog", "horse"])
    targets[2].context_ids = targets[2].context_ids[:1] + [5, 7]
    return stack, prefix, targets


def test_scores_equal_captum_in_float64(batch):
    from captum.attr import LayerGradientXActivation

    stack, prefix, targets = batch
    ours = score_targets(stack, prefix, targets, full=True)
    embeds, lengths = stack.build_inputs(prefix, [t.context_ids for t in targets])
    token_ids = torch.tensor([t.token_id for t in targets])
    layers = [stack.adapter.w_out_module(i) for i in range(stack.n_layers)]
    lga = LayerGradientXActivation(lambda e: _y_of(stack, e, lengths, token_ids), layers)
    with torch.enable_grad():
        theirs = lga.attribute(embeds, attribute_to_layer_input=True)
    n_patch = prefix.shape[1]
    for i, attr in enumerate(ours):
        expected = torch.stack([t[i, :n_patch] for t in theirs])  # [L, P, d_mlp]
        assert attr.scores.dtype == torch.float64 or attr.scores.dtype == torch.float32
        torch.testing.assert_close(attr.scores.double(), expected.double(), rtol=1e-6, atol=1e-12)
        assert expected.abs().max() > 0


def test_scores_match_finite_differences(batch):
    """g = A * dy/dA, with dy/dA from a central difference on the activation itself."""
    stack, prefix, targets = batch
    ours = score_targets(stack, prefix[:1], targets[:1], full=True)[0]
    embeds, lengths = stack.build_inputs(prefix[:1], [targets[0].context_ids])
    token_ids = torch.tensor([targets[0].token_id])
    eps = 1e-6
    for layer, unit, patch in [(0, 3, 2), (1, 10, 5), (1, 63, 15), (0, 40, 0)]:

        def shifted(delta, layer=layer, unit=unit, patch=patch):
            def fn(hooked, act):
                if hooked == layer:
                    act = act.clone()
                    act[0, patch, unit] += delta
                    return act
                return None

            with torch.no_grad(), stack.hooks(fn):
                return _y_of(stack, embeds, lengths, token_ids)[0]

        with torch.no_grad():
            captured: dict[int, torch.Tensor] = {}

            def grab(hooked, act, captured=captured):
                captured[hooked] = act.clone()

            with stack.hooks(grab):
                _y_of(stack, embeds, lengths, token_ids)
        derivative = (shifted(eps) - shifted(-eps)) / (2 * eps)
        expected = captured[layer][0, patch, unit] * derivative
        assert ours.scores[layer, patch, unit].item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-13)


def test_batched_equals_one_by_one(tiny_stack, pil_images):
    stack = tiny_stack
    together = attribute(stack, pil_images, target="dog")
    alone = [attribute(stack, [img], target="dog")[0] for img in pil_images]
    for a, b in zip(together, alone, strict=True):
        assert a.target.token_id == b.target.token_id
        assert a.p_target == pytest.approx(b.p_target, rel=1e-4)
        torch.testing.assert_close(a.unit_max, b.unit_max, rtol=1e-3, atol=1e-9)
        assert a.top(5)[0][:3] == b.top(5)[0][:3]


def test_top_triples_are_sorted_and_consistent(tiny_stack, pil_images):
    attr = attribute(tiny_stack, pil_images[:1], full=True)[0]
    scores = attr.top_score
    assert torch.all(scores[:-1] >= scores[1:])
    for layer, unit, patch, score in attr.top(50):
        assert attr.scores[layer, patch, unit].item() == pytest.approx(score)
    torch.testing.assert_close(attr.unit_max, attr.scores.amax(dim=1))
    torch.testing.assert_close(attr.unit_sum, attr.scores.sum(dim=1))
    expected = min(6400, tiny_stack.n_layers * tiny_stack.d_mlp * tiny_stack.n_patches)
    assert len(scores) == expected


def test_y_kinds_and_p_target(tiny_stack, pil_images):
    prob = attribute(tiny_stack, pil_images[:1], target="dog", y_kind="prob")[0]
    logprob = attribute(tiny_stack, pil_images[:1], target="dog", y_kind="logprob")[0]
    assert prob.y_c == pytest.approx(prob.p_target)
    assert logprob.y_c == pytest.approx(torch.tensor(prob.p_target).log().item(), rel=1e-4)
    assert 0 < prob.p_target < 1


def test_pre_site_scores_the_first_matrix_output(tiny_stack64, pil_images):
    stack = tiny_stack64
    attr = attribute(stack, pil_images[:1], target="dog", site="pre", full=True)[0]
    assert attr.scores.shape == (stack.n_layers, stack.n_patches, stack.d_mlp)
    post = attribute(stack, pil_images[:1], target="dog", site="post", full=True)[0]
    assert not torch.allclose(attr.scores, post.scores)


def test_parameters_get_no_gradients(tiny_stack, pil_images):
    attribute(tiny_stack, pil_images[:1])
    assert all(p.grad is None and not p.requires_grad for p in tiny_stack.lm.parameters())


def test_hooks_are_removed(tiny_stack, pil_images):
    fired = []
    with tiny_stack.hooks(lambda layer, act: fired.append(layer)):
        tiny_stack.caption(pil_images[:1], max_new_tokens=2)
    count = len(fired)
    assert count > 0
    tiny_stack.caption(pil_images[:1], max_new_tokens=2)
    assert len(fired) == count


def test_split_target_uses_first_token(tiny_stack):
    target = resolve_target(tiny_stack, [], "xylophonist")
    assert target.split
    ids = tiny_stack.tokenize(" xylophonist")
    assert target.token_id == ids[0] and len(ids) > 1


def test_target_is_first_noun_of_caption(tiny_stack):
    ids = tiny_stack.tokenize(" a dog with a cat")
    target = resolve_target(tiny_stack, ids, None)
    assert (target.word, target.source) == ("dog", "caption-noun")
    assert tiny_stack.tokenizer.decode(target.context_ids) == " a"
    assert target.token_id == ids[len(target.context_ids)]


def test_word_target_context_is_caption_up_to_its_noun(tiny_stack):
    ids = tiny_stack.tokenize(" a dog with a cat")
    target = resolve_target(tiny_stack, ids, "horse")
    assert isinstance(target, Target)
    assert tiny_stack.tokenizer.decode(target.context_ids) == " a"
    assert target.token_id == tiny_stack.tokenize(" horse")[0]


@pytest.mark.parametrize("top", [1, 37, 100, 128, 129, 2048, 9999])
def test_kept_triples_equal_a_full_sort(tiny_stack, pil_images, top):
    """The thresholded reduction keeps exactly the top-k of all L x P x d_mlp scores, for k below and above the
    number of units."""
    attrs = attribute(tiny_stack, pil_images, target="dog", top=top, full=True)
    for attr in attrs:
        flat = attr.scores.reshape(-1)
        expected = flat.topk(min(top, flat.numel())).values
        torch.testing.assert_close(attr.top_score, expected)
        rebuilt = attr.scores[attr.top_layer, attr.top_patch, attr.top_unit]
        torch.testing.assert_close(rebuilt, attr.top_score)


def test_no_op_waits_on_the_device_once_the_layers_run(tiny_stack, pil_images):
    """On a GPU every op whose output shape or value the host must know (nonzero, item, a boolean mask)
    stalls the launch queue, and so does a tensor made from host data (its copy to the device waits for
    the queue). From the first matrix product on, the attribution pass queues the forward, the backward
    and the reduction with none, and reads the results back only at the end. (Before it, transformers'
    mask preparation reads one flag, while the queue holds only the input embeddings.)"""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Record(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.ops: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    stack = tiny_stack
    prefix = stack.encode(pil_images)
    targets = _targets(stack, prefix, [None, "dog", "horse"])
    with Record() as record:
        score_targets(stack, prefix, targets)
    ops = record.ops
    first_matmul = min(i for i, op in enumerate(ops) if op in {"mm", "addmm", "bmm"})
    host_waits = {"nonzero", "masked_select", "_local_scalar_dense", "unique", "_unique2", "masked_scatter", "item"}
    host_waits.add("lift_fresh")  # torch.tensor(host data)
    assert not host_waits & set(ops[first_matmul:])
    # the mode saw the backward and the reduction too
    assert {"topk", "amax", "gather"} <= set(ops[first_matmul:])


def _transformers_greedy(stack, prefix, max_new_tokens=12):
    """Greedy captions from transformers' own generate: the reference for `Stack.generate`."""
    embeds, _ = stack.build_inputs(prefix, [[] for _ in range(prefix.shape[0])])
    stops = stack.stop_token_ids
    with torch.no_grad():
        out = stack.lm.generate(
            inputs_embeds=embeds,
            attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=1,
            eos_token_id=stops,
            pad_token_id=stops[0],
        )
    return [row[: next((i for i, t in enumerate(row) if t in stops), len(row))] for row in out.tolist()]


@pytest.mark.parametrize("name", ["tiny_stack", "smol"])
def test_greedy_captions_equal_transformers_generate(name, request, pil_images):
    stack = request.getfixturevalue(name)
    prefix = stack.encode(pil_images)
    for n in (1, 12):
        ours = stack.generate(prefix, n)
        assert ours == _transformers_greedy(stack, prefix, n)
        assert all(len(row) <= n for row in ours)
    assert any(ours)


@pytest.mark.parametrize("empty", [(), (0,), (0, 1, 2)])
def test_caption_and_score_equals_caption_then_score(tiny_stack64, pil_images, monkeypatch, empty):
    """One pass over the image prompt (shared by the caption and the attribution) gives the scores of two,
    whether y_c is read after caption tokens or at the prompt's last token (no caption tokens before the
    target: read in the shared pass itself), and with both in one batch."""
    from mmtui.run import attribution

    stack = tiny_stack64
    prefix = stack.encode(pil_images)
    words = [None, "dog", "horse"]
    real = attribution.resolve_target
    seen: list[int] = []

    def resolve(stack, ids, word, source=None):
        target = real(stack, ids, word, source)
        if len(seen) in empty:
            target.context_ids = []
        seen.append(len(target.context_ids))
        return target

    monkeypatch.setattr(attribution, "resolve_target", resolve)
    fused = attribution.caption_and_score(stack, prefix, words, [None, None, "human-caption"], full=True)
    assert (seen.count(0) >= len(empty)) and (len(empty) == 3 or any(seen))
    targets = [a.target for a in fused]
    two = score_targets(stack, prefix, targets, full=True)
    for a, b in zip(fused, two, strict=True):
        assert a.y_c == pytest.approx(b.y_c, rel=1e-12)
        torch.testing.assert_close(a.scores, b.scores, rtol=1e-9, atol=1e-18)
        assert torch.equal(a.top_layer[:50], b.top_layer[:50]) and torch.equal(a.top_unit[:50], b.top_unit[:50])
    assert targets[2].source == "human-caption"


def test_an_image_whose_target_fails_is_returned_as_its_error(tiny_stack64, pil_images):
    from mmtui.errors import TargetError
    from mmtui.run.attribution import caption_and_score

    stack = tiny_stack64
    prefix = stack.encode(pil_images)
    mixed = caption_and_score(stack, prefix, ["dog", " ", "horse"], [None] * 3, full=True)
    assert isinstance(mixed[1], TargetError) and "empty" in str(mixed[1])
    alone = caption_and_score(stack, prefix[[0, 2]], ["dog", "horse"], [None] * 2, full=True)
    for a, b in zip([mixed[0], mixed[2]], alone, strict=True):
        torch.testing.assert_close(a.scores, b.scores, rtol=1e-9, atol=1e-18)
    assert all(isinstance(r, TargetError) for r in caption_and_score(stack, prefix[:1], [" "], [None]))
