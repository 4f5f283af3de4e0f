"""What a new user hits (issue list "found when the project was tried as a new user would"): each item with the
fixed behaviour asserted. Every refusal is one line ``gradmap: error: ...`` naming the flag, exit 2, before any
weight is read (``gradmap.cli.prune`` / ``load_model`` are replaced by a tripwire where that matters)."""

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import gradmap.cli
from transformers import AutoModelForCausalLM

from conftest import CONFIGS, SAMPLE_TEXT, tiny_model
from gradmap.api import scores_title
from gradmap.cli import _output_lock, main
from gradmap.data import Calibration
from gradmap.engine import Engine, Windows
from gradmap.methods.blockpruner import select_blockpruner
from gradmap.zeroshot import evaluate_zero_shot

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def model_dir(tmp_path, tiny_tokenizer):
    path = tmp_path / "tiny"
    tiny_model("llama").save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    (tmp_path / "calib.txt").write_text(SAMPLE_TEXT, encoding="utf-8")
    return path


@pytest.fixture
def tripwire(monkeypatch):
    def loaded(*a, **k):
        raise AssertionError("the model's weights were read before the bad input was found")

    monkeypatch.setattr(gradmap.cli, "prune", loaded)
    monkeypatch.setattr(gradmap.cli, "load_model", loaded)


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("gradmap: error: ") and err.count("\n") == 1, err
    return err


def base(model_dir, tmp_path, *extra):
    return ["prune", "--model", str(model_dir), "--text", str(tmp_path / "calib.txt"), "--nsamples", "2",
            "--seqlen", "16", "--num-layers", "1", "--no-eval", "-q", *extra]


def test_output_onto_the_input_model_is_refused(model_dir, tmp_path, capsys, tripwire):
    assert main(base(model_dir, tmp_path, "--output", str(model_dir), "--overwrite")) == 2
    assert "--output:" in one_line_error(capsys) and (model_dir / "config.json").is_file()
    assert main(base(model_dir, tmp_path, "--output", str(model_dir / "inside"))) == 2
    assert "input model's directory" in one_line_error(capsys)


def test_a_second_run_into_the_same_output_is_refused_at_once(model_dir, tmp_path, capsys, tripwire):
    out = tmp_path / "out"
    with _output_lock(str(out)):
        assert main(base(model_dir, tmp_path, "--output", str(out))) == 2
    assert "another gradmap run is writing" in one_line_error(capsys)
    assert not any(p.name.startswith(".out.gradmap-lock") for p in tmp_path.iterdir())  # released, removed


def test_fused_backend_on_gpt2_names_the_flag(tmp_path, tiny_tokenizer, capsys, tripwire):
    path = tmp_path / "gpt2"
    tiny_model("gpt2").save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    (tmp_path / "calib.txt").write_text(SAMPLE_TEXT, encoding="utf-8")
    assert main(base(path, tmp_path, "--metric", "taylor", "--backend", "fused", "--output", str(tmp_path / "o"))) == 2
    err = one_line_error(capsys)
    assert "--backend: fused needs nn.Linear projections" in err and "--backend hooks" in err


def test_verify_top_beyond_the_layer_count_is_refused(model_dir, tmp_path, capsys, tripwire):
    assert main(base(model_dir, tmp_path, "--verify-top", "100", "--output", str(tmp_path / "o"))) == 2
    assert "--verify-top: 100 is more than the model's 6 decoder layers" in one_line_error(capsys)


def test_verify_check_options_are_validated(model_dir, tmp_path, capsys, tripwire):
    for extra, message in ((["--verify-top", "0", "--verify-windows", "2"],
                            "--verify-windows/--verify-margin: apply to the loss check"),
                           (["--verify-windows", "0"], "--verify-windows: need 1 <="),  # the default check's flag
                           (["--verify-top", "0", "--verify-extend"], "--verify-extend: applies to the loss check"),
                           (["--verify-top", "3", "--verify-windows", "0"], "--verify-windows: need 1 <="),
                           (["--verify-top", "3", "--verify-margin", "-1"], "--verify-margin: must be a finite")):
        assert main(base(model_dir, tmp_path, *extra, "--output", str(tmp_path / "o"))) == 2
        assert message in one_line_error(capsys)


def test_errors_name_cli_flags_not_api_arguments(model_dir, tmp_path, capsys, tripwire):
    assert main(["prune", "--model", str(tmp_path / "nope"), "--num-layers", "1", "--output",
                 str(tmp_path / "o")]) == 2
    assert one_line_error(capsys).startswith("gradmap: error: --model: path")
    assert main(["eval", "--model", str(model_dir), "--tasks", "piqa,nope", "--no-ppl"]) == 2
    assert one_line_error(capsys).startswith("gradmap: error: --tasks:")
    state = tmp_path / ".o.gradmap-state.json"
    state.write_text("{}")
    assert main(base(model_dir, tmp_path, "--output", str(tmp_path / "o"), "--resume")) == 2
    assert one_line_error(capsys).startswith("gradmap: error: --resume:")


def test_argparse_errors_are_one_line(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["prune", "--ratio", "half", "--output", "o"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("gradmap: error: argument --ratio: invalid float value")


def test_checks_that_need_the_tokenizer_come_before_the_weights(model_dir, tmp_path, capsys, tripwire):
    assert main(base(model_dir, tmp_path, "--nsamples", "100000", "--output", str(tmp_path / "o"))) == 2
    assert "--nsamples: 100000 windows of 16 tokens requested but the text holds only" in one_line_error(capsys)
    short = tmp_path / "short.txt"
    short.write_text("the cat sat\n" * 2, encoding="utf-8")
    args = base(model_dir, tmp_path, "--output", str(tmp_path / "o"), "--seqlen", "120")
    args[args.index("--text") + 1] = str(short)
    assert main(args) == 2
    assert "--text: calibration text has" in one_line_error(capsys)


def test_eval_zero_shot_only_ignores_the_ppl_seqlen(model_dir, capsys, monkeypatch):
    class Fake:
        def as_dict(self):
            return {"average": 0.5}

    seen = {}
    monkeypatch.setattr(gradmap.cli, "evaluate_zero_shot", lambda *a, **k: seen.setdefault("ran", Fake()))
    assert main(["eval", "--model", str(model_dir), "--tasks", "piqa", "--no-ppl", "--seqlen", "4096", "--json",
                 "-q"]) == 0
    assert "ran" in seen and json.loads(capsys.readouterr().out)["perplexity"] is None


def test_bf16_on_a_cpu_without_bf16_hardware_warns(model_dir, caplog, monkeypatch, capsys):
    monkeypatch.setattr(gradmap.cli, "_bf16_hardware", lambda: False)
    with caplog.at_level(logging.WARNING, logger="gradmap"):
        assert main(["plan", "--model", str(model_dir), "--num-layers", "1", "--dtype", "bfloat16",
                     "--device", "cpu", "--seqlen", "16", "--eval-seqlen", "32"]) == 0
    assert any("emulated" in r.getMessage() and "--dtype float32" in r.getMessage() for r in caplog.records)
    capsys.readouterr()


def test_scores_plot_title_says_what_decided_each_removal():
    assert scores_title("gradmap", "grad_update_norm") == "grad_update_norm scores (lower = removed first)"
    title = scores_title("gradmap", "grad_update_norm", verify_top=3)
    assert "lower = removed first" not in title and "the 3 lowest" in title and "calibration loss" in title
    assert scores_title("sleb", None) == "sleb scores (lower = removed first)"


def test_blockpruner_target_spent_on_sub_blocks_says_so_clearly():
    model = tiny_model("llama")
    with torch.no_grad():  # three attention sub-blocks that add nothing: BlockPruner takes them first
        for i in (1, 2, 4):
            model.model.layers[i].self_attn.o_proj.weight.zero_()
        model.lm_head.weight.mul_(20.0)  # peaked predictions on the model's own continuations: every real
    prefix = torch.randint(3, 96, (4, 2), generator=torch.Generator().manual_seed(1))  # sub-block matters
    out = model.generate(prefix, attention_mask=torch.ones_like(prefix), max_new_tokens=14, do_sample=False,
                         pad_token_id=0)
    cal = Calibration(out, torch.ones_like(out))
    with Engine.for_module(model) as engine:
        sel = select_blockpruner(engine.trajectory(Windows.from_calibration(cal, 4)), 1)
    assert sel.removed == [] and sorted(sel.extra["zeroed_sub_blocks"]) == ["1.attn", "2.attn", "4.attn"]
    assert "removed NO whole decoder layer" in sel.extra["note"] and "raise --num-layers" in sel.extra["note"]


def test_pruning_a_pruned_output_records_the_chain(model_dir, tmp_path, capsys):
    text = str(tmp_path / "calib.txt")
    common = ["--text", text, "--nsamples", "4", "--seqlen", "16", "--no-eval", "-q", "--no-speed",
              "--compensate", "none"]
    assert main(["prune", "--model", str(model_dir), "--num-layers", "2", *common, "--output",
                 str(tmp_path / "first")]) == 0
    assert main(["prune", "--model", str(tmp_path / "first"), "--num-layers", "1", *common, "--output",
                 str(tmp_path / "second")]) == 0
    first = json.loads((tmp_path / "first" / "gradmap_report.json").read_text())
    second = json.loads((tmp_path / "second" / "gradmap_report.json").read_text())
    assert len(second["lineage"]) == 1 and second["lineage"][0]["kept_layers"] == first["kept_layers"]
    original = [first["kept_layers"][i] for i in second["removed_layers"]]
    assert second["removed_layers_original"] == original
    assert sorted(second["kept_layers_original"] + original + first["removed_layers"]) == list(range(6))
    assert [s["step"] for s in second["steps"]] == [1]  # steps are counted from 1, as in the logs and the plot
    assert "in the original dense model of this chain" in capsys.readouterr().out


def test_zero_shot_prints_no_git_noise(tmp_path, tiny_tokenizer, capfd, monkeypatch):
    config = CONFIGS["llama"]()
    config.max_position_embeddings = 2048
    model = AutoModelForCausalLM.from_config(config).eval()
    monkeypatch.chdir(tmp_path)  # not a git checkout: lm-eval's `git describe` would print "fatal: ..."
    evaluate_zero_shot(model, tiny_tokenizer, "piqa", limit=2)
    assert "not a git repository" not in capfd.readouterr().err


def test_quick_start_output_is_git_ignored():
    ignored = subprocess.run(["git", "check-ignore", "-q", "pruned-smollm2/config.json"], cwd=ROOT)
    assert ignored.returncode == 0


def test_readme_promises_what_the_code_does():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "methods/prefix" not in readme and "prefix.py" not in readme  # the resumed forwards are the engine's
    assert "gradmap env" in readme  # the bug-report advice asks for it
    code = subprocess.run([sys.executable, "-m", "gradmap", "--help"], capture_output=True, text=True, cwd=ROOT)
    for command in ("prune", "plan", "score", "eval", "export-gguf", "env"):
        assert command in code.stdout
