"""AdaSkip: skip plans in the model, calibration profile, policies and the per-request state."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from strata.engine.models.attention_batch import AttentionBatch, LayerSkip, PrefillSlice, SkipPlan, SublayerStats
from strata.engine.skip import corpus
from strata.engine.skip.calibrate import collect_statistics, run_calibration
from strata.engine.skip.plan import build_skip_plan
from strata.engine.skip.policy import POLICIES, make_policy
from strata.engine.skip.profile import ProfileMismatchError, SkipProfile
from strata.engine.skip.request_state import RequestSkipState
from strata.engine.skip.sequence_runner import SequenceRunner
from strata.engine.skip.skip_set import SkipSet

NONE = torch.zeros(0, dtype=torch.long)
BUDGET = 8


@pytest.fixture(scope="module")
def profile(model, model_files, tokenizer) -> SkipProfile:
    """A tiny calibration (2 texts of 256 tokens), kept in memory."""
    texts = corpus.python_docs_texts("calibration", lambda s: tokenizer.encode(s, add_special_tokens=False), 2, 256)
    stats = collect_statistics(model, texts, chunk=256, progress=False)
    return SkipProfile(model_name=model_files.name, fingerprint=model_files.fingerprint,
                       num_layers=model.cfg.num_hidden_layers, corpus="test", requests=2,
                       tokens_per_request=[256, 256], **stats)


@pytest.fixture(scope="module")
def prompt(tokenizer) -> list[int]:
    text = corpus.python_docs_texts("heldout", lambda s: tokenizer.encode(s, add_special_tokens=False), 1, 96)
    return text[0]


def test_budget_zero_is_bit_identical(model, profile, prompt):
    plain = SequenceRunner(model, 128)
    full, _ = plain.prefill(prompt, logits_from=0)
    for name in POLICIES:
        policy = make_policy(name, 0, model.cfg.num_hidden_layers, profile)
        assert len(policy.fixed) == 0
        run = SequenceRunner(model, 128)
        logits, _ = run.prefill(prompt, policy.skip_set(None), logits_from=0)
        assert torch.equal(logits, full)
    # The skipping path itself with nothing skipped (measuring only) changes nothing either.
    run = SequenceRunner(model, 128)
    logits, stats = run.prefill(prompt, SkipSet(), measure=True, logits_from=0)
    assert torch.equal(logits, full) and len(stats) == model.cfg.num_hidden_layers


def test_layer_zero_never_selected(model, profile):
    layers = model.cfg.num_hidden_layers
    # Even when layer 0 looks least important, it is not chosen.
    doctored = dataclasses.replace(profile, sim_attn=[2.0] + profile.sim_attn[1:],
                                   sim_ffn=[2.0] + profile.sim_ffn[1:], ranking=[])
    assert doctored.ranking[0][0] == 0
    for prof in (profile, doctored):
        for budget in range(0, 2 * layers - 1):
            for name in POLICIES:
                fixed = make_policy(name, budget, layers, prof).fixed
                assert 0 not in fixed.attn and 0 not in fixed.ffn
                assert len(fixed) == budget


def test_beta_is_mth_largest_similarity(profile):
    eligible = sorted((profile.similarity(i, k) for i in range(1, profile.num_layers) for k in ("attn", "ffn")),
                      reverse=True)
    for m in (1, 4, 8, 12, 16):
        policy = make_policy("adaskip", m, profile.num_layers, profile)
        assert profile.beta(m) == eligible[m - 1]
        assert policy.beta == min(profile.similarity(i, k) for i, k in policy.fixed.sublayers())
    assert profile.beta(0) is None


def test_policies_shapes(profile):
    layers = profile.num_layers
    ee = make_policy("early-exit", 8, layers).fixed
    assert set(ee.attn) == set(ee.ffn) == {26, 27, 28, 29} and set(ee.attn.values()) == {1.0}
    sd = make_policy("skipdecode", 8, layers)
    assert set(sd.fixed.attn) == set(sd.fixed.ffn) == {1, 2, 3, 4}
    ramp = [len(sd.skip_set(t)) for t in range(25)]
    assert ramp == sorted(ramp) and ramp[0] < 8 and ramp[-1] == 8
    un = make_policy("unified", 8, layers).fixed
    assert set(un.attn) == set(un.ffn) == {8, 15, 22, 29}
    ada = make_policy("adaskip", 8, layers, profile).fixed
    assert {ada.attn.get(i, ada.ffn.get(i)) for i in set(ada.attn) | set(ada.ffn)} != {1.0}


def _stats(layers: int, sim: dict[int, float]) -> list[SublayerStats]:
    one = torch.tensor([1.0])
    return [SublayerStats(one, one, torch.tensor([sim.get(i, 0.5)]), torch.tensor([0.9 + i / 1000]))
            for i in range(layers)]


def test_online_extra_set_is_disjoint_and_request_local(profile):
    layers = profile.num_layers
    policy = make_policy("adaskip", BUDGET, layers, profile)
    state = RequestSkipState(policy, "e2e", window=3)
    assert state.plan_for_step(True) == policy.fixed
    fixed_ffn = next(iter(policy.fixed.ffn), None)
    high = {i: 1.0 for i in (0, 5, 17)} | ({fixed_ffn: 1.0} if fixed_ffn is not None else {})
    for _ in range(3):
        state.plan_for_step(False)
        assert state.measuring
        state.observe(_stats(layers, high))
    assert set(state.extra.ffn) == {5, 17}  # not layer 0, not what the fixed set already skips
    assert state.extra.ffn[17] == pytest.approx(0.917)
    assert not set(state.extra.ffn) & set(policy.fixed.ffn)
    step = state.plan_for_step(False)
    assert not state.measuring and {5, 17} <= set(step.ffn) and step.attn == policy.fixed.attn
    # The next request starts from the fixed set again.
    nxt = RequestSkipState(policy, "e2e", window=3)
    assert len(nxt.extra) == 0
    assert nxt.plan_for_step(True) == policy.fixed and nxt.plan_for_step(False) == policy.fixed


def test_online_step_on_the_real_model(model, profile, prompt):
    policy = make_policy("adaskip", BUDGET, model.cfg.num_hidden_layers, profile)
    state = RequestSkipState(policy, "decode", window=3)
    run = SequenceRunner(model, 128)
    logits, _ = run.prefill(prompt, state.plan_for_step(True))
    token = int(logits[-1].argmax())
    for _ in range(4):
        skip = state.plan_for_step(False)
        measuring = state.measuring
        logits, stats = run.decode(token, skip, measure=measuring)
        if measuring:
            assert all(s.sim_ffn.isnan().item() == (i in skip.ffn) for i, s in enumerate(stats))
            state.observe(stats)
        token = int(logits.argmax())
    assert state._observed == 3
    assert not set(state.extra.ffn) & set(policy.fixed.ffn) and 0 not in state.extra.ffn


def _paged(model, n_blocks: int) -> torch.Tensor:
    """A block pool with n_blocks blocks of 16 tokens per layer; layer l owns blocks l * n_blocks.."""
    cfg = model.cfg
    return torch.zeros(2, cfg.num_hidden_layers * n_blocks, 16, cfg.num_key_value_heads, cfg.head_dim)


def _layer_blocks(model, n_blocks: int) -> torch.Tensor:
    """[layers, 1]: the first block of each layer in _paged(model, n_blocks)."""
    return torch.arange(model.cfg.num_hidden_layers)[:, None] * n_blocks


def _alone(model, ids, skip, next_token):
    run = SequenceRunner(model, 256)
    pre, _ = run.prefill(ids, skip)
    dec, _ = run.decode(next_token, skip)
    return pre[0], dec


def test_mixed_batch_matches_each_alone(model, profile, prompt):
    """Row group A skips (AdaSkip), group B does not; one batch gives each its solo result."""
    layers = model.cfg.num_hidden_layers
    skip = make_policy("adaskip", BUDGET, layers, profile).fixed
    a_ids, b_ids = prompt[:40], prompt[40:96]
    na, nb = len(a_ids), len(b_ids)
    kv, first = _paged(model, 16), _layer_blocks(model, 16)
    a_slots, b_slots = torch.arange(na), 128 + torch.arange(nb)  # A in a layer's blocks 0-7, B in 8-15
    batch = AttentionBatch(first * 16 + torch.cat([a_slots, b_slots]), [PrefillSlice(0, na, 0, None),
                           PrefillSlice(na, na + nb, 0, None)], NONE, torch.zeros(layers, 0, 1, dtype=torch.long),
                           NONE)
    plan = build_skip_plan(na + nb, layers, [(torch.arange(na), skip), (torch.arange(na, na + nb), None)])
    with torch.inference_mode():
        hidden = model.forward(torch.tensor(a_ids + b_ids), torch.cat([torch.arange(na), torch.arange(nb)]),
                               batch, kv, plan)
        pre = model.logits(hidden[[na - 1, na + nb - 1]])
    ta, tb = int(pre[0].argmax()), int(pre[1].argmax())
    # One decode step for both, in the other order (B's row first).
    tables = first[:, None] + torch.stack([torch.arange(8, 16), torch.arange(0, 8)])
    batch = AttentionBatch(first * 16 + torch.tensor([128 + nb, na]), [], torch.tensor([0, 1]), tables,
                           torch.tensor([nb + 1, na + 1]))
    plan = build_skip_plan(2, layers, [(torch.tensor([1]), skip), (torch.tensor([0]), None)])
    with torch.inference_mode():
        dec = model.logits(model.forward(torch.tensor([tb, ta]), torch.tensor([nb, na]), batch, kv, plan))
    for got_pre, got_dec, ids, s, t in ((pre[0], dec[1], a_ids, skip, ta), (pre[1], dec[0], b_ids, None, tb)):
        want_pre, want_dec = _alone(model, ids, s, t)
        torch.testing.assert_close(got_pre, want_pre, atol=2e-4, rtol=1e-4)
        torch.testing.assert_close(got_dec, want_dec, atol=2e-4, rtol=1e-4)
        assert int(got_dec.argmax()) == int(want_dec.argmax())
    # And the skipping row really differs from the full model.
    full_pre, _ = _alone(model, a_ids, None, ta)
    assert not torch.allclose(pre[0], full_pre, atol=1e-3)


def test_skipped_attention_writes_no_kv(model, prompt):
    layers = model.cfg.num_hidden_layers
    skip = SkipSet(attn={3: 0.9, 7: 1.0}, ffn={5: 1.1})
    run = SequenceRunner(model, 64)
    run.kv.fill_(7.0)
    n = 40
    run.prefill(prompt[:n], skip)
    run.decode(prompt[n], skip)
    per_layer = run.kv.view(2, layers, -1, *run.kv.shape[-2:]).transpose(0, 1)  # layer l owns its blocks
    touched = per_layer[:, :, : n + 1]
    for layer in range(layers):
        untouched = bool((touched[layer] == 7.0).all())
        assert untouched == (layer in skip.attn), layer
    assert bool((per_layer[:, :, n + 1 :] == 7.0).all())


def test_layer_skip_of_empty_row_set_scales_only(model, prompt):
    """A plan whose rows all skip a sublayer multiplies the stream by the scale and nothing else."""
    layers = model.cfg.num_hidden_layers
    ids = prompt[:8]
    plans = []
    for scale in (1.0, 0.5):
        ls = [LayerSkip() for _ in range(layers)]
        ls[layers - 1] = LayerSkip(ffn_rows=NONE, ffn_scale=torch.full((8,), scale))
        plans.append(SkipPlan(ls))
    batch = AttentionBatch(_layer_blocks(model, 1) * 16 + torch.arange(8), [PrefillSlice(0, 8, 0, None)], NONE,
                           torch.zeros(layers, 0, 1, dtype=torch.long), NONE)
    with torch.inference_mode():
        h1 = model.forward(torch.tensor(ids), torch.arange(8), batch, _paged(model, 1), plans[0])
        h2 = model.forward(torch.tensor(ids), torch.arange(8), batch, _paged(model, 1), plans[1])
    # RMSNorm is scale invariant: scaling just before the final norm changes (almost) nothing.
    torch.testing.assert_close(h1, h2, atol=1e-4, rtol=1e-4)


def test_profile_round_trip_and_fingerprint(profile, tmp_path: Path):
    path = tmp_path / "adaskip-profile.json"
    profile.save(path)
    loaded = SkipProfile.load(path, profile.fingerprint)
    assert loaded == profile
    data = json.loads(path.read_text())
    assert {"ranking", "sim_attn", "scale_ffn", "corpus", "fingerprint", "requests", "tokens_per_request"} <= set(data)
    assert len(data["ranking"]) == 2 * profile.num_layers
    with pytest.raises(ProfileMismatchError, match="calibrated for model"):
        SkipProfile.load(path, "0" * 64)


def test_corpus_parts_are_disjoint_and_deterministic(tokenizer):
    assert not set(corpus.CALIBRATION_MODULES) & set(corpus.HELDOUT_MODULES)
    enc = lambda s: tokenizer.encode(s, add_special_tokens=False)  # noqa: E731
    one = corpus.python_docs_texts("heldout", enc, 2, 300)
    assert one == corpus.python_docs_texts("heldout", enc, 2, 300)
    assert [len(t) for t in one] == [300, 300]
    assert " at 0x" not in corpus.module_doc("functools")


def test_run_calibration_writes_profile_next_to_model(model_files, tmp_path: Path):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    for f in model_files.directory.iterdir():  # a linked copy, so the real profile is left alone
        (model_dir / f.name).symlink_to(f)
    path = run_calibration(str(model_dir), requests=1, min_tokens=128, progress=False)
    assert path.parent == model_dir
    prof = SkipProfile.load(path)
    assert prof.requests == 1 and prof.tokens_per_request == [128]
    assert prof.ranking[0][0] != 0 or prof.ranking[0][1] in ("attn", "ffn")
