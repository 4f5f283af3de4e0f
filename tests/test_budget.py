"""The removal curve and the quality budget (held-out windows, never the test text), save points, the model card and
the measured speed, against the really pruned models as oracles; and the CLI around them (one-line errors)."""

import copy
import json
import math

import pytest
import torch
from huggingface_hub import ModelCard
from transformers import AutoModelForCausalLM

from conftest import SAMPLE_TEXT, random_calibration, tiny_model
from gradmap import prune
from gradmap.cli import main
from gradmap.data import build_calibration
from gradmap.removal import remove_layers
from test_engine import model_nll


def holdout_ppl(model, removed, windows):
    ref = copy.deepcopy(model)
    remove_layers(ref, sorted(removed))
    total, count = model_nll(ref, windows)
    return math.exp(total / count)


def test_curve_points_are_the_really_pruned_models_holdout_ppl():
    model = tiny_model("qwen2")
    cal, hold = random_calibration(8, 16, seed=0), random_calibration(4, 16, seed=7, pad_last=3)
    result = prune(model, cal, num_layers=3, holdout=hold, compensate_mode="none")
    points = result.curve["curve"]
    assert [p["removed"] for p in points] == [0, 1, 2, 3]
    assert [p["layer"] for p in points[1:]] == result.removed
    for k, p in enumerate(points):
        assert p["holdout_ppl"] == pytest.approx(holdout_ppl(model, result.removed[:k], hold), rel=1e-5)
        per_layer = sum(q.numel() for q in model.model.layers[0].parameters())
        assert p["params_removed"] == k * per_layer and p["tokens_per_s"] > 0
    assert result.curve["max_ppl_increase"] is None and result.curve["stopped"] is None
    assert result.curve["holdout_tokens"] == int(hold.attention_mask.sum())


@pytest.mark.parametrize("method", ["gradmap", "shortgpt", "sleb"])
def test_budget_stops_before_the_first_removal_over_the_limit(method):
    model = tiny_model("llama")
    cal, hold = random_calibration(8, 16, seed=0), random_calibration(4, 16, seed=9)
    budget = 0.5  # percent
    result = prune(model, cal, holdout=hold, max_ppl_increase=budget, method=method, compensate_mode="none")
    dense = holdout_ppl(model, [], hold)
    limit = dense * (1 + budget / 100)
    assert result.curve["dense_holdout_ppl"] == pytest.approx(dense, rel=1e-6)
    assert result.curve["limit"] == pytest.approx(limit, rel=1e-6)
    for k in range(1, len(result.removed) + 1):
        assert holdout_ppl(model, result.removed[:k], hold) <= limit * (1 + 1e-6)
    stopped = result.curve["stopped"]
    assert stopped is not None and 0 < len(result.removed) < 5
    refused = holdout_ppl(model, result.removed + [stopped["layer"]], hold)
    assert refused > limit and stopped["holdout_ppl"] == pytest.approx(refused, rel=1e-5)


def test_budget_with_a_ceiling_and_errors():
    model = tiny_model("llama")
    cal, hold = random_calibration(8, 16, seed=0), random_calibration(4, 16, seed=9)
    loose = prune(model, cal, holdout=hold, max_ppl_increase=1000.0, num_layers=2, compensate_mode="none")
    assert len(loose.removed) == 2 and loose.curve["stopped"] is None  # the ceiling, not the budget, ended it
    with pytest.raises(ValueError, match="max_ppl_increase: needs held-out calibration windows"):
        prune(model, cal, max_ppl_increase=5.0)
    with pytest.raises(ValueError, match="max_ppl_increase: BlockPruner"):
        prune(model, cal, holdout=hold, max_ppl_increase=5.0, method="blockpruner")
    with pytest.raises(ValueError, match="max_ppl_increase: must be a positive percentage"):
        prune(model, cal, holdout=hold, max_ppl_increase=-1.0)


def test_holdout_windows_never_overlap_the_calibration_windows(tiny_tokenizer):
    text = SAMPLE_TEXT * 4
    cal = build_calibration(tiny_tokenizer, text, nsamples=6, seqlen=16, seed=0)
    held = build_calibration(tiny_tokenizer, text, nsamples=4, seqlen=16, seed=1, exclude=cal.spec["windows"])
    assert not set(cal.spec["windows"]) & set(held.spec["windows"])
    again = build_calibration(tiny_tokenizer, text, nsamples=6, seqlen=16, seed=0, exclude=())
    assert torch.equal(again.input_ids, cal.input_ids)  # no exclusion: the same windows as before
    nwin = len(tiny_tokenizer(text)["input_ids"]) // 16
    with pytest.raises(ValueError, match="excluded"):
        build_calibration(tiny_tokenizer, text, nsamples=nwin - 5, seqlen=16, seed=1, exclude=cal.spec["windows"])


def test_save_points_are_the_prefixes_of_one_run(tmp_path):
    model = tiny_model("llama")
    cal, hold = random_calibration(8, 16, seed=0), random_calibration(4, 16, seed=9)
    ids = random_calibration(2, 32, seed=4).input_ids.flatten()
    result = prune(model, cal, num_layers=3, holdout=hold, save_at=[1, 2], eval_tokens=ids, eval_seqlen=32)
    assert sorted(result.points) == [1, 2]
    written = result.save_points(tmp_path / "out")
    assert sorted(written) == [1, 2, 3]
    for count, path in written.items():
        report = json.loads((path / "gradmap_report.json").read_text())
        assert report["removal_order"] == result.removed[:count]
        assert report["perplexity"]["compensated"]["ppl"] == pytest.approx(result.curve["test_ppl"][str(count)])
        reloaded = AutoModelForCausalLM.from_pretrained(path)
        assert reloaded.config.num_hidden_layers == 6 - count
        # the save point is compensated on its own: its logits are those of its own view, not the final one's
        view_model = (result.points[count] if count in result.points else result)
        assert view_model.view.kept == [i for i in range(6) if i not in result.removed[:count]]
        card = ModelCard.load(path / "README.md")
        assert card.data.library_name == "transformers" and card.data.tags == ["pruned", "gradmap"]
        assert card.data.pipeline_tag == "text-generation" and card.data.base_model
        assert f"# layers-{count}" in card.text and "gradmap_curve.png" in card.text
    with pytest.raises(ValueError, match=r"save_at: layer counts must be in \[1, 3\]"):
        prune(model, cal, num_layers=3, save_at=[4])


def test_measured_speed_is_reported_for_resident_runs():
    model = tiny_model("llama")
    result = prune(model, random_calibration(8, 16), num_layers=2, measure_speed=True, compensate_mode="none")
    speed = result.speed
    for side in ("dense", "pruned"):
        assert speed[side]["prefill_tokens_per_s"] > 0 and speed[side]["decode_tokens_per_s"] > 0
        assert speed[side]["batch_size"] == 1 and speed[side]["torch_threads"] >= 1 and speed[side]["device"] == "cpu"
    assert speed["speedup"]["prefill"] == pytest.approx(
        speed["pruned"]["prefill_tokens_per_s"] / speed["dense"]["prefill_tokens_per_s"])
    assert result.report()["speed"] == speed


@pytest.fixture
def model_dir(tmp_path, tiny_tokenizer):
    path = tmp_path / "tiny"
    tiny_model("llama").save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    (tmp_path / "calib.txt").write_text(SAMPLE_TEXT * 3, encoding="utf-8")
    return path


def test_cli_budget_without_a_target_and_save_at(model_dir, tmp_path, capsys):
    text = str(tmp_path / "calib.txt")
    base = ["prune", "--model", str(model_dir), "--text", text, "--eval-text", text, "--nsamples", "8", "--seqlen",
            "16", "--eval-seqlen", "32", "--eval-tokens", "256", "--compensate", "none", "-q", "--no-speed"]
    assert main(base + ["--max-ppl-increase", "1", "--holdout", "4", "--output", str(tmp_path / "b")]) == 0
    printed = capsys.readouterr().out
    assert "held-out calibration PPL after each removal" in printed
    report = json.loads((tmp_path / "b" / "gradmap_report.json").read_text())
    assert report["curve"]["max_ppl_increase"] == 1.0 and report["curve"]["holdout_windows"] == 4
    assert (tmp_path / "b" / "gradmap_curve.png").stat().st_size > 0
    assert main(base + ["--num-layers", "3", "--save-at", "1,2", "--output", str(tmp_path / "s")]) == 0
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["layers-1", "layers-2", "layers-3"]
    capsys.readouterr()


@pytest.mark.parametrize("extra,message", [
    (["--save-at", "9"], "--save-at: [9] exceed the 5 layers the run removes at most"),
    (["--num-layers", "2", "--save-at", "3"], "--save-at: [3] exceed the 2 layers"),
    (["--max-ppl-increase", "-3"], "--max-ppl-increase: must be a positive percentage"),
    (["--max-ppl-increase", "3", "--holdout", "0"], "--holdout: the quality budget needs held-out windows"),
    (["--max-ppl-increase", "3", "--method", "blockpruner"], "--max-ppl-increase: BlockPruner"),
    ([], "--num-layers: give --num-layers, --ratio or --max-ppl-increase"),
    (["--num-layers", "1", "--holdout", "1000"], "--holdout: 1000 held-out windows do not fit"),
])
def test_cli_budget_errors_are_one_line(model_dir, tmp_path, capsys, extra, message):
    args = ["prune", "--model", str(model_dir), "--text", str(tmp_path / "calib.txt"), "--nsamples", "4",
            "--seqlen", "16", "--no-eval", "--output", str(tmp_path / "o"), "-q", *extra]
    if "--max-ppl-increase" not in extra and "--num-layers" not in extra and extra:
        args += ["--max-ppl-increase", "5"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("gradmap: error: ") and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "o").exists()
