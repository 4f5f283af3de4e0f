"""benchmarks/compare_methods.py end to end on a tiny model (no zero-shot): every output written, the rows the
settings ask for, resumed searches cheaper than the published full-forward count, cached rows reused on a rerun."""

import csv
import importlib.util
import json
from pathlib import Path

from conftest import tiny_model

ROOT = Path(__file__).resolve().parents[1]


def load_script():
    spec = importlib.util.spec_from_file_location("compare_methods", ROOT / "benchmarks" / "compare_methods.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_compare_methods_tiny(tmp_path, tiny_tokenizer):
    path = tmp_path / "tiny"
    tiny_model("llama").save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    out = tmp_path / "out"
    argv = ["--model", str(path), "--methods", "gradmap,sleb,blockpruner,gromov,gradmap-verify", "--nsamples", "4", "--seqlen", "16",
            "--eval-tokens", "256", "--eval-seqlen", "32", "--zeroshot-limit", "-1", "--ratio", "0.34",
            "--threads", "1", "--out", str(out), "-q"]
    script = load_script()
    assert script.main(argv + ["--selections-only"]) == 0  # selections cached, no row evaluated
    partial = json.loads((out / "compare.json").read_text())
    assert not partial["complete"] and partial["rows"] == []
    assert sum("selection done" in line for line in partial["summary"]) == 5
    assert script.main(argv) == 0
    for name in ("compare.csv", "compare.json", "compare.md", "compare.png"):
        assert (out / name).stat().st_size > 0
    report = json.loads((out / "compare.json").read_text())
    assert report["complete"] and len(report["rows"]) == 2 * 5 + 2  # + GradMAP/trained, Gromov/ReplaceMe
    rows = {(r["method"], r["compensation"]): r for r in report["rows"]}
    # 2 of 6 layers: the first forward, then per decision the recomputed forward and the backward (2) of every layer
    # but the first (the hidden-state metric needs no gradient through layer 0) and a forward resumed after removal
    assert 1 + 2 * 3 * 4 / 6 < rows[("gradmap", "none")]["passes"] < 2 * 4
    sleb = rows[("sleb", "none")]
    assert sleb["published_passes"] == 6 + 5 and 2 < sleb["passes"] < 11
    assert len(rows[("sleb", "none")]["removed"]) == 2
    with open(out / "compare.csv") as fh:
        flat = list(csv.DictReader(fh))
    assert flat[0]["method"] == "dense" and len(flat) == 13
    assert any("full forwards as published" in s for s in report["summary"])
    # rerun: every row comes from the cache (selection wall times unchanged)
    before = {k: r["prune_seconds"] for k, r in rows.items()}
    assert script.main(argv) == 0
    again = {(r["method"], r["compensation"]): r["prune_seconds"]
             for r in json.loads((out / "compare.json").read_text())["rows"]}
    assert again == before
    rows = {(r["method"], r["compensation"]): r for r in json.loads((out / "compare.json").read_text())["rows"]}
    assert rows[("gradmap-verify", "none")]["passes"] > rows[("gradmap", "none")]["passes"]


def test_zero_shot_stderr_and_targets():
    """The average's stderr by hand, per-row item limits, and the target verdicts on made-up rows."""
    script = load_script()
    zs = {"average": 0.5, "tasks": {"a": {"headline": "acc", "acc": 0.4, "acc_stderr": 0.03, "n": 500},
                                    "b": {"headline": "acc_norm", "acc_norm": 0.6, "acc_norm_stderr": 0.04, "n": 300}}}
    assert abs(script.zs_average_stderr(zs) - 0.025) < 1e-12  # sqrt(0.03² + 0.04²) / 2 = 0.05 / 2
    args = script.parse_args(["--zeroshot-limit", "500", "--zeroshot-limit-others", "100"])
    assert script.zs_limit_of("sleb", "none", args) == 500 and script.zs_limit_of("gradmap", "trained", args) == 500
    assert script.zs_limit_of("shortgpt", "every-gap", args) == 100 and script.zs_limit_of("gradmap", "none", args) == 100

    def row(method, comp, ppl, seconds, avg, se):
        z = {"average": avg, "tasks": {"a": {"headline": "acc", "acc": avg, "acc_stderr": se, "n": 500}}}
        return {"method": method, "compensation": comp, "ppl": {"ppl": ppl}, "prune_seconds": seconds, "zeroshot": z}

    rows = [row("gradmap-verify", "every-gap", 50.0, 10.0, 0.50, 0.03), row("sleb", "none", 51.0, 45.0, 0.53, 0.04),
            row("sleb", "every-gap", 50.5, 45.0, 0.52, 0.04)]
    verdicts = script.target_check(rows)
    assert "PASS" in verdicts[0] and "50.50" in verdicts[0]            # 50.0 <= best SLEB 50.5
    assert "4.50x" in verdicts[1] and "PASS" in verdicts[1]            # 45 / 10
    assert "-0.030" in verdicts[2] and "0.050" in verdicts[2] and "PASS" in verdicts[2]  # -0.03 >= -sqrt(.03²+.04²)
    rows[0] = row("gradmap-verify", "every-gap", 50.6, 12.0, 0.46, 0.03)
    verdicts = script.target_check(rows)
    assert all("FAIL" in v for v in verdicts)                          # 50.6 > 50.5; 3.75x; -0.07 < -0.05
    # the time ratios are taken against the shipped default's selection when it is there, else the paper's
    assert script.reference_method(rows) == "gradmap-verify"
    assert script.reference_method([row("gradmap", "none", 60.0, 8.0, 0.5, 0.03)]) == "gradmap"
    # the gradmap-verify row checks as gradmap prune does by default: 4 of 32x256 windows; all of 8x64 (no count)
    assert script.parse_args(["--full"]).verify_windows == 4
    assert script.parse_args([]).verify_windows is None


def test_interrupted_sleb_resumes_from_its_recorded_decisions(tmp_path):
    """A SLEB search cut after its first decision (the partial file holds it) and resumed reaches the removal order of
    an uninterrupted run, with the recorded seconds and passes added to the resumed part."""
    import torch

    from gradmap.data import Calibration

    script = load_script()
    model = tiny_model("llama").eval()
    ids = torch.randint(3, 96, (4, 16), generator=torch.Generator().manual_seed(0))
    cal = Calibration(ids, torch.ones_like(ids), {"source": "random", "nsamples": 4, "seqlen": 16, "seed": 0})
    args = script.parse_args(["--threads", "1", "--micro-batch", "2", "-q"])
    straight = script.run_selection(model, cal, 3, "sleb", args)
    partial = tmp_path / "partial.json"
    first = script.run_selection(model, cal, 1, "sleb", args, partial)   # "interrupted" after one decision
    state = json.loads(partial.read_text())
    assert [d["removed"] for d in state["steps"]] == first["removal_order"] == straight["removal_order"][:1]
    resumed = script.run_selection(model, cal, 3, "sleb", args, partial)
    assert resumed["removal_order"] == straight["removal_order"]
    assert resumed["extra"]["resumed_runs"] == 2
    assert resumed["seconds"] >= state["seconds"] and resumed["passes"] > state["passes"]
    # decisions 2 and 3 re-scored as in the straight run, plus the forward of the layers before the replayed removal
    # (the straight run resumed after it): more than the straight run, by at most one forward of the pruned view
    assert 0 < resumed["passes"] - straight["passes"] <= 1.0


def test_zero_shot_row_resumes_per_task(tmp_path, monkeypatch):
    """A row's zero-shot run restarts at its first unfinished task: finished tasks come from their cached records,
    the merged average is the mean of the tasks' headline metrics, and the per-task records go once merged."""
    script = load_script()
    from gradmap.zeroshot import ZeroShotResult

    calls = []

    def fake_eval(model, tokenizer, tasks, *, limit, batch_size):
        (task,) = tasks
        calls.append((task, limit))
        acc = {"piqa": 0.5, "boolq": 0.75}[task]
        return ZeroShotResult(tasks={task: {"acc": acc, "acc_stderr": 0.01, "acc_norm": None, "acc_norm_stderr": None,
                                            "n": limit, "headline": "acc", "seconds": 2.0}},
                              average=acc, limit=limit, seconds=3.0, versions={"lm_eval": "x"})

    monkeypatch.setattr(script, "materialize_pruned", lambda weights, view: "model")
    monkeypatch.setattr(script, "evaluate_zero_shot", fake_eval)
    cache = script.Cache(tmp_path, fresh=False)
    key = {"row": "r", "zeroshot_limit": 7}
    cache.put("zeroshot-task", dict(key, task="piqa"), {  # piqa finished before the stop, at 0.25
        "tasks": {"piqa": {"acc": 0.25, "acc_stderr": 0.02, "n": 7, "headline": "acc", "seconds": 1.0}},
        "average": 0.25, "limit": 7, "seconds": 1.5, "versions": {"lm_eval": "x"}, "scorer": "shared-context"})
    args = script.parse_args(["--tasks", "piqa,boolq"])
    engine = type("E", (), {"weights": None, "view": None})()
    merged = script.evaluate_zs(engine, None, 7, args, cache, key)
    assert calls == [("boolq", 7)]  # piqa not run again
    assert merged["average"] == (0.25 + 0.75) / 2 and list(merged["tasks"]) == ["piqa", "boolq"]
    assert merged["seconds"] == 1.5 + 3.0 and merged["scorer"] == "shared-context"
    assert cache.get("zeroshot", key)["average"] == (0.25 + 0.75) / 2  # the row's record, written by evaluate_zs
    assert not list((tmp_path / "cache").glob("zeroshot-task-*.json"))
