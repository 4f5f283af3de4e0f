"""prune() end to end on tiny models: caller untouched, save → plain-transformers reload, atomic writes, bad input."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors import safe_open

from conftest import FAMILIES, random_calibration, tiny_model
from gradmap import prune
from gradmap.adapters import get_adapter
from gradmap.checkpoint import check_output_dir, save_checkpoint

RELOAD = textwrap.dedent("""
    import json, sys, torch
    from transformers import AutoModelForCausalLM
    jobs, ids = json.loads(sys.argv[1]), torch.tensor(json.loads(sys.argv[2]))
    for path, layers_path in jobs:
        m = AutoModelForCausalLM.from_pretrained(path).eval()
        layers = m
        for name in layers_path.split("."):
            layers = getattr(layers, name)
        assert not any(k.startswith("gradmap") for k in sys.modules), "gradmap was imported"
        with torch.no_grad():
            logits = m(ids).logits
        cached = m.generate(ids[:1, :4], max_new_tokens=20, min_new_tokens=20, do_sample=False, use_cache=True, pad_token_id=0)
        plain = m.generate(ids[:1, :4], max_new_tokens=20, min_new_tokens=20, do_sample=False, use_cache=False, pad_token_id=0)
        torch.save({"logits": logits, "cached": cached, "plain": plain,
                    "tied": m.get_output_embeddings().weight.data_ptr() == m.get_input_embeddings().weight.data_ptr(),
                    "layer_idx": [sorted({x.layer_idx for x in l.modules()
                                          if isinstance(getattr(x, "layer_idx", None), int)}) for l in layers],
                    "num_layers": len(layers), "layer_types": getattr(m.config, "layer_types", None),
                    "num_hidden_layers": m.config.num_hidden_layers}, path + "/reloaded.pt")
""")
RELOAD_IDS = random_calibration(nsamples=2, seqlen=10, seed=5).input_ids


@pytest.fixture(scope="module")
def saved_families(tmp_path_factory):
    """Prune + save a tiny tied model of every family, then reload all of them in ONE plain-transformers subprocess
    (a subprocess per family spent ~20 s each importing transformers)."""
    runs = {}
    for family in FAMILIES:
        model = tiny_model(family, tied=True)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        result = prune(model, random_calibration(nsamples=8, seqlen=16), num_layers=2, metric="taylor",
                       compensate_mode="every-gap")
        root = tmp_path_factory.mktemp(family)
        out = result.save(root / "out")
        runs[family] = dict(model=model, before=before, result=result, root=root, out=out)
    jobs = [[str(r["out"]), get_adapter(r["model"]).layers_path] for r in runs.values()]
    subprocess.run([sys.executable, "-c", RELOAD, json.dumps(jobs), json.dumps(RELOAD_IDS.tolist())], check=True)
    return runs


@pytest.mark.parametrize("family", FAMILIES)
def test_prune_save_reload_plain_transformers(family, saved_families):
    run = saved_families[family]
    model, result, out = run["model"], run["result"], run["out"]
    # the caller's model is bit-identical
    assert get_adapter(model).layers(model).__len__() == 6
    for k, v in model.state_dict().items():
        assert torch.equal(v, run["before"][k]), k
    assert len(result.removed) == 2 and sorted(result.removed + result.kept) == list(range(6))
    assert result.model.config.num_hidden_layers == 4
    assert sorted(p.name for p in run["root"].iterdir()) == ["out"]  # no temporary directory left
    with safe_open(str(out / "model.safetensors"), "pt") as fh:
        keys = list(fh.keys())
    embed_key = next(n for n, p in result.model.named_parameters() if p is result.model.get_input_embeddings().weight)
    assert embed_key in keys and not any(k.startswith("lm_head") for k in keys)  # tied: saved once
    got = torch.load(out / "reloaded.pt")
    with torch.no_grad():
        want = result.model(RELOAD_IDS).logits
    torch.testing.assert_close(got["logits"], want, rtol=0, atol=0)
    assert torch.equal(got["cached"], got["plain"]) and got["cached"].shape[1] == 24
    assert got["tied"] and got["layer_idx"] == [[0], [1], [2], [3]]
    assert got["num_hidden_layers"] == 4 and got["num_layers"] == 4
    dense_types = getattr(model.config, "layer_types", None)
    if dense_types is not None:  # per-layer lists trimmed in step with the layers
        assert got["layer_types"] == [dense_types[i] for i in result.kept]
    report = json.loads((out / "gradmap_report.json").read_text())
    assert report["removed_layers"] == sorted(result.removed)
    assert len(report["steps"]) == 2 and len(report["steps"][0]["scores"]) == 6
    assert report["environment"]["packages"]["torch"] == torch.__version__.split("+")[0] or \
        report["environment"]["packages"]["torch"].startswith(torch.__version__.split("+")[0])
    assert (out / "gradmap_scores.png").stat().st_size > 1000


def test_inplace_prunes_caller_model():
    model = tiny_model("llama")
    result = prune(model, random_calibration(nsamples=4), num_layers=1, compensate_mode="max-shift", inplace=True)
    assert result.model is model and model.config.num_hidden_layers == 5


def test_steps_remove_lowest_score_and_report_original_indices():
    model = tiny_model("qwen2")
    result = prune(model, random_calibration(nsamples=4), num_layers=3, compensate_mode="none", protected=[0],
                   verify_top=0)  # the paper's metric alone: each step removes its lowest
    for step in result.selection.steps:
        candidates = {k: v for k, v in step.scores.items() if k != 0}
        assert step.removed == min(candidates, key=candidates.get)
    assert 0 in result.kept
    # scores of a later step are keyed by original indices of the still-present layers
    assert set(result.selection.steps[1].scores) == set(range(6)) - {result.removed[0]}


def test_deterministic():
    a = prune(tiny_model("llama"), random_calibration(nsamples=4), num_layers=2)
    b = prune(tiny_model("llama"), random_calibration(nsamples=4), num_layers=2)
    assert a.removed == b.removed
    for (k, v), (_, w) in zip(a.model.state_dict().items(), b.model.state_dict().items()):
        assert torch.equal(v, w), k


@pytest.mark.parametrize("kwargs,message", [
    (dict(num_layers=6), "num_layers: must be between 1 and 5"),
    (dict(num_layers=0), "num_layers: must be between 1 and 5"),
    (dict(ratio=1.0), r"ratio: must be in \(0, 1\)"),
    (dict(ratio=0.01), "rounds to 0 layers"),
    (dict(num_layers=2, ratio=0.5), "exactly one of num_layers or ratio"),
    (dict(num_layers=2, metric="fisher"), "metric: 'fisher' is not one of"),
    (dict(num_layers=2, compensate_mode="lora"), "compensate: 'lora' is not one of"),
    (dict(num_layers=3, protected=[0, 1, 2, 3]), "leave 2 removable, fewer than the target 3"),
    (dict(num_layers=1, protected=[9]), r"protected: indices \[9\] out of range"),
])
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        prune(tiny_model("llama"), random_calibration(), **kwargs)


def test_seqlen_above_model_limit():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="seqlen: 200 exceeds the model.s maximum sequence length 128"):
        prune(model, random_calibration(nsamples=2, seqlen=200), num_layers=1)


def test_meta_model_refused():
    with torch.device("meta"):
        model = tiny_model("llama")
    with pytest.raises(ValueError, match="meta device"):
        prune(model, random_calibration(), num_layers=1)


def test_output_dir_checks(tmp_path):
    (tmp_path / "exists").mkdir()
    with pytest.raises(FileExistsError, match="already exists; pass overwrite=True"):
        check_output_dir(tmp_path / "exists")
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError):
        check_output_dir(tmp_path / "file", overwrite=True)


def test_failed_save_leaves_nothing_and_keeps_old(tmp_path):
    model = tiny_model("llama")

    def boom(path):
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        save_checkpoint(model, None, tmp_path / "new", extra={"report.json": boom})
    assert list(tmp_path.iterdir()) == []
    old = tmp_path / "old"
    old.mkdir()
    (old / "marker").write_text("keep me")
    (old / "gradmap_report.json").write_text("{}")
    with pytest.raises(RuntimeError):
        save_checkpoint(model, None, old, overwrite=True, extra={"report.json": boom})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old"]
    assert (old / "marker").read_text() == "keep me"
    save_checkpoint(model, None, old, overwrite=True)
    assert not (old / "marker").exists() and (old / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old"]


def test_overwrite_refuses_non_gradmap_directory(tmp_path):
    """--overwrite once replaced any directory (a user's source tree was deleted); now only gradmap output."""
    victim = tmp_path / "src"
    victim.mkdir()
    (victim / "thesis.tex").write_text("precious")
    with pytest.raises(FileExistsError, match="not a gradmap checkpoint"):
        check_output_dir(victim, overwrite=True)
    assert (victim / "thesis.tex").read_text() == "precious"
    check_output_dir(tmp_path / "a" / "b" / "out")  # a missing parent is fine and is not created by the check
    assert not (tmp_path / "a").exists()
