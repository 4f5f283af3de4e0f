"""Resumed forwards (gradmap.prefix) against full forwards: same losses, the hand-computed cost model, the
memory budget, and the model left exactly as it was."""

import copy

import pytest
import torch

from conftest import FAMILIES, random_calibration, tiny_model
from gradmap.methods.common import calibration_loss, layers_left_out
from gradmap.methods.ppl import leave_one_out_losses
from gradmap.prefix import PrefixCache, head_params, resumed_forward_cost, resumed_loss


@pytest.mark.parametrize("family", FAMILIES)
def test_resumed_leave_one_out_equals_full_forwards(family):
    model = tiny_model(family)
    cal = random_calibration(5, 12, pad_last=3)  # 5 windows, micro-batch 2: a ragged last batch
    before = copy.deepcopy(model.state_dict())
    cached, passes = leave_one_out_losses(model, cal, micro_batch=2)
    full, full_passes = leave_one_out_losses(model, cal, micro_batch=2, cache_bytes=0)
    n = len(cached)
    assert full_passes == pytest.approx(n)  # no cache: one full pass per candidate
    for p in range(n):
        with layers_left_out(model, [p]):
            ref = calibration_loss(model, cal, 2)
        assert cached[p] == pytest.approx(ref, rel=1e-6, abs=1e-6), p
        assert full[p] == pytest.approx(ref, rel=1e-6, abs=1e-6), p
    assert 1 < passes < n
    # the model is unchanged: no instance forward left behind, same weights, same loss
    layers = [m for m in model.modules() if "forward" in m.__dict__]
    assert layers == []
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_cost_model_by_hand():
    model = tiny_model("llama")
    layers = model.model.layers
    per_layer = sum(p.numel() for p in layers[0].parameters())
    head = head_params(model)
    assert head == model.lm_head.weight.numel()
    n = len(layers)
    # resumed at position 2 of 6 identical layers: runs 4 layers + head of 6 layers + head
    assert resumed_forward_cost(model, 2) == pytest.approx((4 * per_layer + head) / (n * per_layer + head))
    assert resumed_forward_cost(model, 0) == pytest.approx(1.0)
    cal = random_calibration(4, 8)
    cache = PrefixCache(model, cal, micro_batch=4)
    assert cache.checkpoints == list(range(1, n))
    # the cache pass runs layers 0..n-2 and no head
    assert cache.passes == pytest.approx((n - 1) * per_layer / (n * per_layer + head))


def test_memory_budget_sets_the_checkpoint_stride():
    model = tiny_model("llama")
    cal = random_calibration(4, 8)
    per = cal.input_ids.numel() * model.config.hidden_size * 4  # fp32
    assert PrefixCache(model, cal, max_bytes=2 * per).checkpoints == [3]  # 5 wanted, 2 fit -> stride 3
    assert PrefixCache(model, cal, max_bytes=5 * per).checkpoints == [1, 2, 3, 4, 5]
    assert PrefixCache(model, cal, max_bytes=per - 1).checkpoints == []
    cache = PrefixCache(model, cal, max_bytes=2 * per)
    assert cache.checkpoint_for(2) == 0 and cache.checkpoint_for(4) == 3
    assert PrefixCache(model, cal, last=2).checkpoints == [1, 2]
    with layers_left_out(model, [4]):
        nll, cost = resumed_loss(model, cal, cache, start=4)
        assert nll == pytest.approx(calibration_loss(model, cal), rel=1e-6)
        assert cost == pytest.approx(resumed_forward_cost(model, 3))


def test_bad_arguments():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="micro_batch"):
        PrefixCache(model, random_calibration(2, 8), micro_batch=0)
    with pytest.raises(ValueError, match="max_bytes"):
        PrefixCache(model, random_calibration(2, 8), max_bytes=-1)


def test_explicit_checkpoints_and_summed_loss():
    model = tiny_model("qwen2")
    cal = random_calibration(3, 10, pad_last=2)
    cache = PrefixCache(model, cal, micro_batch=2, positions=[4, 0, 9])
    assert cache.checkpoints == [4]  # 0 and out-of-range positions ignored
    from gradmap.prefix import resumed_loss_sum
    from gradmap.scoring import lm_loss_sum
    total, count, cost = resumed_loss_sum(model, cal, cache, start=5)
    with torch.no_grad():
        ref, n = lm_loss_sum(model, cal.input_ids, cal.attention_mask)
    assert count == n and total == pytest.approx(float(ref), rel=1e-5)
    assert cost == pytest.approx(resumed_forward_cost(model, 4))
