"""Baseline selection methods, ReplaceMe compensation and the fidelity statistics on tiny models, against
hand-computed cases: identity layers (o_proj and down_proj zeroed, so the layer's output equals its input)."""

import contextlib
import copy
import json
import math
import os

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from conftest import COMMON, SAMPLE_TEXT, random_calibration, tiny_model
from gradmap import prune
from gradmap.checkpoint import save_view
from gradmap.cli import build_parser, main
from gradmap.compensation.replaceme import replaceme_compensate
from gradmap.data import Calibration
from gradmap.engine import Engine, Windows
from gradmap.methods import select_layers
from gradmap.methods.blockpruner import RemovedSubBlock, select_blockpruner
from gradmap.methods.fidelity import oracle_loss_increase, spearman, spearman_fallback
from gradmap.methods.gradmap import default_verify_top, default_verify_windows, verify_subset
from gradmap.methods.gromov import angular_distances, select_gromov
from gradmap.methods.ppl import leave_one_out_losses, select_ppl, select_sleb
from gradmap.methods.shortgpt import block_influence
from gradmap.methods.taylor_plus import select_taylor_plus
from gradmap.names import METHODS
from gradmap.removal import materialize_pruned, remove_layers
from test_engine import model_nll


@contextlib.contextmanager
def session(model, cal, micro_batch=8, groups=1):
    """An engine over ``model`` and the calibration trajectory through its live view."""
    with Engine.for_module(model) as engine:
        yield engine, engine.trajectory(Windows.from_calibration(cal, micro_batch, groups))


def pruned_of(engine):
    return materialize_pruned(engine.weights, engine.view)


def make_identity(model, *layers):
    """Zero o_proj and down_proj of ``layers``: each then adds exactly 0 to the residual stream."""
    with torch.no_grad():
        for i in layers:
            model.model.layers[i].self_attn.o_proj.weight.zero_()
            model.model.layers[i].mlp.down_proj.weight.zero_()
    return model


def constructed(family="llama", identity=3):
    """A tiny model with one identity layer and a calibration set on which every other layer matters: the LM head is
    scaled up (peaked predictions) and the windows are the model's own greedy continuations, so leaving out any real
    layer raises the NLL (checked in the tests) while leaving out the identity layer changes nothing."""
    model = make_identity(tiny_model(family), identity)
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)
    prefix = torch.randint(3, 96, (4, 2), generator=torch.Generator().manual_seed(1))
    out = model.generate(prefix, attention_mask=torch.ones_like(prefix), max_new_tokens=14, do_sample=False,
                         pad_token_id=0)
    return model, Calibration(out, torch.ones_like(out), {"source": "greedy", "nsamples": 4, "seqlen": 16})


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def test_block_influence_of_identity_layer_is_zero():
    model = make_identity(tiny_model("llama"), 2)
    with session(model, random_calibration(4, 16, pad_last=5)) as (engine, traj):
        scores, _ = block_influence(traj)
    assert abs(float(scores[2])) < 1e-6
    assert all(float(scores[i]) > 1e-3 for i in range(6) if i != 2)
    with session(model, random_calibration(4, 16)) as (engine, traj):
        sel = select_layers(traj, 1, method="shortgpt")
        assert sel.removed == [2] and engine.view.kept == [0, 1, 3, 4, 5]
    # one forward of the six decoder layers over 64 positions, no LM head (which a full pass runs on 60 targets)
    per_layer = sum(p.numel() for p in model.model.layers[0].parameters())
    assert sel.passes == pytest.approx(6 * per_layer * 64 / (6 * per_layer * 64 + 96 * 32 * 60), rel=1e-6)
    assert len(model.model.layers) == 6  # the dense model is never modified


def test_angular_distance_in_unit_interval_and_zero_for_identity_block():
    model = make_identity(tiny_model("llama"), 2, 3)
    cal = random_calibration(4, 16, pad_last=5)
    with session(model, cal) as (engine, traj):
        dist, _ = angular_distances(traj, [1, 2, 6])
    for d in dist.values():
        assert bool(((d >= 0) & (d <= 1)).all())
    assert float(dist[2][2]) < 1e-6 and float(dist[1][2]) < 1e-6 and float(dist[1][3]) < 1e-6
    assert dist[6].shape == (1,) and float(dist[6][0]) > 1e-3
    # hand computation for the block (0, 1): last real token of each window, arccos(cos)/pi, mean over windows
    states = {}
    hooks = [model.model.layers[0].register_forward_hook(
        lambda m, a, k, o: states.update(h0=(a[0] if a else k["hidden_states"]), h1=o), with_kwargs=True)]
    with torch.no_grad():
        model(input_ids=cal.input_ids, attention_mask=cal.attention_mask, use_cache=False)
    hooks[0].remove()
    last = cal.attention_mask.sum(1) - 1
    rows = torch.arange(4)
    cos = torch.nn.functional.cosine_similarity(states["h0"][rows, last].double(), states["h1"][rows, last].double(), -1)
    torch.testing.assert_close(dist[1][0], (torch.arccos(cos) / math.pi).mean(), rtol=0, atol=1e-12)
    with session(model, cal) as (engine, traj):
        sel = select_gromov(traj, 2)
    assert sel.removed == [2, 3] and sel.extra["block_start"] == 2 and sorted(sel.layer_scores) == list(range(6))


def test_gromov_skips_blocks_with_protected_layers():
    model = make_identity(tiny_model("llama"), 2, 3)
    with session(model, random_calibration(4, 16)) as (engine, traj):
        sel = select_gromov(traj, 2, protected=[3])
    assert 3 not in sel.removed and len(sel.removed) == 2 and sel.removed[1] == sel.removed[0] + 1


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_sleb_removes_the_layer_that_leaves_the_loss_unchanged(family):
    model, cal = constructed(family, identity=3)
    total, count = model_nll(model, cal)
    dense = total / count
    with session(model, cal) as (engine, traj):
        losses = leave_one_out_losses(traj)
        assert losses[3] == pytest.approx(dense, abs=1e-6)
        assert all(losses[i] > dense + 0.1 for i in range(6) if i != 3)  # the construction works
        sel = select_sleb(traj, 2)
        pruned = pruned_of(engine)
    assert sel.removed[0] == 3 and sel.steps[0].scores[3] == pytest.approx(dense, abs=1e-6)
    # resumed forwards: fewer than the 6 + 5 full passes of the published algorithm, more than one per decision
    assert 2 < sel.passes < 6 + 5 and len(sel.steps[1].scores) == 5 and len(pruned.model.layers) == 4
    assert [l.self_attn.layer_idx for l in pruned.model.layers] == [0, 1, 2, 3]


def test_ppl_method_scores_are_exp_of_the_removed_model_loss():
    model = tiny_model("llama")
    cal = random_calibration(4, 16, pad_last=3)
    with session(model, cal) as (engine, traj):
        sel = select_ppl(traj, 2)
        assert 1 < sel.passes < 6 and len(engine.view.kept) == 4
    for layer in (0, 4):
        ref = copy.deepcopy(model)
        remove_layers(ref, [layer])
        total, count = model_nll(ref, cal)
        assert sel.steps[0].scores[layer] == pytest.approx(math.exp(total / count), rel=1e-5)
    lowest = sorted(sel.steps[0].scores, key=sel.steps[0].scores.get)[:2]
    assert sel.removed == lowest


def test_taylor_plus_never_removes_first_four_or_last_two():
    model = make_identity(ten_layers(), 0, 1, 9, 5)
    cal = random_calibration(4, 16)
    with session(model, cal) as (engine, traj):
        plain = select_layers(traj, 3, method="gradmap", metric="taylor")
    assert {0, 1, 9} & set(plain.removed)  # plain Taylor would remove the identity layers at the ends
    with session(model, cal) as (engine, traj):
        sel = select_taylor_plus(traj, 3)
    assert sel.steps[0].scores[0] == 0.0 and sel.steps[0].scores[9] == 0.0
    # one forward and one backward (counted 2) of every layer and of the LM head, the graph kept (resident)
    assert not set(sel.removed) & {0, 1, 2, 3, 8, 9} and 5 in sel.removed and sel.passes == pytest.approx(3)
    assert sel.extra["protected"] == [0, 1, 2, 3, 8, 9]


def test_blockpruner_zeroed_sub_blocks_match_after_save_reload(tmp_path):
    model, cal = constructed("llama", identity=3)
    dense = copy.deepcopy(model)
    n_params = sum(p.numel() for p in dense.parameters())
    with session(model, cal) as (engine, traj):
        sel = select_blockpruner(traj, 2)
        pruned = pruned_of(engine)
        out = save_view(engine.weights, engine.view, None, tmp_path / "bp")
    order = sel.extra["sub_block_order"]
    assert set(order[:2]) == {"3.attn", "3.mlp"} and sel.removed[0] == 3  # identity layer first, then dropped
    assert sel.extra["removed_params"] + sel.extra["zeroed_params"] >= sel.extra["target_params"]
    assert 0 < sel.passes < sum(len(s.scores) for s in sel.steps) and len(sel.steps[0].scores) == 12
    # the search-time representation (sub-blocks replaced by zeros) gives the same logits as the materialised model
    search = copy.deepcopy(dense)
    for label in order:
        layer, kind = label.split(".")
        setattr(search.model.layers[int(layer)], "self_attn" if kind == "attn" else "mlp", RemovedSubBlock(kind))
    ids = random_calibration(2, 12, seed=3).input_ids
    want = logits(search, ids)
    torch.testing.assert_close(logits(pruned, ids), want, rtol=0, atol=1e-5)
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    torch.testing.assert_close(logits(reloaded, ids), want, rtol=0, atol=1e-5)
    assert sum(p.numel() for p in reloaded.parameters()) == n_params - sel.extra["removed_params"]
    for label in sel.extra["zeroed_sub_blocks"]:
        layer, kind = label.split(".")
        pos = [i for i in range(6) if i not in sel.removed].index(int(layer))
        proj = reloaded.model.layers[pos].self_attn.o_proj if kind == "attn" else reloaded.model.layers[pos].mlp.down_proj
        assert not proj.weight.any()


def test_blockpruner_target_below_a_layer_says_so():
    model = tiny_model("llama")
    with session(model, random_calibration(4, 16)) as (engine, traj):
        sel = select_blockpruner(traj, 1)
    if not sel.removed:
        assert "removed NO whole decoder layer" in sel.extra["note"] and sel.extra["zeroed_sub_blocks"]
    else:
        assert "note" not in sel.extra


def test_replaceme_transform_equals_closed_form():
    dense = tiny_model("llama")
    cal = random_calibration(8, 16)
    pruned = copy.deepcopy(dense)
    remove_layers(pruned, [3, 4])
    w_before = pruned.model.layers[2].mlp.down_proj.weight.detach().clone()
    # hand computation: M = down_proj output of layer 2, X = layer 2 output, Y = dense input of layer 5
    got = {}
    h = [pruned.model.layers[2].mlp.down_proj.register_forward_hook(lambda m, a, o: got.__setitem__("M", o)),
         pruned.model.layers[2].register_forward_hook(lambda m, a, o: got.__setitem__("X", o)),
         dense.model.layers[5].register_forward_pre_hook(lambda m, a, k: got.__setitem__("Y", a[0] if a else k["hidden_states"]),
                                                         with_kwargs=True)]
    with torch.no_grad():
        pruned(input_ids=cal.input_ids, use_cache=False)
        dense(input_ids=cal.input_ids, use_cache=False)
    for x in h:
        x.remove()
    M, X, Y = (got[k].flatten(0, 1).double() for k in "MXY")
    G = M.T @ M
    alpha = 0.01 * float(torch.diagonal(G).mean())
    T = torch.linalg.solve(G + alpha * torch.eye(32, dtype=torch.float64), M.T @ (Y - X + M))
    with session(dense, cal) as (engine, traj):
        traj.forward()
        snapshot = traj.snapshot()
        engine.remove(3)
        engine.remove(4)
        result = replaceme_compensate(traj, snapshot, ridge=0.01)
        folded = engine.view.overrides[2]["mlp.down_proj.weight"]
    assert [f.layer for f in result.fits] == [2] and result.fits[0].tokens == 128
    want = (T.T @ w_before.double()).float()
    torch.testing.assert_close(folded, want, rtol=1e-5, atol=1e-6)


def test_spearman_with_ties_matches_hand_ranks():
    x = [1.0, 2.0, 2.0, 5.0]
    y = [10.0, 30.0, 20.0, 40.0]
    # ranks x: 1, 2.5, 2.5, 4; y: 1, 3, 2, 4 -> centred dot 4.5 / sqrt(4.5 * 5)
    assert spearman_fallback(x, y) == pytest.approx(4.5 / math.sqrt(4.5 * 5.0), abs=1e-12)
    assert spearman(dict(enumerate(x)), dict(enumerate(y))) == pytest.approx(4.5 / math.sqrt(22.5), abs=1e-12)
    assert spearman({0: 1, 1: 2, 2: 3}, {0: 3, 1: 2, 2: 1}) == pytest.approx(-1.0)
    with pytest.raises(ValueError, match="scores"):
        spearman({0: 1, 1: 2}, {0: 1, 1: 2})


def test_oracle_increase_is_zero_for_identity_layer():
    model = make_identity(tiny_model("llama"), 4)
    with session(model, random_calibration(4, 16)) as (engine, traj):
        result = oracle_loss_increase(traj)
    assert 2 < result["passes"] < 7 and result["increase"][4] == pytest.approx(0.0, abs=1e-6)
    assert sorted(result["increase"]) == list(range(6))


def ten_layers():
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(LlamaConfig(**dict(COMMON, num_hidden_layers=10))).eval()


@pytest.mark.parametrize("method", METHODS)
def test_prune_every_method_with_stage2(method, tmp_path):
    model = ten_layers()
    cal = random_calibration(8, 16)
    result = prune(model, cal, num_layers=1, method=method, compensate_mode="every-gap", ridge=0.1)
    report = result.report()
    assert report["method"] == method and report["settings"]["method"] == method
    assert report["selection"]["forward_equivalent_passes"] == result.selection.passes > 0
    assert len(model.model.layers) == 10  # caller untouched
    if method != "blockpruner":
        assert len(result.removed) == 1 and result.model.config.num_hidden_layers == 9
    result.save(tmp_path / method)


def test_taylor_plus_too_few_layers_named_error():
    with pytest.raises(ValueError, match="taylor-plus keeps the first 4 and last 2 of the 6 layers"):
        prune(tiny_model("llama"), random_calibration(4, 16), num_layers=1, method="taylor-plus")


def test_prune_replaceme_compensation_and_bad_method():
    model = tiny_model("llama")
    cal = random_calibration(8, 16)
    result = prune(model, cal, num_layers=2, method="gromov", compensate_mode="replaceme")
    assert result.compensation.mode == "replaceme" and result.report()["compensation"]["mode"] == "replaceme"
    assert [f.layer for f in result.compensation.fits] == [result.removed[0] - 1] or result.removed[0] == 0
    with pytest.raises(ValueError, match="method: 'magic' is not one of gradmap, shortgpt"):
        prune(model, cal, num_layers=1, method="magic")
    with pytest.raises(ValueError, match="compensate: 'x' is not one of none, max-shift, every-gap, trained, replaceme"):
        prune(model, cal, num_layers=1, compensate_mode="x")
    args = build_parser().parse_args(["prune", "--ratio", "0.25", "--method", "sleb", "--compensate", "replaceme",
                                      "--output", "x"])
    assert args.method == "sleb" and args.compensate == "replaceme"


def test_cli_prune_with_a_baseline(tmp_path, tiny_tokenizer, capsys):
    path = tmp_path / "tiny"
    model = make_identity(tiny_model("llama"), 2)
    model.save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    text = tmp_path / "calib.txt"
    text.write_text(SAMPLE_TEXT, encoding="utf-8")
    out = tmp_path / "pruned"
    assert main(["prune", "--model", str(path), "--num-layers", "1", "--method", "shortgpt", "--compensate", "none",
                 "--text", str(text), "--nsamples", "4", "--seqlen", "16", "--no-eval", "--output", str(out),
                 "-q"]) == 0
    assert "method shortgpt: removed layers (original indices): [2]" in capsys.readouterr().out
    # the checkpoint is readable by others (safetensors' mkstemp files were 0600)
    umask = os.umask(0)
    os.umask(umask)
    assert oct((out / "model.safetensors").stat().st_mode & 0o777) == oct(0o666 & ~umask)
    # options that a baseline would silently ignore are refused before any work
    for extra, message in ((["--metric", "taylor"], "--metric: applies to --method gradmap only"),
                           (["--backend", "fused"], "--backend: applies to the gradient methods"),
                           (["--verify-top", "3"], "--verify-top: applies to --method gradmap only"),
                           (["--method", "gradmap", "--verify-top", "-1"], "--verify-top: must be >= 0")):
        assert main(["prune", "--model", str(path), "--num-layers", "1", "--method", "sleb", "--text", str(text),
                     "--output", str(tmp_path / "x"), *extra]) == 2
        assert message in capsys.readouterr().err
    report = json.loads((out / "gradmap_report.json").read_text())
    assert report["method"] == "shortgpt" and report["removed_layers"] == [2]
    assert 0.5 < report["selection"]["forward_equivalent_passes"] <= 1
    with pytest.raises(SystemExit):  # argparse refuses an unknown --method (exit status 2)
        main(["prune", "--model", str(path), "--num-layers", "1", "--method", "nope", "--output", str(tmp_path / "x")])


def test_gradmap_verify_top_picks_the_lowest_loss_of_the_shortlist():
    model, cal = constructed("llama", identity=3)
    with session(model, cal) as (engine, traj):
        plain = select_layers(traj, 1, method="gradmap")
    shortlist = sorted(plain.steps[0].scores, key=plain.steps[0].scores.get)[:3]
    assert 3 in shortlist  # the metric ranks the identity layer among its three least important
    with session(model, cal) as (engine, traj):
        sel = select_layers(traj, 1, method="gradmap", verify_top=3)
    verified = {int(k): v for k, v in sel.extra["verified"][0].items()}
    assert sorted(verified) == sorted(shortlist)
    for layer, nll in verified.items():
        ref = copy.deepcopy(model)
        remove_layers(ref, [layer])
        total, count = model_nll(ref, cal)
        assert nll == pytest.approx(total / count, rel=1e-6)
    assert sel.removed == [3] and verified[3] == min(verified.values())
    total, count = model_nll(model, cal)
    assert verified[3] == pytest.approx(total / count, abs=1e-6)
    # the gradient step (forward, recomputed forward, backward: < 4 passes) + three resumed forwards (< 1 each)
    assert 3 < sel.passes < 4 + 3
    with session(model, cal) as (engine, traj), pytest.raises(ValueError, match="verify_top"):
        select_layers(traj, 1, method="gradmap", verify_top=-1)


def test_verify_on_a_window_subset_and_margin():
    """verify_windows: the shortlist's NLL is the model's own NLL on the chosen windows only (micro-batches of 1
    window: windows 0 and 2 of 4 for verify_windows=2); verify_margin=0 leaves no runner-up within the margin, so
    no check runs and the plain metric's choice stands."""
    model, cal = constructed("llama", identity=3)
    with session(model, cal, micro_batch=1) as (engine, traj):
        sel = select_layers(traj, 1, method="gradmap", verify_top=3, verify_windows=2)
    verified = {int(k): v for k, v in sel.extra["verified"][0].items()}
    assert len(verified) == 3
    sub = Calibration(cal.input_ids[[0, 2]], cal.attention_mask[[0, 2]], dict(cal.spec, nsamples=2))
    for layer, nll in verified.items():
        ref = copy.deepcopy(model)
        remove_layers(ref, [layer])
        total, count = model_nll(ref, sub)
        assert nll == pytest.approx(total / count, rel=1e-6)
    with session(model, cal, micro_batch=1) as (engine, traj):
        plain = select_layers(traj, 2, method="gradmap")
    with session(model, cal, micro_batch=1) as (engine, traj):
        sel = select_layers(traj, 2, method="gradmap", verify_top=3, verify_margin=0.0)
    assert sel.removed == plain.removed and sel.extra["verified"] == [{}, {}]
    assert sel.passes == pytest.approx(plain.passes)
    with session(model, cal) as (engine, traj), pytest.raises(ValueError, match="verify_windows"):
        select_layers(traj, 1, method="gradmap", verify_top=3, verify_windows=0)
    with session(model, cal) as (engine, traj), pytest.raises(ValueError, match="verify_margin"):
        select_layers(traj, 1, method="gradmap", verify_top=3, verify_margin=-0.5)


def test_verify_subset_by_hand():
    """verify_subset: ceil(count / micro_batch) micro-batches spread evenly, the first ceil(count / b) windows of
    each (32 windows in micro-batches of 8: B = 4)."""
    cal = random_calibration(32, 8)
    windows = Windows.from_calibration(cal, 8)
    assert verify_subset(windows, 4) == (frozenset({0}), slice(0, 4))
    assert verify_subset(windows, 8) == (frozenset({0}), None)  # a whole micro-batch, as before rows existed
    assert verify_subset(windows, 12) == (frozenset({0, 2}), slice(0, 6))
    assert verify_subset(windows, 16) == (frozenset({0, 2}), None)
    assert verify_subset(windows, 24) == (frozenset({0, 1, 2}), None)
    assert verify_subset(windows, 32) == (None, None)
    assert verify_subset(windows, None) == (None, None)
    # 10 windows in micro-batches of 4 (4, 4, 2): 5 windows -> 2 micro-batches (0 and 1), 3 windows of each
    assert verify_subset(Windows.from_calibration(random_calibration(10, 8), 4), 5) == (frozenset({0, 1}), slice(0, 3))
    with pytest.raises(ValueError, match="verify_windows: must be a positive"):
        verify_subset(windows, 0)


def test_verify_extend_checks_on_while_the_best_is_the_last(monkeypatch):
    """verify_extend: the metric's ranking is replaced by a known order (worst layer first, then a real layer with a
    lower NLL, then the identity layer 3, then the rest); with verify_top=2 the first pair's best is its last, so the
    next two are checked, where the identity layer wins inside the range and the check stops: 4 layers checked, layer
    3 removed. Without the extension: only the first pair, and its better one removed. NLLs of the oracle: each
    reference model without the layer (model_nll)."""
    model, cal = constructed("llama", identity=3)
    nll = {}
    for layer in range(6):
        ref = copy.deepcopy(model)
        remove_layers(ref, [layer])
        total, count = model_nll(ref, cal)
        nll[layer] = total / count
    real = sorted((layer for layer in range(6) if layer != 3), key=nll.get, reverse=True)  # worst first
    order = [real[0], real[1], 3] + real[2:]
    rank = {layer: float(i) for i, layer in enumerate(order)}

    def fake_scores(traj, metric, backend="hooks"):
        return torch.tensor([rank[o] for o in traj.view.kept]), {}

    monkeypatch.setattr("gradmap.methods.gradmap.layer_scores", fake_scores)
    with session(model, cal, micro_batch=2) as (engine, traj):
        sel = select_layers(traj, 1, method="gradmap", verify_top=2, verify_extend=True)
    checked = {int(k): v for k, v in sel.extra["verified"][0].items()}
    assert sorted(checked) == sorted(order[:4]) and sel.removed == [3]
    for layer, value in checked.items():
        assert value == pytest.approx(nll[layer], rel=1e-5)
    with session(model, cal, micro_batch=2) as (engine, traj):
        sel = select_layers(traj, 1, method="gradmap", verify_top=2)
    assert sorted(int(k) for k in sel.extra["verified"][0]) == sorted(order[:2]) and sel.removed == [real[1]]


def test_default_verify_top_by_hand():
    """min(3, num_layers), and 0 (no check) for one layer: 30 -> 3, 18 -> 3, 2 -> 2, 1 -> 0."""
    assert [default_verify_top(n) for n in (30, 18, 2, 1)] == [3, 3, 2, 0]
    with pytest.raises(ValueError, match="default_verify_top"):
        default_verify_top(0)


def test_default_verify_windows_by_hand():
    """min(nsamples, max(ceil(nsamples / 8), ceil(1024 / seqlen))): 32x256 -> max(4, 4) = 4; 16x256 -> max(2, 4) = 4;
    128x2048 -> max(16, 1) = 16; 8x64 -> max(1, 16) capped at 8; 3x1000 -> max(1, 2) = 2."""
    assert default_verify_windows(32, 256) == 4 and default_verify_windows(16, 256) == 4
    assert default_verify_windows(128, 2048) == 16 and default_verify_windows(8, 64) == 8
    assert default_verify_windows(3, 1000) == 2
    with pytest.raises(ValueError, match="default_verify_windows"):
        default_verify_windows(0, 256)


def test_prune_defaults_to_the_loss_check():
    """prune() with no verify arguments runs GradMAP with the loss check of its 3 lowest-scored layers on
    the default window count (here 4x16 windows: max(1, 64) capped at 4 = all 4); the baselines get no check;
    verify_top=0 is the paper's metric alone."""
    model = tiny_model("llama")
    cal = random_calibration(4, 16)
    result = prune(model, cal, num_layers=1, compensate_mode="none", micro_batch=2)
    assert result.settings["verify_top"] == 3 and result.settings["verify_windows"] == 4
    assert result.settings["verify_extend"] is False
    assert len(result.selection.extra["verified"][0]) == 3
    plain = prune(model, cal, num_layers=1, compensate_mode="none", micro_batch=2, verify_top=0)
    assert plain.settings["verify_top"] == 0 and plain.settings["verify_windows"] is None
    assert "verified" not in plain.selection.extra
    sleb = prune(model, cal, num_layers=1, method="sleb", compensate_mode="none", micro_batch=2)
    assert sleb.settings["verify_top"] == 0


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_verify_on_part_of_a_micro_batch(family):
    """verify_windows smaller than the micro-batch: the check's NLL is the reference model's NLL on exactly those
    windows (the first 2 of one micro-batch of 4), with their own attention masks (Gemma-3: sliding and full
    attention layers)."""
    model, cal = constructed(family)
    with session(model, cal, micro_batch=4) as (engine, traj):
        sel = select_layers(traj, 1, method="gradmap", verify_top=3, verify_windows=2)
    verified = {int(k): v for k, v in sel.extra["verified"][0].items()}
    assert len(verified) == 3
    sub = Calibration(cal.input_ids[:2], cal.attention_mask[:2], dict(cal.spec, nsamples=2))
    for layer, nll in verified.items():
        ref = copy.deepcopy(model)
        remove_layers(ref, [layer])
        total, count = model_nll(ref, sub)
        assert nll == pytest.approx(total / count, rel=1e-5)


def test_verify_top_is_refused_for_baselines():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="verify_top: applies to method 'gradmap' only"):
        prune(model, random_calibration(4, 16), num_layers=1, method="sleb", verify_top=3, compensate_mode="none")
    with pytest.raises(ValueError, match="verify_top: must be an integer"):
        prune(model, random_calibration(4, 16), num_layers=1, verify_top=1.5, compensate_mode="none")
    with pytest.raises(ValueError, match="verify_windows/verify_margin: apply to the loss check"):
        prune(model, random_calibration(4, 16), num_layers=1, verify_top=0, verify_windows=2, compensate_mode="none")
    with pytest.raises(ValueError, match="verify_margin: must be a finite number"):
        prune(model, random_calibration(4, 16), num_layers=1, verify_top=2, verify_margin=float("nan"),
              compensate_mode="none")
    with pytest.raises(ValueError, match="verify_windows: must be a positive"):
        prune(model, random_calibration(4, 16), num_layers=1, verify_top=2, verify_windows=0, compensate_mode="none")
    with pytest.raises(ValueError, match="verify_extend: applies to the loss check"):
        prune(model, random_calibration(4, 16), num_layers=1, verify_top=0, verify_extend=True, compensate_mode="none")
    result = prune(model, random_calibration(4, 16), num_layers=1, verify_top=2, verify_windows=2, verify_margin=0.5,
                   compensate_mode="none", micro_batch=1)
    assert result.settings["verify_windows"] == 2 and result.settings["verify_margin"] == 0.5


def test_replaceme_warns_when_tokens_are_too_few_for_the_fit():
    dense = tiny_model("llama")
    with session(dense, random_calibration(2, 16)) as (engine, traj):
        snapshot = traj.snapshot()
        big = replaceme_compensate(traj, snapshot)
        assert big.fits == [] and not big.notes  # nothing removed: nothing fitted, nothing to warn about
        engine.remove(2)
        engine.remove(3)
        result = replaceme_compensate(traj, snapshot)  # 32 tokens < 4 x 32
    assert any("underdetermined" in n for n in result.notes)
