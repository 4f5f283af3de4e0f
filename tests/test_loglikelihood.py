"""gradmap.loglikelihood.score_requests against the plain full-sequence forward, on every supported family."""

from __future__ import annotations

import pytest
import torch

from conftest import VOCAB, tiny_model
from gradmap import loglikelihood
from gradmap.loglikelihood import score_requests

MAX_LENGTH = 128
# (context length, continuation lengths): shared contexts with 1-token and longer continuations, a context with one
# continuation, a one-token context, contexts longer than the tiny models' sliding window (8), and one pair longer
# than MAX_LENGTH + 1 (scored alone, truncated from the left)
LAYOUT = ((13, (1, 5, 3, 9)), (4, (2,)), (20, (1, 1)), (7, (6, 2, 2)), (1, (3,)), (120, (15,)), (9, (4,)))


def _requests(seed: int = 0) -> list[tuple[list[int], list[int]]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for n_context, lengths in LAYOUT:
        context = torch.randint(3, VOCAB, (n_context,), generator=g).tolist()
        out += [(context, torch.randint(3, VOCAB, (k,), generator=g).tolist()) for k in lengths]
    return out


def _oracle(model, context, continuation, max_length):
    """One unpadded sequence, left-truncated to max_length input tokens; float64 log-softmax of its last logits."""
    tokens = (context + continuation)[-(max_length + 1):][:-1]
    with torch.no_grad():
        logits = model(torch.tensor([tokens])).logits[0, -len(continuation):]
    logprobs = torch.log_softmax(logits.double(), dim=-1)
    targets = torch.tensor(continuation)
    return float(logprobs.gather(1, targets[:, None]).sum()), bool((logprobs.argmax(-1) == targets).all())


def test_matches_full_sequence_forward(family, monkeypatch):
    monkeypatch.setattr(loglikelihood, "MAX_CONTEXT_TOKENS", 40)  # several batches, contexts of mixed lengths
    model = tiny_model(family)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    requests = _requests()
    done = []
    got = score_requests(model, requests, max_length=MAX_LENGTH, progress=done.append)
    assert sum(done) == len(requests) and len(done) > 2
    for (context, continuation), (ll, greedy) in zip(requests, got, strict=True):
        ref_ll, ref_greedy = _oracle(model, context, continuation, MAX_LENGTH)
        assert ll == pytest.approx(ref_ll, abs=1e-4 * len(continuation)), family  # fp32 forward, shapes differ
        assert greedy == ref_greedy, family
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_greedy_flag_and_logit_budget(monkeypatch):
    """is_greedy is True exactly where every continuation token is the argmax (built from the model's own argmax);
    a logit budget of one token per batch still scores everything."""
    model = tiny_model("llama")
    context = [5, 9, 17, 33, 4]
    with torch.no_grad():
        greedy = model.generate(torch.tensor([context]), max_new_tokens=3, do_sample=False)[0, len(context):].tolist()
    other = [t + 1 if t + 1 < VOCAB else 3 for t in greedy]
    monkeypatch.setattr(loglikelihood, "MAX_LOGIT_BYTES", 4 * VOCAB)
    got = score_requests(model, [(context, greedy), (context, other), (context, greedy[:1])], max_length=MAX_LENGTH)
    assert [g for _, g in got] == [True, False, True]
    assert got[0][0] == pytest.approx(_oracle(model, context, greedy, MAX_LENGTH)[0], abs=1e-4)


@pytest.mark.parametrize("bad", [[([], [3])], [([3], [])]])
def test_empty_parts_raise(bad):
    with pytest.raises(ValueError, match="at least one token"):
        score_requests(tiny_model("llama"), bad, max_length=MAX_LENGTH)
