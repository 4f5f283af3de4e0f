"""Stage 2 on the engine: alignment, Gram statistics against a materialised least-squares solve, mean shifts by
hand, the cross-validation guard recomputed by hand on really folded models, modes and errors."""

import contextlib
import copy

import pytest
import torch

import gradmap.compensation.cross_validation as cv_mod
from conftest import random_calibration, tiny_model
from gradmap.adapters import get_adapter
from gradmap.compensation import (aligned_dense_layer, compensate, gap_positions, gram_statistics,
                                  mean_shifts)
from gradmap.compensation.cross_validation import RIDGE_LIMITS, VERIFY, reconstruction_error, search_ridges
from gradmap.compensation.trained import CHECKPOINTS, objective, train_projection
from gradmap.data import Calibration
from gradmap.engine import Engine, Windows
from gradmap.projection import solve_ridge
from gradmap.removal import remove_layers
from test_engine import model_nll


def test_alignment_hand_cases():
    kept = [0, 1, 3, 4, 7]  # of 9 dense layers: 2, 5, 6, 8 removed
    assert [aligned_dense_layer(kept, p, 9) for p in range(5)] == [0, 2, 3, 6, 8]
    assert gap_positions(kept, 9) == [1, 3, 4]
    assert gap_positions([2, 3, 4], 5) == []  # removal only at the start: nothing before it


@contextlib.contextmanager
def stage2(cal, drop=(2, 3), groups=4, micro_batch=2, family="llama", device="cpu"):
    """An engine on a tiny model (on ``device``), the calibration trajectory with the dense snapshot, layers ``drop``
    removed."""
    model = tiny_model(family).to(device)
    with Engine.for_module(model) as engine:
        traj = engine.trajectory(Windows.from_calibration(cal, micro_batch, groups))
        traj.forward()
        dense = traj.snapshot()
        for d in drop:
            engine.remove(d)
        yield model, engine, traj, dense


def pruned_copy(model, drop):
    out = copy.deepcopy(model)
    remove_layers(out, list(drop))
    return out


def capture_all(model, cal):
    """Every layer's output and every down_proj output of the model's own forward."""
    adapter = get_adapter(model)
    outs, downs, hs = {}, {}, []
    for i, layer in enumerate(adapter.layers(model)):
        hs.append(layer.register_forward_hook(lambda m, a, o, i=i: outs.__setitem__(i, o)))
        hs.append(adapter.down_proj(layer).register_forward_hook(lambda m, a, o, i=i: downs.__setitem__(i, o)))
    with torch.no_grad():
        model(input_ids=cal.input_ids, attention_mask=cal.attention_mask)
    for h in hs:
        h.remove()
    return outs, downs


@pytest.mark.parametrize("skip_first", [0, 1, 3])
def test_gram_statistics_equal_materialised_least_squares(skip_first):
    cal = random_calibration(nsamples=4, seqlen=12, pad_last=4)
    with stage2(cal, groups=2) as (model, engine, traj, dense):
        stats = gram_statistics(traj, dense, 1, skip_first=skip_first)  # kept 1 is followed by removed 2, 3
    G, C = stats.total()
    used = cal.attention_mask.clone()
    used[:, :skip_first] = 0  # the first positions of every window are context only
    real = used.bool().flatten()
    d_out, _ = capture_all(model, cal)
    p_out, p_down = capture_all(pruned_copy(model, (2, 3)), cal)
    M = p_down[1].flatten(0, 1)[real].double()
    X = p_out[1].flatten(0, 1)[real].double()
    Y = d_out[3].flatten(0, 1)[real].double()
    assert stats.tokens == int(real.sum())
    lam = 0.05
    alpha = lam * torch.diagonal(M.T @ M).mean()
    want = torch.linalg.solve(M.T @ M + alpha * torch.eye(M.shape[1], dtype=torch.float64), M.T @ (Y - X + M))
    torch.testing.assert_close(solve_ridge(G, C, lam), want, rtol=1e-6, atol=1e-8)
    # per-group statistics: group 0 = windows 0-1, group 1 = windows 2-3
    half = real.view(4, 12)[:2].flatten()
    M0 = p_down[1][:2].flatten(0, 1)[half].double()
    torch.testing.assert_close(stats.G[0], M0.T @ M0, rtol=1e-6, atol=1e-6)


def test_mean_shift_hand_computed():
    cal = random_calibration(nsamples=2, seqlen=10, pad_last=3)
    with stage2(cal, groups=2, micro_batch=1) as (model, engine, traj, dense):
        shifts, rel = mean_shifts(traj, dense)
        kept = list(engine.view.kept)
    real = cal.attention_mask.bool().flatten()
    d_out, _ = capture_all(model, cal)
    p_out, _ = capture_all(pruned_copy(model, (2, 3)), cal)
    for p, k in enumerate(kept):
        a = aligned_dense_layer(kept, p, 6)
        diff = (p_out[p] - d_out[a]).flatten(0, 1)[real].double().norm(dim=-1)
        assert shifts[p] == pytest.approx(diff.mean().item(), rel=1e-5)
        ref = d_out[a].flatten(0, 1)[real].double().norm(dim=-1)
        assert rel[p] == pytest.approx((diff / ref).mean().item(), rel=1e-5)
    assert shifts[0] == pytest.approx(0.0, abs=1e-5)  # layer 0 precedes the removal: no drift yet


@pytest.mark.parametrize("mode", ["max-shift", "every-gap"])
def test_compensate_lowers_cv_loss_and_keeps_dense(mode):
    cal = random_calibration(nsamples=8, seqlen=16, seed=3)
    with stage2(cal, drop=(1, 4)) as (model, engine, traj, dense):  # kept 0, 2, 3, 5: gaps after 0 and 3
        state = {k: v.clone() for k, v in model.state_dict().items()}
        total, count = traj.loss()
        result = compensate(traj, dense, mode=mode)
    assert set(result.shifts) == {0, 2, 3, 5}
    expected_layers = [0, 3] if mode == "every-gap" else [max(result.shifts, key=result.shifts.get)]
    assert [f.layer for f in result.fits] == expected_layers
    assert result.fits[0].loss_before == pytest.approx(total / count, rel=1e-6)
    for f in result.fits:
        assert f.loss_after <= f.loss_before
        assert f.candidates["none"] == f.loss_before
        assert len(f.candidates) <= 1 + VERIFY
        # the verified ridges are the best by cross-validated reconstruction error, and that best is not at an end of
        # the searched range unless the range hit its limit
        errors = {float(k): v for k, v in f.reconstruction.items() if k != "none"}
        best = min(errors, key=errors.get)
        assert best in {float(k) for k in f.candidates if k != "none"}
        assert min(errors) < best < max(errors) or best in RIDGE_LIMITS
        if f.applied:
            assert f.loss_after == min(v for v in f.candidates.values() if v == v)
            assert f.tokens == 8 * 15  # SKIP_FIRST = 1 position of each window left out of the fit
    if mode == "every-gap":
        assert any(f.applied for f in result.fits)
    assert result.passes > 0
    for k, v in model.state_dict().items():  # folds are overrides: the dense model is untouched
        assert torch.equal(v, state[k])


def test_harmful_fold_is_skipped(monkeypatch):
    """A projection that raises the cross-validated loss is not applied; the layer is unchanged, the report says so."""
    cal = random_calibration(nsamples=4, seqlen=12)
    monkeypatch.setattr(cv_mod, "solve_ridge", lambda G, C, lam, **kw: -5.0 * torch.eye(G.shape[0], dtype=G.dtype))
    with stage2(cal, groups=2) as (model, engine, traj, dense):
        result = compensate(traj, dense, mode="every-gap")
        assert engine.view.overrides == {}
    assert all(not f.applied for f in result.fits) and result.fits
    for f in result.fits:
        assert f.ridge is None and f.loss_after == f.loss_before
        assert all(v > f.candidates["none"] for k, v in f.candidates.items() if k != "none")
    assert any("fold skipped" in n for n in result.notes)


def test_mode_none_and_errors():
    with stage2(random_calibration(), groups=1) as (model, engine, traj, dense):
        assert compensate(traj, dense, mode="none").fits == []
        with pytest.raises(ValueError, match="compensate: 'all' is not one of none, max-shift, every-gap, trained"):
            compensate(traj, dense, mode="all")
        with pytest.raises(ValueError, match="at least 2 cross-validation groups"):
            compensate(traj, dense, mode="every-gap")
        with pytest.raises(ValueError, match="ridge: must be a finite number >= 0"):
            compensate(traj, dense, mode="every-gap", ridge=-1.0)


def test_group_statistics_sum_to_the_single_group_statistics():
    cal = random_calibration(nsamples=6, seqlen=12, seed=2, pad_last=4)
    with stage2(cal, groups=3) as (model, engine, traj, dense):
        three = gram_statistics(traj, dense, 1)
    with stage2(cal, groups=1) as (model, engine, traj, dense):
        one = gram_statistics(traj, dense, 1)
    assert len(three.G) == 3 and len(one.G) == 1 and three.tokens == one.tokens == cal.num_tokens - cal.nsamples
    assert all(g.dtype == torch.float64 for g in three.G + three.C)
    G3, C3 = three.total()
    torch.testing.assert_close(G3, one.G[0], rtol=1e-10, atol=1e-10 * float(G3.abs().max()))
    torch.testing.assert_close(C3, one.C[0], rtol=1e-10, atol=1e-10 * float(C3.abs().max()))


def test_cv_losses_reconstruction_errors_and_final_fold_by_hand():
    """Each verified ridge's CV loss is the sum over groups of the loss of the group-k fit on group k, recomputed on a
    really folded copy of the pruned model; each searched ridge's reconstruction error is the held-out
    ‖M_k T_k − (Y_k − X_k + M_k)‖² of materialised activations; the applied T is solve_ridge(G, C, λ, identity)."""
    cal = random_calibration(nsamples=8, seqlen=16, seed=5, pad_last=3)
    with stage2(cal) as (model, engine, traj, dense):  # layers 2, 3 removed: one gap, after kept position 1
        stats = gram_statistics(traj, dense, 1)
        result = compensate(traj, dense, mode="every-gap")
        applied = engine.view.overrides[1]["mlp.down_proj.weight"] if engine.view.overrides else None
    (fit,) = result.fits
    assert fit.tokens == cal.num_tokens - cal.nsamples
    manual = pruned_copy(model, (2, 3))
    adapter = get_adapter(manual)
    layer = adapter.layers(manual)[1]
    down = adapter.down_proj(layer)
    original = down.weight.detach().clone()
    G, C = stats.total()
    # materialised activations per group: M (down_proj output), X (layer output), Y (dense state after layer 3)
    d_out, _ = capture_all(model, cal)
    p_out, p_down = capture_all(manual, cal)
    used = cal.attention_mask.clone()
    used[:, :1] = 0
    for lam_key, error in fit.reconstruction.items():
        if lam_key == "none":
            continue
        lam, want = float(lam_key), 0.0
        for k in range(4):
            rows = slice(2 * k, 2 * k + 2)
            real = used[rows].bool().flatten()
            M = p_down[1][rows].flatten(0, 1)[real].double()
            Z = (d_out[3][rows] - p_out[1][rows]).flatten(0, 1)[real].double() + M
            T = solve_ridge(G - stats.G[k], C - stats.C[k], lam, prior="identity")
            want += float((M @ T - Z).square().sum())
        assert error == pytest.approx(want, rel=1e-6, abs=1e-9), lam_key
    for lam_key in [k for k in fit.candidates if k != "none"]:
        lam, total, count = float(lam_key), 0.0, 0
        for k in range(4):
            adapter.fold_into_mlp_out_(layer, solve_ridge(G - stats.G[k], C - stats.C[k], lam, prior="identity"))
            part = Calibration(cal.input_ids[2 * k:2 * k + 2], cal.attention_mask[2 * k:2 * k + 2])
            t, c = model_nll(manual, part)
            total, count = total + t, count + c
            with torch.no_grad():
                down.weight.copy_(original)
        assert fit.candidates[lam_key] == pytest.approx(total / count, rel=1e-5)
    assert fit.loss_after == min(fit.candidates.values())
    if fit.applied:
        assert fit.candidates[f"{fit.ridge:g}"] == fit.loss_after < fit.loss_before
        adapter.fold_into_mlp_out_(layer, solve_ridge(G, C, fit.ridge, prior="identity"))
        torch.testing.assert_close(applied, down.weight, rtol=0, atol=1e-5)
        assert not torch.allclose(down.weight, original, atol=1e-3)  # the fold did change the layer
    else:
        assert applied is None and fit.loss_after == fit.loss_before


def test_ridge_search_extends_past_a_best_end():
    """A quadratic reconstruction error whose minimum lies beyond the grid's top end: the search extends upward."""
    cal = random_calibration(nsamples=8, seqlen=16, seed=5)
    with stage2(cal) as (model, engine, traj, dense):
        stats = gram_statistics(traj, dense, 1)
    errors, _ = search_ridges(stats, ridges=(1e-4, 1e-3))
    best = min(errors, key=errors.get)
    assert max(errors) > 1e-3  # the grid grew past its top end ...
    assert best < max(errors) or best == RIDGE_LIMITS[1]  # ... until the best is interior (or the limit is hit)
    assert errors[best] == pytest.approx(reconstruction_error(stats, best))


def test_zeroed_down_proj_is_reported_once_and_left_unchanged():
    """A kept layer whose down_proj is zero (BlockPruner's removed MLP) has M = 0: one plain note, no ridge noise."""
    cal = random_calibration(nsamples=4, seqlen=12)
    with stage2(cal, groups=2) as (model, engine, traj, dense):
        engine.set_overrides(1, {"mlp.down_proj.weight": torch.zeros(32, 64)})
        result = compensate(traj, dense, mode="every-gap")
        assert torch.count_nonzero(engine.view.overrides[1]["mlp.down_proj.weight"]) == 0
    fit = result.fits[0]
    assert fit.layer == 1 and not fit.applied and fit.candidates == {"none": fit.loss_before}
    assert "down_proj output is zero" in fit.note
    assert [n for n in result.notes if "layer 1:" in n] == [f"layer 1: {fit.note}"]


def test_sandwich_norm_family_compensates_through_the_engine():
    cal = random_calibration(nsamples=8, seqlen=16, seed=7)
    with stage2(cal, family="gemma3_text") as (model, engine, traj, dense):
        result = compensate(traj, dense, mode="every-gap")
        for f in result.fits:
            assert f.loss_after <= f.loss_before
            if f.applied:  # the CV loss of the chosen fold is what the folded model really gives on the groups
                assert f.loss_after < f.loss_before


def test_trained_projection_first_adam_step_and_convergence_to_the_closed_form():
    """Adam's first step from T = I moves every entry by lr·g/(|g| + ε) (≈ lr against the sign) of the exact gradient
    g = 2((G+αI)T − C − αI)/N (arXiv 1412.6980, Algorithm 1: m̂ = g, v̂ = g²); many small steps reach the ridge minimiser of the same
    objective, solve_ridge(G, C, λ, prior="identity") (the closed form is the oracle)."""
    gen = torch.Generator().manual_seed(0)
    M = torch.randn(300, 6, dtype=torch.float64, generator=gen) * 3.0
    Z = M @ (torch.eye(6, dtype=torch.float64) + 0.2 * torch.randn(6, 6, dtype=torch.float64, generator=gen))
    Z += 0.05 * torch.randn(300, 6, dtype=torch.float64, generator=gen)
    G, C = M.T @ M, M.T @ Z
    lam = 0.05
    alpha = lam * float(torch.diagonal(G).mean())
    eye = torch.eye(6, dtype=torch.float64)
    grad = 2 * ((G + alpha * eye) @ eye - C - alpha * eye) / 300
    first = train_projection(G, C, 300, steps=1, lr=0.01, ridge=lam)[1]
    torch.testing.assert_close(first, eye - 0.01 * grad / (grad.abs() + 1e-8), rtol=0, atol=1e-12)
    assert float((first - eye).abs().max()) == pytest.approx(0.01, rel=1e-5)  # ≈ lr · sign(gradient)
    out = train_projection(G, C, 300, steps=4000, lr=2e-3, ridge=lam, checkpoints=(10, 100))
    assert set(out) == {10, 100, 4000}
    closed = solve_ridge(G, C, lam, prior="identity")
    torch.testing.assert_close(out[4000], closed, rtol=0, atol=5e-3)
    z = float(Z.square().sum())
    # the objective falls along the way and ends at the closed form's value
    values = [objective(G, C, z, 300, out[k], lam) for k in (10, 100, 4000)]
    assert values[0] > values[1] > values[2]
    assert values[2] == pytest.approx(objective(G, C, z, 300, closed, lam), rel=1e-4)
    assert objective(G, C, z, 300, closed, lam) == pytest.approx(
        (float((M @ closed - Z).square().sum()) + alpha * float((closed - eye).square().sum())) / 300, rel=1e-10)


def test_trained_projection_rejects_bad_input():
    G = torch.eye(3, dtype=torch.float64)
    with pytest.raises(ValueError, match="tokens: must be > 0"):
        train_projection(G, G, 0)
    with pytest.raises(ValueError, match="steps: must be an integer >= 1"):
        train_projection(G, G, 5, steps=0)
    with pytest.raises(ValueError, match="G, C: need two"):
        train_projection(G, torch.eye(2, dtype=torch.float64), 5)
    with pytest.raises(ValueError, match="checkpoints"):
        train_projection(G, G, 5, steps=10, checkpoints=(20,))
    with pytest.raises(ValueError, match="NaN/inf"):
        train_projection(G * float("nan"), G, 5)


def test_compensate_trained_is_the_max_shift_layer_with_an_adam_fit():
    """Mode ``trained``: the fold sits at the kept layer of largest mean shift, its step count is a checkpoint chosen
    by cross-validation, its CV loss beats "no fold", and the applied down_proj is the fold of train_projection on
    all windows' statistics, recomputed here on a materialised copy."""
    cal = random_calibration(nsamples=8, seqlen=16, seed=5)
    with stage2(cal, drop=(1, 4)) as (model, engine, traj, dense):
        shifts, _ = mean_shifts(traj, dense)
        position = max(range(4), key=lambda p: shifts[p])
        stats = gram_statistics(traj, dense, position)  # what the fit sees (no fold applied before it)
        result = compensate(traj, dense, mode="trained")
        (fit,) = result.fits
        overrides = engine.view.overrides.get(fit.layer)
    assert fit.layer == [0, 2, 3, 5][position]
    assert result.mode == "trained" and result.fit == "trained"
    assert fit.layer == max(result.shifts, key=result.shifts.get)
    assert set(fit.reconstruction) == {"none"} | {f"{c} steps" for c in CHECKPOINTS}
    assert fit.loss_after <= fit.loss_before
    if fit.applied:
        assert fit.steps in CHECKPOINTS and fit.candidates[f"{fit.steps} steps"] == fit.loss_after < fit.loss_before
        G, C = stats.total()
        T = train_projection(G, C, stats.tokens, steps=fit.steps)[fit.steps]
        manual = pruned_copy(model, (1, 4))
        adapter = get_adapter(manual)
        layer = adapter.layers(manual)[position]
        adapter.fold_into_mlp_out_(layer, T)
        torch.testing.assert_close(overrides["mlp.down_proj.weight"], adapter.down_proj(layer).weight, rtol=0,
                                   atol=1e-5)
    else:
        assert overrides is None and fit.steps is None


def test_trained_fit_errors():
    with stage2(random_calibration(), groups=2) as (model, engine, traj, dense):
        with pytest.raises(ValueError, match="ridge: applies to the closed-form fit"):
            compensate(traj, dense, mode="trained", ridge=0.1)
        with pytest.raises(ValueError, match="fit: 'adam' is not one of ridge, trained"):
            compensate(traj, dense, mode="every-gap", fit="adam")
        with pytest.raises(ValueError, match="fit: ReplaceMe is its own"):
            compensate(traj, dense, mode="replaceme", fit="trained")


def test_trained_fit_applies_at_every_gap():
    """fit="trained" with every-gap trains a projection at EACH gap (a regression test: the loop once rebound the
    ``fit`` argument to the first gap's LayerFit, so later gaps fell back to the closed form)."""
    cal = random_calibration(nsamples=8, seqlen=16, seed=5)
    with stage2(cal, drop=(1, 4)) as (model, engine, traj, dense):
        result = compensate(traj, dense, mode="every-gap", fit="trained")
    assert [f.layer for f in result.fits] == [0, 3]
    for f in result.fits:
        assert set(f.reconstruction) == {"none"} | {f"{c} steps" for c in CHECKPOINTS}, f.layer
        assert (f.steps in CHECKPOINTS) == f.applied
