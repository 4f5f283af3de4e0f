"""gradmap.model_card: the card parses as a Hub model card and shows what the report holds.

``ModelCard.validate`` posts the card to the Hub's API (network), so it is not called here; the metadata is checked
field by field after parsing with huggingface_hub's own ModelCard / ModelCardData and with a plain YAML parser.
"""

from __future__ import annotations

import json

import pytest
import yaml
from huggingface_hub import ModelCard

from gradmap.model_card import check_card, render_model_card, write_model_card

BASE = "HuggingFaceTB/SmolLM2-135M-Instruct"


def make_report() -> dict:
    """A report shaped like PruneResult.report() after `gradmap prune` + evaluation, with hand-picked numbers."""
    steps = [{"step": k + 1, "removed": r, "seconds": 1.5, "scores": {str(i): 0.1 * i for i in range(12) if i != r}}
             for k, r in enumerate([8, 3, 7])]
    return {
        "method": "gradmap",
        "settings": {"method": "gradmap", "num_layers": 3, "ratio": None, "metric": "grad_update_norm",
                     "compensate": "every-gap", "ridge": None, "protected": [], "micro_batch": 8, "seed": 0,
                     "eval_seqlen": 1024, "eval_max_tokens": None, "backend": "hooks", "verify_top": 0,
                     "model": "default", "dtype": "float32", "text": "wiki", "eval_text": "wiki"},
        "calibration": {"source": "wiki", "nsamples": 32, "seqlen": 256, "seed": 0, "tokens": 8192},
        "num_layers_dense": 12,
        "removed_layers": [3, 7, 8],
        "removal_order": [8, 3, 7],
        "kept_layers": [0, 1, 2, 4, 5, 6, 9, 10, 11],
        "steps": steps,
        "selection": {"seconds": 4.5, "forward_equivalent_passes": 9.0, "first_step_layer_scores": {}},
        "compensation": {"mode": "every-gap", "seconds": 2.0, "notes": ["layer 2: fold kept (cv loss 3.1 < 3.2)"],
                         "mean_shift": {}, "relative_mean_shift": {}, "fits": []},
        "perplexity": {"dense": {"ppl": 18.55, "nll": 2.92, "tokens": 16384, "seqlen": 1024, "stride": 1024,
                                 "seconds": 30.0, "tokens_per_s": 546.0},
                       "pruned": {"ppl": 42.125, "nll": 3.74, "tokens": 16384, "seqlen": 1024, "stride": 1024,
                                  "seconds": 25.0, "tokens_per_s": 655.0},
                       "compensated": {"ppl": 27.0612, "nll": 3.3, "tokens": 16384, "seqlen": 1024, "stride": 1024,
                                       "seconds": 25.0, "tokens_per_s": 655.0}},
        "zero_shot": {
            "dense": {"tasks": {"piqa": {"acc": 0.64, "acc_stderr": 0.03, "acc_norm": 0.65, "acc_norm_stderr": 0.03,
                                         "n": 200, "headline": "acc", "seconds": 10.0},
                                "hellaswag": {"acc": 0.40, "acc_stderr": 0.03, "acc_norm": 0.4725,
                                              "acc_norm_stderr": 0.03, "n": 200, "headline": "acc_norm",
                                              "seconds": 20.0}},
                      "average": 0.5563, "limit": 200, "seconds": 31.0, "versions": {}},
            "compensated": {"tasks": {"piqa": {"acc": 0.6125, "acc_stderr": 0.03, "acc_norm": 0.6, "n": 200,
                                               "acc_norm_stderr": 0.03, "headline": "acc", "seconds": 9.0},
                                      "hellaswag": {"acc": 0.35, "acc_stderr": 0.03, "acc_norm": 0.4175, "n": 200,
                                                    "acc_norm_stderr": 0.03, "headline": "acc_norm",
                                                    "seconds": 18.0}},
                            "average": 0.515, "limit": 200, "seconds": 28.0, "versions": {}}},
        "speed": {"dense": {"device": "cpu", "device_name": "AMD EPYC", "torch_threads": 1, "dtype": "float32",
                            "batch_size": 1, "prompt_tokens": 64, "new_tokens": 16, "repeats": 3, "num_layers": 12,
                            "prefill_tokens_per_s": 113.2, "time_to_first_token_s": 0.4661,
                            "decode_tokens_per_s": 8.2},
                  "pruned": {"device": "cpu", "device_name": "AMD EPYC", "torch_threads": 1, "dtype": "float32",
                             "batch_size": 1, "prompt_tokens": 64, "new_tokens": 16, "repeats": 3, "num_layers": 9,
                             "prefill_tokens_per_s": 151.2, "time_to_first_token_s": 0.3347,
                             "decode_tokens_per_s": 10.4},
                  "speedup": {"prefill": 1.3357, "decode": 1.2683, "time_to_first_token": 1.3926}},
        "timings": {"scoring": 4.5, "compensation": 2.0, "evaluation": 80.0, "total": 90.0},
        "environment": {"python": "3.11.7", "packages": {"torch": "2.13.0", "transformers": "5.25.0"}},
    }


def front_matter(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def test_full_card(tmp_path):
    (tmp_path / "gradmap_scores.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    (tmp_path / "gradmap_curve.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    (tmp_path / "gradmap_report.json").write_text(json.dumps(make_report()))
    path = write_model_card(tmp_path, make_report(), base_model=BASE, curve_png="gradmap_curve.png",
                            scores_png="gradmap_scores.png")
    assert path == tmp_path / "README.md"
    text = path.read_text(encoding="utf-8")
    # metadata: exactly the Hub fields we set (licence known for this base model)
    assert front_matter(text) == {"base_model": BASE, "library_name": "transformers", "tags": ["pruned", "gradmap"],
                                  "pipeline_tag": "text-generation", "license": "apache-2.0"}
    card = ModelCard.load(path)
    assert card.data.base_model == BASE and card.data.tags == ["pruned", "gradmap"]
    assert card.data.pipeline_tag == "text-generation" and card.data.library_name == "transformers"
    assert check_card(path)["license"] == "apache-2.0"
    # body: removed layers by original index, order, method, compensation, calibration
    assert "(original 0-based indices): [3, 7, 8] (3 of 12 layers)" in text
    assert "**Removal order**: [8, 3, 7]" in text
    assert "`grad_update_norm`" in text and "`every-gap`" in text
    assert "32 windows x 256 tokens" in text and "8192 tokens in total" in text
    # perplexity table rows with the numbers put in (3 decimals)
    assert "| dense | 12 | 18.550 | 16384 | 1024 |" in text
    assert "| pruned | 9 | 42.125 | 16384 | 1024 |" in text
    assert "| compensated | 9 | 27.061 | 16384 | 1024 |" in text
    # zero-shot table: headline metric per task, both models, average
    assert "| task | metric | items | dense | compensated |" in text
    assert "| piqa | acc | 200 | 0.6400 | 0.6125 |" in text
    assert "| hellaswag | acc_norm | 200 | 0.4725 | 0.4175 |" in text
    assert "| **average** | | | 0.5563 | 0.5150 |" in text
    # speed table
    assert "| dense | 12 | 113.2 | 0.4661 | 8.2 |" in text and "| pruned | 9 | 151.2 | 0.3347 | 10.4 |" in text
    assert "| **speed-up** | | 1.34x | 1.39x | 1.27x |" in text
    assert "AMD EPYC" in text and "torch threads: 1" in text
    assert "`gradmap_report.json` in this repository" in text
    assert "![layer scores at each removal step](gradmap_scores.png)" in text
    assert "## Removal curve" in text and "![removal curve](gradmap_curve.png)" in text
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_missing_sections_and_unknown_licence(tmp_path):
    text = render_model_card({"removed_layers": [5]}, base_model="someone/some-model", output_dir=tmp_path)
    assert front_matter(text) == {"base_model": "someone/some-model", "library_name": "transformers",
                                  "tags": ["pruned", "gradmap"], "pipeline_tag": "text-generation"}
    assert "[5] (1 layer)" in text
    for absent in ("## Perplexity", "## Zero-shot", "## Measured speed", "## Layer scores", "## Removal curve",
                   "license"):
        assert absent not in text
    empty = render_model_card({}, base_model="someone/some-model", output_dir=tmp_path)
    assert "## What was removed" in empty and "## Usage" in empty


def test_licence_from_report_and_single_zero_shot(tmp_path):
    report = {"license": "mit", "removed_layers": [1],
              "zero_shot": make_report()["zero_shot"]["compensated"]}
    path = write_model_card(tmp_path, report, base_model="someone/some-model")
    meta = check_card(path)
    assert meta["license"] == "mit"
    text = path.read_text()
    assert "| task | metric | items | pruned |" in text and "| piqa | acc | 200 | 0.6125 |" in text


def test_removed_layers_from_steps_when_absent(tmp_path):
    report = {"steps": make_report()["steps"], "method": "gradmap"}
    text = render_model_card(report, base_model=BASE, output_dir=tmp_path)
    assert "[3, 7, 8] (3 layers)" in text


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="base_model"):
        write_model_card(tmp_path, {}, base_model="not a repo id!")
    with pytest.raises(ValueError, match="base_model"):
        write_model_card(tmp_path, {}, base_model="/abs/local/path")
    with pytest.raises(ValueError, match="curve_png"):
        write_model_card(tmp_path, {}, base_model=BASE, curve_png=str(tmp_path / "x.png"))
    with pytest.raises(ValueError, match="curve_png"):
        write_model_card(tmp_path, {}, base_model=BASE, curve_png="missing.png")
    with pytest.raises(ValueError, match="curve_png"):
        write_model_card(tmp_path, {}, base_model=BASE, curve_png="../x.png")
    with pytest.raises(ValueError, match="output_dir"):
        write_model_card(tmp_path / "nope", {}, base_model=BASE)
    with pytest.raises(TypeError, match="report"):
        write_model_card(tmp_path, [], base_model=BASE)
    assert list(tmp_path.iterdir()) == []


def test_check_card_rejects_wrong_metadata(tmp_path):
    bad = tmp_path / "README.md"
    bad.write_text("---\nbase_model: x/y\nlibrary_name: transformers\ntags: [pruned]\n"
                   "pipeline_tag: text-generation\n---\n\n# x\n")
    with pytest.raises(ValueError, match="tags"):
        check_card(bad)
