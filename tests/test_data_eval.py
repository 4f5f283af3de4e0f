"""Calibration windows, text sources and perplexity against hand computations."""

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import SAMPLE_TEXT, random_calibration, tiny_model
from gradmap.data import Calibration, build_calibration, calibration_from_texts, load_text, tokenize
from gradmap.evaluation import perplexity


def test_calibration_deterministic_windows(tiny_tokenizer):
    a = build_calibration(tiny_tokenizer, SAMPLE_TEXT, nsamples=4, seqlen=16, seed=7)
    b = build_calibration(tiny_tokenizer, SAMPLE_TEXT, nsamples=4, seqlen=16, seed=7)
    c = build_calibration(tiny_tokenizer, SAMPLE_TEXT, nsamples=4, seqlen=16, seed=8)
    assert torch.equal(a.input_ids, b.input_ids) and not torch.equal(a.input_ids, c.input_ids)
    ids = tokenize(tiny_tokenizer, SAMPLE_TEXT)
    for row, w in zip(a.input_ids, a.spec["windows"]):  # each window is a real slice of the token stream
        assert torch.equal(row, ids[w * 16:(w + 1) * 16])
    assert a.attention_mask.all() and a.spec["seed"] == 7 and a.spec["tokens"] == 64


def test_calibration_errors(tiny_tokenizer):
    with pytest.raises(ValueError, match=r"calibration text has \d+ tokens, shorter than one window of seqlen=4096"):
        build_calibration(tiny_tokenizer, SAMPLE_TEXT, nsamples=1, seqlen=4096)
    with pytest.raises(ValueError, match="seqlen: 256 exceeds the model's maximum sequence length 128"):
        build_calibration(tiny_tokenizer, SAMPLE_TEXT, nsamples=1, seqlen=256, max_length=128)
    with pytest.raises(ValueError, match="nsamples: must be >= 1"):
        build_calibration(tiny_tokenizer, SAMPLE_TEXT, nsamples=0, seqlen=8)
    with pytest.raises(ValueError, match="holds only"):
        build_calibration(tiny_tokenizer, SAMPLE_TEXT, nsamples=10_000, seqlen=8)


def test_calibration_from_texts_masks_padding(tiny_tokenizer):
    cal = calibration_from_texts(tiny_tokenizer, ["the cat", "the dog sat on the log and the mat"], seqlen=6)
    n0 = len(tokenize(tiny_tokenizer, "the cat"))
    assert cal.attention_mask[0].tolist() == [1] * n0 + [0] * (6 - n0)
    assert cal.attention_mask[1].all()


def test_user_text_file(tmp_path):
    f = tmp_path / "wiki.test.raw"
    f.write_text("hello world", encoding="utf-8")
    assert load_text(f, "all") == "hello world"
    # no line break: split at exactly int(0.8 * 11) = 8 characters
    assert load_text(f, "calibration") == "hello wo" and load_text(f, "test") == "rld"
    with pytest.raises(FileNotFoundError, match="text: file .* does not exist"):
        load_text(tmp_path / "missing.txt")
    with pytest.raises(ValueError, match="split"):
        load_text(f, "train")


def _manual_ppl(model, ids, seqlen):
    nll, n = 0.0, 0
    for b in range(0, ids.numel(), seqlen):
        chunk = ids[b:b + seqlen][None]
        if chunk.shape[1] < 2:
            continue
        with torch.no_grad():
            logits = model(chunk).logits
        nll += F.cross_entropy(logits[0, :-1].double(), chunk[0, 1:], reduction="sum").item()
        n += chunk.shape[1] - 1
    return math.exp(nll / n), n


def test_perplexity_matches_manual():
    model = tiny_model("llama")
    ids = random_calibration(nsamples=1, seqlen=100, seed=2).input_ids[0]
    r = perplexity(model, ids, seqlen=32, micro_batch=3)  # last window is ragged (4 tokens): padded in the batch
    want, n = _manual_ppl(model, ids, 32)
    assert r.tokens == n == 96
    assert r.ppl == pytest.approx(want, rel=1e-5)


def test_perplexity_stride_scores_each_token_once():
    model = tiny_model("llama")
    ids = random_calibration(nsamples=1, seqlen=60, seed=4).input_ids[0]
    r = perplexity(model, ids, seqlen=32, stride=16)
    # windows [0,32) scores 31, [16,48) scores 32..47 (16), [32,60) scores 48..59 (12)
    assert r.tokens == 31 + 16 + 12
    nll = 0.0
    for b, first in [(0, 1), (16, 16), (32, 16)]:
        chunk = ids[b:b + 32][None]
        with torch.no_grad():
            logp = model(chunk).logits[0].double().log_softmax(-1)
        for t in range(first, chunk.shape[1]):
            nll -= logp[t - 1, chunk[0, t]].item()
    assert r.ppl == pytest.approx(math.exp(nll / r.tokens), rel=1e-5)


def test_perplexity_errors():
    model = tiny_model("llama")
    ids = torch.arange(3, 40)
    with pytest.raises(ValueError, match="seqlen: 512 exceeds the model's maximum sequence length 128"):
        perplexity(model, ids, seqlen=512)
    with pytest.raises(ValueError, match="stride"):
        perplexity(model, ids, seqlen=16, stride=32)
    with pytest.raises(ValueError, match="need at least 2"):
        perplexity(model, ids[:1], seqlen=16)
    with pytest.raises(ValueError, match="max_tokens: must be >= 2"):
        perplexity(model, ids, seqlen=16, max_tokens=-5)


def test_calibration_validation():
    with pytest.raises(ValueError, match="fewer than 2 real tokens"):
        Calibration(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long))


def test_calibration_folds_contiguous_cover_all():
    cal = random_calibration(nsamples=7, seqlen=6, pad_last=2)
    parts = cal.folds(3)
    assert [p.nsamples for p in parts] == [3, 2, 2]  # sizes differ by at most one, the larger first
    assert torch.equal(torch.cat([p.input_ids for p in parts]), cal.input_ids)  # contiguous, in order, all windows
    assert torch.equal(torch.cat([p.attention_mask for p in parts]), cal.attention_mask)
    assert sum(p.num_tokens for p in parts) == cal.num_tokens
    assert [p.spec["part"] for p in parts] == ["fold 0/3", "fold 1/3", "fold 2/3"]
    assert [p.nsamples for p in cal.folds(7)] == [1] * 7
    assert [p.nsamples for p in cal.folds(4)] == [2, 2, 2, 1]
    (whole,) = cal.folds(1)
    assert torch.equal(whole.input_ids, cal.input_ids)


def test_calibration_folds_errors():
    cal = random_calibration(nsamples=4, seqlen=6)
    for bad in (0, 5, 2.0, True, "2"):
        with pytest.raises(ValueError, match=r"folds: need an int with 1 <= k <= nsamples=4, got"):
            cal.folds(bad)
    ids = torch.full((2, 4), 5)
    sparse = Calibration(ids, torch.tensor([[1, 1, 1, 1], [1, 0, 0, 0]]))
    with pytest.raises(ValueError, match=r"folds: group 1 \(windows 1\.\.1\) has fewer than 2 real tokens"):
        sparse.folds(2)
