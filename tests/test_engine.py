"""The layer engine against independent oracles: the model's own forward (full logits, fp64 cross-entropy), the model
with layers really removed or weights really changed, autograd through the whole model; streamed == resident; the
checkpointed (stride) sweeps == storing every boundary."""

import copy

import pytest
import torch
import torch.nn.functional as F

from conftest import FAMILIES, random_calibration, tiny_model
from gradmap.adapters import get_adapter
from gradmap.engine import (OUTER, Candidate, CheckpointSource, Engine, ModelWeights, Windows, build_skeleton)
from gradmap.methods.blockpruner import RemovedSubBlock
from gradmap.removal import remove_layers


def model_nll(model, cal):
    """Summed next-token NLL of the model's OWN forward (full logits, fp64 cross-entropy), padding excluded."""
    ids, mask = cal.input_ids, cal.attention_mask
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits.double()
    valid = (mask[:, 1:] * mask[:, :-1]).bool()
    targets = ids[:, 1:].masked_fill(~valid, -100)
    return float(F.cross_entropy(logits[:, :-1].flatten(0, 1), targets.flatten(), ignore_index=-100,
                                 reduction="sum")), int(valid.sum())


def layer_inputs_outputs(model, cal):
    """Every decoder layer's input and output hidden states from the model's own forward (hooks)."""
    layers = get_adapter(model).layers(model)
    seen = []
    hooks = [layer.register_forward_hook(
        lambda m, a, kw, o: seen.append(((a[0] if a else kw["hidden_states"]).detach(),
                                         (o[0] if isinstance(o, tuple) else o).detach())), with_kwargs=True)
        for layer in layers]
    with torch.no_grad():
        model(input_ids=cal.input_ids, attention_mask=cal.attention_mask, use_cache=False)
    for h in hooks:
        h.remove()
    return seen


@pytest.mark.parametrize("family", FAMILIES)
def test_loss_and_boundaries_equal_the_models_own_forward(family):
    model = tiny_model(family, tied=family in ("llama", "gemma3_text", "gpt2"))
    cal = random_calibration(nsamples=5, seqlen=16, pad_last=5)
    want, count = model_nll(model, cal)
    seen = layer_inputs_outputs(model, cal)
    with Engine.for_module(model) as engine:
        traj = engine.trajectory(Windows.from_calibration(cal, micro_batch=5))
        total, n = traj.loss()
        assert n == count
        assert total == pytest.approx(want, rel=1e-6)
        for p, (h_in, h_out) in enumerate(seen):
            torch.testing.assert_close(traj.boundary(p, 0), h_in, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(traj.boundary(p + 1, 0), h_out, rtol=1e-5, atol=1e-5)
    assert all(p.requires_grad for p in model.parameters())  # flags restored


@pytest.mark.parametrize("family", FAMILIES)
def test_backward_gradients_equal_autograd_through_the_whole_model(family):
    model = tiny_model(family)
    cal = random_calibration(nsamples=4, seqlen=12, pad_last=3)
    # oracle: retain_grad on every layer output of ONE full-model forward, loss / all predicted tokens
    layers = get_adapter(model).layers(model)
    outs = []

    def keep(module, args, output):
        out = output[0] if isinstance(output, tuple) else output
        out.retain_grad()
        outs.append(out)

    hooks = [layer.register_forward_hook(keep) for layer in layers]
    model.get_input_embeddings().weight.requires_grad_(True)
    logits = model(input_ids=cal.input_ids, attention_mask=cal.attention_mask, use_cache=False).logits
    valid = (cal.attention_mask[:, 1:] * cal.attention_mask[:, :-1]).bool()
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), cal.input_ids[:, 1:].masked_fill(~valid, -100).flatten(),
                           ignore_index=-100, reduction="sum") / int(valid.sum())
    loss.backward()
    for h in hooks:
        h.remove()
    want = [o.grad.detach().clone() for o in outs]
    model.zero_grad(set_to_none=True)
    got = {}
    with Engine.for_module(model) as engine:
        traj = engine.trajectory(Windows.from_calibration(cal, micro_batch=2))

        def reducer(position, orig, k, h_in, h_out, g_out):
            got[(position, k)] = g_out.clone()

        traj.backward(reducer)
    for p in range(len(layers)):
        g = torch.cat([got[(p, 0)], got[(p, 1)]])
        torch.testing.assert_close(g, want[p], rtol=1e-4, atol=1e-7)


def removed_copy(model, positions):
    out = copy.deepcopy(model)
    remove_layers(out, positions)
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_resumed_candidates_equal_really_changed_models(family):
    model = tiny_model(family)
    cal = random_calibration(nsamples=4, seqlen=16, pad_last=4)
    adapter = get_adapter(model)
    g = torch.Generator().manual_seed(3)
    down_name = adapter.mlp_out_names(with_bias=False)[0]
    changed_w = dict(adapter.layers(model)[3].named_parameters())[down_name].detach() * 0.5 + \
        0.01 * torch.randn(dict(adapter.layers(model)[3].named_parameters())[down_name].shape, generator=g)
    with Engine.for_module(model) as engine:
        traj = engine.trajectory(Windows.from_calibration(cal, micro_batch=3))
        calls = []
        lazy = Candidate(3, overrides=lambda: calls.append(1) or {down_name: changed_w})
        candidates = [Candidate(p, skip=True) for p in range(6)] + [Candidate(3, overrides={down_name: changed_w}), lazy]
        got = traj.candidate_losses(candidates)
    # a callable override is built once, when the sweep reaches its layer (not once per micro-batch: 4 windows at
    # micro-batch 3 are 2 micro-batches), and gives exactly the dict override's loss
    assert len(calls) == 1 and got[7] == got[6]
    for p in range(6):
        want, count = model_nll(removed_copy(model, [p]), cal)
        assert got[p][1] == count and got[p][0] == pytest.approx(want, rel=1e-5), p
    changed = copy.deepcopy(model)
    with torch.no_grad():
        dict(adapter.layers(changed)[3].named_parameters())[down_name].copy_(changed_w)
    want, _ = model_nll(changed, cal)
    assert got[6][0] == pytest.approx(want, rel=1e-5)
    # the dense model was never modified
    for (name, a), b in zip(model.state_dict().items(), tiny_model(family).state_dict().values()):
        assert torch.equal(a, b), name


def test_patch_candidate_equals_zeroed_sub_block():
    model = tiny_model("llama")
    cal = random_calibration(nsamples=4, seqlen=16)
    with Engine.for_module(model) as engine:
        traj = engine.trajectory(Windows.from_calibration(cal, micro_batch=4))
        (attn, _), (mlp, _) = traj.candidate_losses([Candidate(2, patches={"self_attn": RemovedSubBlock("attn")}),
                                                     Candidate(4, patches={"mlp": RemovedSubBlock("mlp")})])
    for layer, proj, got in ((2, "self_attn.o_proj", attn), (4, "mlp.down_proj", mlp)):
        zeroed = copy.deepcopy(model)
        with torch.no_grad():
            zeroed.model.layers[layer].get_submodule(proj).weight.zero_()
        assert got == pytest.approx(model_nll(zeroed, cal)[0], rel=1e-5)


def test_removal_resumes_from_the_boundary_and_matches_a_fresh_run():
    model = tiny_model("qwen2")
    cal = random_calibration(nsamples=4, seqlen=16)
    with Engine.for_module(model) as engine:
        traj = engine.trajectory(Windows.from_calibration(cal, micro_batch=2))
        traj.loss()
        engine.remove(4)
        work = engine.work
        total, _ = traj.loss()
        resumed_work = engine.work - work
    per_layer = sum(p.numel() for p in model.model.layers[0].parameters())
    head = model.lm_head.weight.numel()
    # only layer 5 (now at position 4) runs again, plus the head: 64 positions each, 60 targets
    assert resumed_work == per_layer * 64 + head * 60
    assert total == pytest.approx(model_nll(removed_copy(model, [4]), cal)[0], rel=1e-5)


@pytest.mark.parametrize("stride", [2, 3, 7])
def test_checkpointed_boundaries_give_the_same_results(stride):
    model = tiny_model("gemma3_text")
    cal = random_calibration(nsamples=4, seqlen=16, pad_last=2)

    def run(stride):
        with Engine.for_module(model, stride=stride) as engine:
            traj = engine.trajectory(Windows.from_calibration(cal, micro_batch=2))
            acc = torch.zeros(6, dtype=torch.float64)

            def reducer(position, orig, k, h_in, h_out, g_out):
                acc[position] += float((g_out.double().norm(dim=-1) * (h_out - h_in).double().norm(dim=-1)).sum())

            traj.backward(reducer)
            losses = traj.candidate_losses([Candidate(p, skip=True) for p in range(6)])
            engine.remove(2)
            after = traj.loss()
            stored = len(traj.store.keys())
        return acc, losses, after, stored

    base = run(1)
    other = run(stride)
    torch.testing.assert_close(other[0], base[0], rtol=1e-6, atol=0)
    assert [round(a / c, 6) for a, c in other[1]] == [round(a / c, 6) for a, c in base[1]]
    assert other[2][0] == pytest.approx(base[2][0], rel=1e-6)
    assert other[3] < base[3]  # fewer boundaries kept


def test_snapshot_shares_tensors_and_survives_live_changes():
    model = tiny_model("llama")
    cal = random_calibration(nsamples=2, seqlen=8)
    with Engine.for_module(model) as engine:
        traj = engine.trajectory(Windows.from_calibration(cal, micro_batch=2))
        traj.forward()
        dense = traj.snapshot()
        assert dense.boundary(5, 0).data_ptr() == traj.boundary(5, 0).data_ptr()
        before = dense.boundary(6, 0).clone()
        engine.remove(1)
        traj.forward()
        assert traj.n == 5 and dense.n == 6
        torch.testing.assert_close(dense.boundary(6, 0), before, rtol=0, atol=0)


def test_plain_forward_without_stored_boundaries_gives_the_same_loss():
    model = tiny_model("opt")
    cal = random_calibration(nsamples=3, seqlen=16, pad_last=6)
    with Engine.for_module(model) as engine:
        keep = engine.trajectory(Windows.from_calibration(cal, micro_batch=2)).loss()
        plain_traj = engine.trajectory(Windows.from_calibration(cal, micro_batch=2), keep=False)
        plain = plain_traj.loss()
        assert plain_traj.store.keys() == []
    assert plain == (pytest.approx(keep[0], rel=1e-7), keep[1])


@pytest.mark.parametrize("family", ["llama", "gemma3_text", "gpt2", "falcon"])
def test_streamed_units_equal_resident(family, tmp_path):
    model = tiny_model(family, tied=family == "llama")
    model.save_pretrained(tmp_path)
    cal = random_calibration(nsamples=4, seqlen=16, pad_last=2)

    def run(weights):
        with Engine(weights) as engine:
            traj = engine.trajectory(Windows.from_calibration(cal, micro_batch=2))
            acc = torch.zeros(6, dtype=torch.float64)

            def reducer(position, orig, k, h_in, h_out, g_out):
                acc[position] += float((g_out.double() * (h_out - h_in).double()).sum())

            traj.backward(reducer)
            return acc, traj.candidate_losses([Candidate(p, skip=True) for p in range(6)])

    resident = run(ModelWeights(model, get_adapter(model), device=torch.device("cpu"), dtype=torch.float32))
    skeleton = build_skeleton(model.config)
    placement = {u: "stream" for u in [OUTER, *range(6)]}
    placement[2] = "device"
    weights = ModelWeights(skeleton, get_adapter(skeleton), device=torch.device("cpu"), dtype=torch.float32,
                           source=CheckpointSource(tmp_path), placement=placement)
    streamed = run(weights)
    torch.testing.assert_close(streamed[0], resident[0], rtol=0, atol=0)
    assert streamed[1] == resident[1]
    assert weights.is_live(2) and not weights.is_live(3) and not weights.is_live(OUTER)
    layers = get_adapter(skeleton).layers(skeleton)
    assert all(p.device.type == "meta" for p in layers[3].parameters())  # released after use
    assert all(p.device.type == "cpu" for p in layers[2].parameters())  # resident
    assert weights.bytes_read > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="host spill of hidden states only happens on a CUDA device")
def test_states_over_the_device_budget_spill_to_pinned_host_memory():
    from gradmap.engine.store import DeviceBudget, StateStore

    budget = DeviceBudget(4 * 1024)
    store = StateStore(torch.device("cuda"), budget)
    a, b = torch.randn(1024, device="cuda"), torch.randn(1024, device="cuda")
    store.put("a", a)
    store.put("b", b)  # over the 4 KiB budget: goes to the host
    assert store.device_bytes == 4096 and store.host_bytes == 4096 and budget.used == 4096
    assert store._data["b"].device.type == "cpu" and store._data["b"].is_pinned()
    torch.testing.assert_close(store.get("b"), b, rtol=0, atol=0)
    assert store.get("b").device.type == "cuda"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_engine_on_cuda_equals_the_models_own_forward():
    model = tiny_model("llama").cuda()
    cal = random_calibration(nsamples=4, seqlen=16, pad_last=3)
    ids, mask = cal.input_ids.cuda(), cal.attention_mask.cuda()
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits.double()
    valid = (mask[:, 1:] * mask[:, :-1]).bool()
    want = float(F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].masked_fill(~valid, -100).flatten(),
                                 ignore_index=-100, reduction="sum"))
    with Engine.for_module(model) as engine:
        total, _ = engine.trajectory(Windows.from_calibration(cal, micro_batch=2)).loss()
    assert total == pytest.approx(want, rel=1e-4)
