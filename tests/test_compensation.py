"""Stage 2: alignment, streamed fit against a materialised least-squares solve, cross-validation guard, modes."""

import copy

import pytest
import torch

import gradmap.compensation as comp_mod
from conftest import random_calibration, tiny_model
from gradmap.adapters import get_adapter
from gradmap.compensation import (RIDGE_GRID, aligned_dense_layer, compensate, fit_projection, fit_projection_folds,
                                  gap_positions, heldout_loss, mean_shifts)
from gradmap.scoring import lm_loss_sum
from gradmap.projection import solve_ridge
from gradmap.removal import remove_layers


def test_alignment_hand_cases():
    kept = [0, 1, 3, 4, 7]  # of 9 dense layers: 2, 5, 6, 8 removed
    assert [aligned_dense_layer(kept, p, 9) for p in range(5)] == [0, 2, 3, 6, 8]
    assert gap_positions(kept, 9) == [1, 3, 4]
    assert gap_positions([2, 3, 4], 5) == []  # removal only at the start: nothing before it


def _pruned(family="llama", drop=(2, 3)):
    dense = tiny_model(family)
    pruned = copy.deepcopy(dense)
    remove_layers(pruned, list(drop))
    kept = [i for i in range(6) if i not in drop]
    return dense, pruned, kept


def _capture_all(model, ids, mask):
    """Every layer's output and every down_proj output, by full forward with hooks (no early stop)."""
    adapter = get_adapter(model)
    outs, downs, hs = {}, {}, []
    for i, layer in enumerate(adapter.layers(model)):
        hs.append(layer.register_forward_hook(lambda m, a, o, i=i: outs.__setitem__(i, o)))
        hs.append(adapter.down_proj(layer).register_forward_hook(lambda m, a, o, i=i: downs.__setitem__(i, o)))
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    for h in hs:
        h.remove()
    return outs, downs


@pytest.mark.parametrize("skip_first", [0, 1, 3])
def test_fit_equals_materialised_least_squares(skip_first):
    dense, pruned, kept = _pruned()
    cal = random_calibration(nsamples=4, seqlen=12, pad_last=4)
    position = 1  # kept layer 1 is followed by removed 2, 3: aligned dense layer 3
    G, C, tokens = fit_projection(dense, pruned, kept, position, cal, micro_batch=3, skip_first=skip_first)
    used = cal.attention_mask.clone()
    used[:, :skip_first] = 0  # the first positions of every window are context only
    real = used.bool().flatten()
    d_out, _ = _capture_all(dense, cal.input_ids, cal.attention_mask)
    p_out, p_down = _capture_all(pruned, cal.input_ids, cal.attention_mask)
    M = p_down[position].flatten(0, 1)[real].double()
    X = p_out[position].flatten(0, 1)[real].double()
    Y = d_out[3].flatten(0, 1)[real].double()
    assert tokens == int(real.sum())
    lam = 0.05
    alpha = lam * torch.diagonal(M.T @ M).mean()
    want = torch.linalg.solve(M.T @ M + alpha * torch.eye(M.shape[1], dtype=torch.float64), M.T @ (Y - X + M))
    torch.testing.assert_close(solve_ridge(G, C, lam), want, rtol=1e-6, atol=1e-8)


def test_mean_shift_hand_computed():
    dense, pruned, kept = _pruned()
    cal = random_calibration(nsamples=2, seqlen=10, pad_last=3)
    shifts, rel = mean_shifts(dense, pruned, kept, cal, micro_batch=1)
    real = cal.attention_mask.bool().flatten()
    d_out, _ = _capture_all(dense, cal.input_ids, cal.attention_mask)
    p_out, _ = _capture_all(pruned, cal.input_ids, cal.attention_mask)
    for p, k in enumerate(kept):
        a = aligned_dense_layer(kept, p, 6)
        diff = (p_out[p] - d_out[a]).flatten(0, 1)[real].double().norm(dim=-1)
        assert shifts[p] == pytest.approx(diff.mean().item(), rel=1e-6)
        ref = d_out[a].flatten(0, 1)[real].double().norm(dim=-1)
        assert rel[p] == pytest.approx((diff / ref).mean().item(), rel=1e-6)
    assert shifts[0] == pytest.approx(0.0, abs=1e-5)  # layer 0 precedes the removal: no drift yet


@pytest.mark.parametrize("mode", ["max-shift", "every-gap"])
def test_compensate_lowers_cv_loss_and_keeps_dense(mode):
    dense, pruned, kept = _pruned(drop=(1, 4))  # kept 0, 2, 3, 5: gaps after 0 and 3
    dense_state = {k: v.clone() for k, v in dense.state_dict().items()}
    cal = random_calibration(nsamples=8, seqlen=16, seed=3)
    before = heldout_loss(pruned, cal, micro_batch=2)
    result = compensate(dense, pruned, kept, cal, mode=mode, folds=4, micro_batch=2)
    assert set(result.shifts) == set(kept)
    expected_layers = [0, 3] if mode == "every-gap" else [max(result.shifts, key=result.shifts.get)]
    assert [f.layer for f in result.fits] == expected_layers
    # "none" of the first layer = the unfolded model on all windows (same micro-batches: 4 folds of 2 windows)
    assert result.fits[0].heldout_loss_before == pytest.approx(before, rel=1e-6)
    assert result.fits[0].applied
    for f in result.fits:
        assert f.heldout_loss_after <= f.heldout_loss_before
        assert f.candidates["none"] == f.heldout_loss_before
        if f.applied:
            assert f.heldout_loss_after == min(v for v in f.candidates.values() if v == v)
            assert f.tokens == 8 * 15  # SKIP_FIRST = 1 position of each window left out of the fit
    for k, v in dense.state_dict().items():
        assert torch.equal(v, dense_state[k])


def test_harmful_fold_is_skipped(monkeypatch):
    """A projection that raises the cross-validated loss is not applied; the layer is bit-identical, report says so."""
    dense, pruned, kept = _pruned()
    cal = random_calibration(nsamples=4, seqlen=12)
    before = {k: v.clone() for k, v in pruned.state_dict().items()}
    monkeypatch.setattr(comp_mod, "solve_ridge",
                        lambda G, C, lam, **kw: -5.0 * torch.eye(G.shape[0], dtype=G.dtype))
    result = compensate(dense, pruned, kept, cal, mode="every-gap", folds=2)
    assert all(not f.applied for f in result.fits) and result.fits
    for f in result.fits:
        assert f.ridge is None and f.heldout_loss_after == f.heldout_loss_before
        assert all(v > f.candidates["none"] for k, v in f.candidates.items() if k != "none")
    assert any("fold skipped" in n for n in result.notes)
    for k, v in pruned.state_dict().items():
        assert torch.equal(v, before[k])


def test_mode_none_and_errors():
    dense, pruned, kept = _pruned()
    assert compensate(dense, pruned, kept, random_calibration(), mode="none").fits == []
    with pytest.raises(ValueError, match="compensate: 'all' is not one of none, max-shift, every-gap"):
        compensate(dense, pruned, kept, random_calibration(), mode="all")
    with pytest.raises(ValueError, match="at least 2 windows"):
        compensate(dense, pruned, kept, random_calibration(nsamples=1), mode="every-gap")


def test_dense_cache_gives_same_folds():
    """Reusing the dense states of the shift pass gives the same folded weights as re-running the dense model."""
    cal = random_calibration(nsamples=6, seqlen=12, seed=1, pad_last=2)
    results = []
    dense_runs = []
    for budget in (0, 1 << 30):
        dense, pruned, kept = _pruned(drop=(1, 4))
        runs = []
        dense.model.embed_tokens.register_forward_hook(lambda *a: runs.append(1))
        compensate(dense, pruned, kept, cal, mode="every-gap", folds=3, micro_batch=2, dense_cache_bytes=budget)
        results.append(pruned.state_dict())
        dense_runs.append(len(runs))
    # 6 windows in 3 folds of 2, micro-batches of 2 = 3 dense forwards for the shifts, plus 3 per gap (2 gaps) when
    # streamed; the cross-validation only runs the pruned model
    assert dense_runs == [9, 3]
    for k in results[0]:
        torch.testing.assert_close(results[0][k], results[1][k], rtol=0, atol=0)


def test_fold_statistics_sum_to_single_pass():
    """Per-fold Gram statistics add up to the single-pass G, C (same micro-batches: folds of 2, micro-batch 2)."""
    dense, pruned, kept = _pruned()
    cal = random_calibration(nsamples=6, seqlen=12, seed=2, pad_last=4)
    Gs, Cs, tokens = fit_projection_folds(dense, pruned, kept, 1, cal.folds(3), micro_batch=2)
    G, C, n = fit_projection(dense, pruned, kept, 1, cal, micro_batch=2)
    assert len(Gs) == len(Cs) == 3 and tokens == n == cal.num_tokens - cal.nsamples
    assert all(g.dtype == torch.float64 for g in Gs + Cs)
    torch.testing.assert_close(sum(Gs), G, rtol=1e-10, atol=1e-10 * float(G.abs().max()))
    torch.testing.assert_close(sum(Cs), C, rtol=1e-10, atol=1e-10 * float(C.abs().max()))


def test_cv_losses_and_final_fold_by_hand():
    """Each candidate's CV loss is the sum over folds of the loss of the fold-k fit on fold k; the applied T is
    solve_ridge(G, C, λ, prior="identity") on all windows."""
    dense, pruned, kept = _pruned()  # layers 2, 3 removed: one gap, after kept position 1
    manual = copy.deepcopy(pruned)
    cal = random_calibration(nsamples=8, seqlen=16, seed=5, pad_last=3)
    result = compensate(dense, pruned, kept, cal, mode="every-gap", folds=4, micro_batch=2)
    (fit,) = result.fits
    assert fit.applied and fit.ridge in RIDGE_GRID and fit.tokens == cal.num_tokens - cal.nsamples
    adapter = get_adapter(manual)
    layer = adapter.layers(manual)[1]
    down = adapter.down_proj(layer)
    original = down.weight.detach().clone()
    parts = cal.folds(4)
    Gs, Cs, _ = fit_projection_folds(dense, manual, kept, 1, parts, micro_batch=2)
    G, C = sum(Gs), sum(Cs)
    for lam in RIDGE_GRID:
        total, count = 0.0, 0
        for k, part in enumerate(parts):
            adapter.fold_into_mlp_out_(layer, solve_ridge(G - Gs[k], C - Cs[k], lam, prior="identity"))
            with torch.no_grad():
                for ids, mask in part.batches(2):
                    loss, m = lm_loss_sum(manual, ids, mask)
                    total, count = total + float(loss), count + m
                down.weight.copy_(original)
        assert fit.candidates[f"{lam:g}"] == pytest.approx(total / count, rel=1e-6)
    assert fit.heldout_loss_after == min(fit.candidates.values()) < fit.heldout_loss_before
    assert fit.candidates[f"{fit.ridge:g}"] == fit.heldout_loss_after
    adapter.fold_into_mlp_out_(layer, solve_ridge(G, C, fit.ridge, prior="identity"))
    torch.testing.assert_close(adapter.down_proj(adapter.layers(pruned)[1]).weight, down.weight, rtol=0, atol=1e-5)
    assert not torch.allclose(down.weight, original, atol=1e-3)  # the fold did change the layer
    for p in (0, 2, 3):  # the other layers are untouched
        assert torch.equal(adapter.down_proj(adapter.layers(pruned)[p]).weight,
                           adapter.down_proj(adapter.layers(manual)[p]).weight)


def test_folds_validation():
    dense, pruned, kept = _pruned()
    cal = random_calibration(nsamples=4)
    for bad in (1, 5, 0, 2.0, True):
        with pytest.raises(ValueError, match=r"folds: need an int with 2 <= folds <= nsamples=4, got"):
            compensate(dense, pruned, kept, cal, mode="every-gap", folds=bad)
    with pytest.raises(ValueError, match="at least 2 windows"):  # nsamples < 2 keeps its own error
        compensate(dense, pruned, kept, random_calibration(nsamples=1), mode="every-gap", folds=2)
    result = compensate(dense, pruned, kept, random_calibration(nsamples=3), mode="max-shift")  # default min(4, 3)
    assert len(result.fits) == 1 and result.fits[0].tokens == 3 * 15


def test_zeroed_down_proj_is_reported_once_and_left_unchanged():
    """A kept layer whose down_proj is zero (BlockPruner's removed MLP) has M = 0: one plain note, no ridge noise."""
    dense, pruned, kept = _pruned()
    down = get_adapter(pruned).down_proj(get_adapter(pruned).layers(pruned)[1])
    with torch.no_grad():
        down.weight.zero_()
    result = compensate(dense, pruned, kept, random_calibration(nsamples=4, seqlen=12), mode="every-gap")
    fit = result.fits[0]
    assert fit.layer == 1 and not fit.applied and fit.candidates == {"none": fit.heldout_loss_before}
    assert "down_proj output is zero" in fit.note
    assert [n for n in result.notes if "layer 1:" in n] == [f"layer 1: {fit.note}"]
    assert torch.count_nonzero(down.weight) == 0
