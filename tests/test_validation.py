"""Bad input gets a named error before any long work: API (ValueError/...) and CLI (exit 2, one line, no traceback)."""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch

import gradmap.api
import gradmap.checkpoint
import gradmap.cli
import gradmap.methods.gradmap
from conftest import SAMPLE_TEXT, random_calibration, tiny_model
from gradmap import prune
from gradmap.checkpoint import MARKER, save_checkpoint
from gradmap.cli import build_parser, main
from gradmap.compensation import compensate
from gradmap.compensation.fit import Spectrum, conditioned_ridge
from gradmap.data import load_text, split_point
from gradmap.validation import ModelLimits, check_prune_plan
from test_compensation import stage2


@pytest.fixture(scope="module")
def dirs(tmp_path_factory, tiny_tokenizer):
    root = tmp_path_factory.mktemp("validation")
    model = tiny_model("llama")
    model.save_pretrained(root / "tiny")
    tiny_tokenizer.save_pretrained(root / "tiny")
    (root / "calib.txt").write_text(SAMPLE_TEXT, encoding="utf-8")
    (root / "config_only").mkdir()
    model.config.save_pretrained(root / "config_only")
    (root / "no_tokenizer").mkdir()
    model.save_pretrained(root / "no_tokenizer")
    (root / "gguf").mkdir()
    model.config.save_pretrained(root / "gguf")
    (root / "gguf" / "model.Q4_1.gguf").write_bytes(b"GGUF")
    (root / "quantized").mkdir()
    model.save_pretrained(root / "quantized")
    tiny_tokenizer.save_pretrained(root / "quantized")
    cfg = json.loads((root / "quantized" / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (root / "quantized" / "config.json").write_text(json.dumps(cfg))
    (root / "bert").mkdir()
    from transformers import BertConfig, BertModel
    BertModel(BertConfig(vocab_size=96, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32)).save_pretrained(root / "bert")
    tiny_tokenizer.save_pretrained(root / "bert")
    (root / "existing").mkdir()
    return root


def _unwritable(root) -> str:
    if os.geteuid() == 0:  # root writes anywhere mode bits forbid; /proc/1 refuses even root
        return "/proc/1/gradmap-out"
    locked = root / "locked"
    locked.mkdir(exist_ok=True)
    locked.chmod(0o500)
    return str(locked / "out")


PRUNE_CASES = [  # (flag overrides, message); every one must fail before the model is loaded
    ({"--model": "/nonexistent/model"}, "model: path '/nonexistent/model' does not exist"),
    ({"--model": "{root}/config_only"}, "holds a config.json but no weights"),
    ({"--model": "{root}/no_tokenizer"}, "holds no tokenizer"),
    ({"--model": "{root}/gguf"}, "holds a GGUF file (model.Q4_1.gguf)"),
    ({"--model": "{root}/quantized"}, "is quantized (quant_method 'bitsandbytes')"),
    ({"--model": "{root}/bert"}, "unsupported architecture model_type='bert'"),
    ({"--num-layers": "6"}, "--num-layers: must be between 1 and 5 for a model with 6 decoder layers, got 6"),
    ({"--num-layers": "0"}, "--num-layers: must be between 1 and 5"),
    ({"--num-layers": None, "--ratio": "1.5"}, "--ratio: must be in (0, 1), got 1.5"),
    ({"--num-layers": None, "--ratio": "0"}, "--ratio: must be in (0, 1), got 0.0"),
    ({"--num-layers": "2", "--protected": "0,1,2,3,4"}, "--protected: 5 protected layers leave 1 removable"),
    ({"--protected": "7"}, "--protected: indices [7] out of range [0, 5]"),
    ({"--seqlen": "4096"}, "--seqlen: 4096 exceeds the model's maximum sequence length 128"),
    ({"--seqlen": "1"}, "--seqlen: must be >= 2"),
    ({"--nsamples": "1"}, "--nsamples: stage 2 (compensate='every-gap') needs at least 2 calibration windows"),
    ({"--nsamples": "0"}, "--nsamples: must be >= 1"),
    ({"--ridge": "-1"}, "--ridge: must be a finite number >= 0"),
    ({"--ridge": "nan"}, "--ridge: must be a finite number >= 0"),
    ({"--ridge": "inf"}, "--ridge: must be a finite number >= 0"),
    ({"--micro-batch": "0"}, "--micro-batch: must be >= 1, got 0"),
    ({"--threads": "-1"}, "--threads: must be >= 1"),
    ({"--device": "foo"}, "--device: 'foo' is not a torch device"),
    ({"--device": "cuda"}, "--device: 'cuda' requested but CUDA is not available"),
    ({"--dtype": "int8"}, "dtype: 'int8' is not supported"),
    ({"--text": "/nonexistent.txt"}, "--text: file '/nonexistent.txt' does not exist"),
    ({"--eval-text": "/nonexistent.txt", "--no-eval": None}, "--eval-text: file '/nonexistent.txt' does not exist"),
    ({"--eval-seqlen": "4096", "--no-eval": None}, "--eval-seqlen: 4096 exceeds the model's maximum sequence length"),
    ({"--eval-tokens": "1", "--no-eval": None}, "--eval-tokens: must be 0 (all tokens) or >= 2"),
    ({"--output": "{root}/existing"}, "already exists; pass --overwrite"),
    ({"--output": "{unwritable}"}, "is not writable"),
]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the --device cuda case needs a machine without CUDA")
@pytest.mark.parametrize("overrides,message", PRUNE_CASES)
def test_cli_prune_bad_input_before_load(dirs, capsys, monkeypatch, overrides, message):
    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the bad input was found")

    monkeypatch.setattr(gradmap.cli, "prune", no_load)
    monkeypatch.setattr(gradmap.cli, "load_model", no_load)
    flags = {"--model": "{root}/tiny", "--text": "{root}/calib.txt", "--eval-text": "{root}/calib.txt",
             "--num-layers": "1", "--nsamples": "4", "--seqlen": "16", "--eval-seqlen": "32",
             "--output": "{root}/out", "--no-eval": True}
    flags.update(overrides)
    args = ["prune", "-q"]
    for flag, value in flags.items():
        if value is None:
            continue
        if value is True:
            args.append(flag)
        else:
            args += [flag, value.format(root=dirs, unwritable=_unwritable(dirs))]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("gradmap: error: ") and err.count("\n") == 1, err
    assert message in err
    assert not (dirs / "out").exists()


@pytest.mark.parametrize("args,message", [
    (["eval", "--stride", "0"], "--stride: must be in [1, --seqlen=32]"),
    (["eval", "--stride", "33"], "--stride: must be in [1, --seqlen=32]"),
    (["eval", "--seqlen", "4096"], "--seqlen: must be in [2, 128]"),
    (["eval", "--tokens", "1"], "--tokens: must be 0 (all tokens) or >= 2"),
    (["score", "--seqlen", "4096"], "--seqlen: 4096 exceeds the model's maximum sequence length 128"),
    (["score", "--nsamples", "0"], "--nsamples: must be >= 1"),
    (["score", "--threads", "0"], "--threads: must be >= 1"),
])
def test_cli_eval_score_bad_input(dirs, capsys, args, message):
    base = ["--model", str(dirs / "tiny"), "--text", str(dirs / "calib.txt"), "-q"]
    if args[0] == "eval" and "--seqlen" not in args:
        base += ["--seqlen", "32"]
    assert main(args + base) == 2
    err = capsys.readouterr().err
    assert err.startswith("gradmap: error: ") and err.count("\n") == 1 and message in err, err


def test_cli_ctrl_c_exits_130(dirs, capsys, monkeypatch):
    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(gradmap.cli, "load_model", interrupted)
    assert main(["eval", "--model", str(dirs / "tiny"), "--text", str(dirs / "calib.txt"), "--seqlen", "32",
                 "-q"]) == 130
    assert capsys.readouterr().err == "gradmap: interrupted\n"


def test_cli_bad_input_in_subprocess_has_no_traceback(dirs):
    """The real entry point: one line on stderr, exit 2 (the in-process tests above cannot see a traceback)."""
    run = subprocess.run([sys.executable, "-m", "gradmap", "prune", "--model", str(dirs / "tiny"), "--num-layers",
                          "1", "--device", "foo", "--output", str(dirs / "o2"), "-q"],
                         capture_output=True, text=True, env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert run.returncode == 2
    assert run.stderr.strip().splitlines() == ["gradmap: error: --device: 'foo' is not a torch device; accepted: "
                                               "cpu, cuda, cuda:N, mps"]


def test_api_stage2_and_ridge_checked_before_scoring(monkeypatch):
    def no_scoring(*a, **k):
        raise AssertionError("scoring ran before the bad argument was found")

    monkeypatch.setattr(gradmap.api, "select_layers", no_scoring)
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="nsamples: stage 2 .* needs at least 2 calibration windows"):
        prune(model, random_calibration(nsamples=1), num_layers=1)
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="ridge: must be a finite number >= 0"):
            prune(model, random_calibration(), num_layers=1, ridge=bad)
    with pytest.raises(ValueError, match="micro_batch: must be >= 1"):
        prune(model, random_calibration(), num_layers=1, micro_batch=0)
    with pytest.raises(ValueError, match="eval_seqlen: 4096 exceeds"):
        prune(model, random_calibration(), num_layers=1, eval_tokens=torch.arange(10), eval_seqlen=4096)


def test_conditioned_ridge_hand_case():
    G = Spectrum.of(torch.diag(torch.tensor([4.0, 1.0, 0.0], dtype=torch.float64)))  # singular; mean diag 5/3
    assert conditioned_ridge(G, 0.1) == (0.1, pytest.approx((4 + 1 / 6) / (1 / 6)))  # cond 25 already fine
    lam, cond = conditioned_ridge(G, 0.0, max_condition=1e4)
    # from 1e-8 up by 10x: cond(λ) = (4 + 5λ/3) / (5λ/3) <= 1e4 first at λ = 1e-3 (cond 2401)
    assert lam == pytest.approx(1e-3) and cond == pytest.approx((4 + 5e-3 / 3) / (5e-3 / 3))
    assert Spectrum.of(torch.zeros(3, 3)) is None
    assert conditioned_ridge(None, 0.1) == (None, float("inf"))


def test_ill_conditioned_gram_raises_ridge_and_reports():
    """16 fit tokens for a 32-wide Gram matrix: singular at ridge 0, so the ridge is raised and the note says so.

    All windows now feed the Gram matrix (2 windows of 8 tokens; cross-validated over 2 folds)."""
    with stage2(random_calibration(nsamples=2, seqlen=8), groups=2) as (model, engine, traj, dense):
        result = compensate(traj, dense, mode="every-gap", ridge=0.0)
    assert any("ill-conditioned Gram matrix: ridge 0 raised to" in n for n in result.notes), result.notes
    fit = result.fits[0]
    assert fit.loss_after <= fit.loss_before  # never a fold that raises the cross-validated loss


def test_fp16_overflow_in_gram_detected():
    with stage2(random_calibration(nsamples=4), groups=2) as (model, engine, traj, dense):
        # down_proj outputs that overflow to inf, as fp16 activations do
        engine.set_overrides(1, {"mlp.down_proj.weight": torch.full((32, 64), 3e38)})
        with pytest.raises(ValueError, match="Gram matrix of layer 1 holds NaN/inf.*bfloat16 or float32"):
            compensate(traj, dense, mode="every-gap")


def test_user_text_split_for_calibration_and_test(tmp_path):
    text = "".join(f"line {i}\n" for i in range(100))
    path = tmp_path / "t.txt"
    path.write_text(text)
    cut = split_point(text)
    assert text[cut - 1] == "\n" and int(0.8 * len(text)) <= cut
    calib, test = load_text(path, "calibration"), load_text(path, "test")
    # 790 characters (10 lines of 7, 90 of 8); 80 % = character 632, inside "line 80" (characters 630..637)
    assert cut == 638
    assert calib + test == text and calib.endswith("line 80\n") and test.startswith("line 81\n")
    assert load_text(path, "all") == text


def test_stale_partial_dirs_cleaned_only_if_ours(tmp_path):
    model = tiny_model("llama")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / ".out.tmp-abc"
    stale.mkdir()
    (stale / MARKER).write_text(json.dumps({"host": socket.gethostname(), "pid": int(dead.stdout)}))
    live = tmp_path / ".out.tmp-live"
    live.mkdir()
    (live / MARKER).write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid()}))
    foreign = tmp_path / ".out.tmp-user"
    foreign.mkdir()  # no marker: not ours
    out = save_checkpoint(model, None, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.tmp-live", ".out.tmp-user", "out"]
    mask = os.umask(0)
    os.umask(mask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~mask and not (out / MARKER).exists()


def test_resume_after_interruption_removes_same_layers(tmp_path, monkeypatch):
    cal = random_calibration(nsamples=4)
    full = prune(tiny_model("llama"), cal, num_layers=3, compensate_mode="none", metric="taylor")
    state = tmp_path / "state.json"
    real = gradmap.methods.gradmap.layer_scores
    calls = []

    def interrupt_third(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(gradmap.methods.gradmap, "layer_scores", interrupt_third)
    with pytest.raises(KeyboardInterrupt):
        prune(tiny_model("llama"), cal, num_layers=3, compensate_mode="none", metric="taylor", resume=state)
    assert [s["removed"] for s in json.loads(state.read_text())["steps"]] == full.removed[:2]
    calls.clear()
    monkeypatch.setattr(gradmap.methods.gradmap, "layer_scores", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    resumed = prune(tiny_model("llama"), cal, num_layers=3, compensate_mode="none", metric="taylor", resume=state)
    assert len(calls) == 1  # only the third decision was scored
    assert resumed.removed == full.removed
    for (k, v), w in zip(resumed.model.state_dict().items(), full.model.state_dict().values()):
        assert torch.equal(v, w), k
    assert [s.scores for s in resumed.selection.steps] == [s.scores for s in full.selection.steps]

    with pytest.raises(ValueError, match="differs in: calibration"):
        prune(tiny_model("llama"), random_calibration(nsamples=4, seed=9), num_layers=3, compensate_mode="none",
              metric="taylor", resume=state)
    with pytest.raises(ValueError, match="differs in: model"):
        prune(tiny_model("llama", seed=3), cal, num_layers=3, compensate_mode="none", metric="taylor", resume=state)
    with pytest.raises(ValueError, match=r"differs in: setting metric \('taylor' recorded, 'grad_l1' now\)"):
        prune(tiny_model("llama"), cal, num_layers=3, compensate_mode="none", metric="grad_l1", resume=state)


KILLED_SAVE = """
import sys, time
sys.path.insert(0, "tests")
from conftest import tiny_model
from gradmap.checkpoint import save_checkpoint
out, flag = sys.argv[1], sys.argv[2]
def hang(path):
    open(flag, "w").write("weights written")
    time.sleep(120)
save_checkpoint(tiny_model("llama"), None, out, extra={"gradmap_report.json": hang})
"""


def test_sigkill_mid_save_leaves_no_output_and_next_save_cleans(tmp_path):
    import signal
    import time
    flag = tmp_path / "flag"
    proc = subprocess.Popen([sys.executable, "-c", KILLED_SAVE, str(tmp_path / "out"), str(flag)],
                            env={**os.environ, "PYTHONPATH": os.getcwd()})
    try:
        for _ in range(1200):
            if flag.exists() or proc.poll() is not None:
                break
            time.sleep(0.1)
        assert flag.exists(), "the save never reached the report writer"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not (tmp_path / "out").exists()
    leftovers = [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp-")]
    assert len(leftovers) == 1 and (leftovers[0] / MARKER).is_file()  # hidden, marked, never read as a checkpoint
    save_checkpoint(tiny_model("llama"), None, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["flag", "out"]


def test_exception_while_writing_shards_leaves_nothing(tmp_path, monkeypatch):
    model = tiny_model("llama")
    original = gradmap.checkpoint.save_file
    written = []

    def half_then_fail(tensors, path, *a, **k):
        original(tensors, path, *a, **k)  # one shard is on disk ...
        written.append(path)
        if len(written) == 2:
            raise OSError("No space left on device")  # ... then the disk fills up

    monkeypatch.setattr(gradmap.checkpoint, "save_file", half_then_fail)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(model, None, tmp_path / "out", max_shard_size="20KB")
    assert len(written) == 2 and list(tmp_path.iterdir()) == []


def test_same_seed_bit_identical_saved_weights(tmp_path):
    from safetensors.torch import load_file
    paths = []
    for run in ("a", "b"):
        r = prune(tiny_model("qwen2"), random_calibration(nsamples=8, seed=3), num_layers=2, seed=7)
        paths.append(r.save(tmp_path / run))
        removed = r.removed
    a, b = (load_file(str(p / "model.safetensors")) for p in paths)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ra, rb = (json.loads((p / "gradmap_report.json").read_text()) for p in paths)
    assert ra["removed_layers"] == rb["removed_layers"] == sorted(removed)


def test_cli_resume_after_ctrl_c(dirs, tmp_path, capsys, monkeypatch):
    base = ["prune", "--model", str(dirs / "tiny"), "--text", str(dirs / "calib.txt"), "--num-layers", "2",
            "--nsamples", "4", "--seqlen", "16", "--compensate", "none", "--no-eval", "-q"]
    assert main(base + ["--output", str(tmp_path / "full")]) == 0
    full = json.loads((tmp_path / "full" / "gradmap_report.json").read_text())
    real = gradmap.methods.gradmap.layer_scores
    calls = []

    def ctrl_c_second(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(gradmap.methods.gradmap, "layer_scores", ctrl_c_second)
    out = tmp_path / "out"
    assert main(base + ["--output", str(out)]) == 130
    state = tmp_path / ".out.gradmap-state.json"
    assert state.is_file() and not out.exists()
    monkeypatch.setattr(gradmap.methods.gradmap, "layer_scores", real)
    # rerunning without --resume keeps the saved progress and says how to continue or discard it
    assert main(base + ["--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--resume" in err and "--restart" in err and state.is_file()
    assert main(base + ["--output", str(out), "--resume"]) == 0
    assert json.loads((out / "gradmap_report.json").read_text())["removal_order"] == full["removal_order"]
    assert not state.exists()
    capsys.readouterr()


def test_resume_only_for_gradmap_method(tmp_path, dirs):
    with pytest.raises(ValueError, match="resume: only method 'gradmap' records resumable decisions, got method 'sleb'"):
        prune(tiny_model("llama"), random_calibration(nsamples=4), num_layers=1, method="sleb",
              compensate_mode="none", resume=tmp_path / "state.json")
    code = main(["prune", "--model", str(dirs / "tiny"), "--num-layers", "1", "--method", "sleb", "--resume",
                 "--output", str(tmp_path / "out")])
    assert code == 2 and not (tmp_path / "out").exists()


def test_replaceme_compensation_passes_the_plan_check():
    limits = ModelLimits("llama", 6, 128)
    assert check_prune_plan(limits, num_layers=2, nsamples=4, compensate="replaceme") == 2
    with pytest.raises(ValueError, match="compensate: 'nope' is not one of none, max-shift, every-gap, trained, replaceme"):
        check_prune_plan(limits, num_layers=2, compensate="nope")


def test_cli_refuses_protected_lists_with_gaps_or_repeats_and_empty_output(tmp_path, capsys):
    for value in ("0,,1", "1,1", ",", "a"):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["prune", "--ratio", "0.25", "--output", str(tmp_path / "o"),
                                       "--protected", value])
        assert "--protected" in capsys.readouterr().err
    assert build_parser().parse_args(["prune", "--ratio", "0.25", "--output", "o", "--protected", "0, 29"]
                                     ).protected == [0, 29]
    assert main(["prune", "--ratio", "0.25", "--output", ""]) == 2
    assert "gradmap: error: --output: empty path" in capsys.readouterr().err
    assert main(["prune", "--ratio", "0.25", "--output", str(tmp_path), "--text", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "--output:" in err and "already exists" in err and "--overwrite" in err
    assert main(["prune", "--ratio", "0.25", "--output", str(tmp_path / "new"), "--text", str(tmp_path)]) == 2
    assert f"gradmap: error: --text: {str(tmp_path)!r} is a directory" in capsys.readouterr().err


def test_non_utf8_text_and_ridge_without_compensation_are_named_errors(tmp_path, capsys):
    binary = tmp_path / "bin.txt"
    binary.write_bytes(bytes(range(128, 256)) * 40)
    assert main(["prune", "--ratio", "0.25", "--output", str(tmp_path / "o"), "--text", str(binary)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("gradmap: error: --text: file") and "is not UTF-8 text" in err and err.count("\n") == 1
    assert main(["prune", "--ratio", "0.25", "--output", str(tmp_path / "o"), "--compensate", "none",
                 "--ridge", "0.1"]) == 2
    assert "gradmap: error: --ridge: has no effect with --compensate none" in capsys.readouterr().err
