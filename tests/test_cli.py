"""The gradmap command on a tiny model directory: prune, score, eval, and named errors with exit status 2."""

import json

import pytest

from conftest import SAMPLE_TEXT, tiny_model
from gradmap.cli import main


@pytest.fixture
def model_dir(tmp_path, tiny_tokenizer):
    path = tmp_path / "tiny"
    model = tiny_model("llama")
    model.save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    (tmp_path / "calib.txt").write_text(SAMPLE_TEXT, encoding="utf-8")
    return path


def test_prune_eval_score(model_dir, tmp_path, capsys):
    text = str(tmp_path / "calib.txt")
    out = tmp_path / "pruned"
    args = ["prune", "--model", str(model_dir), "--num-layers", "2", "--text", text, "--eval-text", text,
            "--nsamples", "4", "--seqlen", "16", "--eval-seqlen", "32", "--eval-tokens", "256", "--output", str(out),
            "-q"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "dense" in printed and "pruned" in printed and "compensated" in printed and str(out) in printed
    report = json.loads((out / "gradmap_report.json").read_text())
    assert len(report["removed_layers"]) == 2 and report["settings"]["metric"] == "grad_update_norm"
    assert set(report["perplexity"]) == {"dense", "pruned", "compensated"}

    assert main(args) == 2  # exists, no --overwrite
    assert "already exists" in capsys.readouterr().err
    assert main(args + ["--overwrite"]) == 0
    capsys.readouterr()

    assert main(["eval", "--model", str(out), "--text", text, "--seqlen", "32", "--tokens", "128", "--json", "-q"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["ppl"] == pytest.approx(report["perplexity"]["compensated"]["ppl"], rel=0.5) and r["tokens"] > 0

    assert main(["score", "--model", str(model_dir), "--text", text, "--nsamples", "2", "--seqlen", "16", "--json",
                 "-q"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert len(s["scores"]) == 6 and sorted(s["order"]) == list(range(6))
    # the fused backend gives the same weight-metric scores as the hooks (fp32 reductions, different order)
    runs = {}
    for backend in ("hooks", "fused"):
        assert main(["score", "--model", str(model_dir), "--text", text, "--nsamples", "2", "--seqlen", "16",
                     "--metric", "taylor", "--backend", backend, "--json", "-q"]) == 0
        runs[backend] = json.loads(capsys.readouterr().out)
    assert runs["fused"]["backend"] == "fused"
    assert runs["fused"]["scores"] == pytest.approx(runs["hooks"]["scores"], rel=1e-4)


@pytest.mark.parametrize("extra,message", [
    (["--model", "/nonexistent/model"], "model: path '/nonexistent/model' does not exist"),
    (["--metric", "fisher"], None),  # argparse rejects it (exit 2 via SystemExit)
    (["--num-layers", "6"], "--num-layers: must be between 1 and 5"),
    (["--seqlen", "4096"], "exceeds the model's maximum sequence length 128"),
    (["--nsamples", "100000"], "holds only"),
    (["--text", "/nonexistent.txt"], "--text: file '/nonexistent.txt' does not exist"),
])
def test_bad_input_named_errors(model_dir, tmp_path, capsys, extra, message):
    base = {"--model": str(model_dir), "--text": str(tmp_path / "calib.txt"), "--num-layers": "1",
            "--nsamples": "2", "--seqlen": "16"}
    for flag, value in zip(extra[::2], extra[1::2]):
        base[flag] = value
    args = ["prune", *[x for kv in base.items() for x in kv], "--output", str(tmp_path / "o"), "--no-eval", "-q"]
    if message is None:
        with pytest.raises(SystemExit) as exc:
            main(args)
        assert exc.value.code == 2
        assert "invalid choice: 'fisher'" in capsys.readouterr().err
        return
    assert main(args) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_negative_token_count_refused(model_dir, tmp_path, capsys):
    """A negative --tokens used to slice the stream from the end and evaluate (almost) everything."""
    assert main(["eval", "--model", str(model_dir), "--text", str(tmp_path / "calib.txt"), "--tokens", "-5", "-q"]) == 2
    assert "--tokens: must be >= 0" in capsys.readouterr().err
