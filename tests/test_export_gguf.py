"""GGUF export with llama.cpp's converter, round-tripped through transformers' GGUF loader.

Tiny random-weight models (built in-process, no downloads) with a SentencePiece tokenizer trained in-process: every
family whose converter class reads ``tokenizer.model`` (llama, mistral, qwen2, qwen3, phi3, gemma2, gemma3). The
converter's GPT-2-style BPE route only accepts tokenizers whose pre-tokenizer hash llama.cpp knows, which a tokenizer
trained here never has; gpt2 and multi-query falcon are refused before that (see gradmap.export_gguf), opt is not
supported by the converter or by transformers' GGUF loader.

Config choices forced by the readers (each documented where used): the Gemmas use head_dim = query_pre_attn_scalar =
256 (transformers' GGUF loader does not carry query_pre_attn_scalar and keeps its default 256; llama.cpp derives it from
head_dim), Gemma-2 ties its embeddings (llama.cpp always does), Gemma-3 uses the every-6th-layer-global pattern, and
Qwen3 uses head_dim 128 (transformers' GGUF loader ignores attention.key_length for qwen3 and keeps the default 128).
"""

from __future__ import annotations

import io
import json
import warnings

import numpy as np
import pytest
import torch
from conftest import COMMON, CONFIGS, SAMPLE_TEXT, VOCAB
from transformers import AutoModelForCausalLM, Gemma2Config, Gemma3TextConfig, Qwen3Config

from gradmap.export_gguf import OUTTYPES, converter_path, export_gguf, gguf_mismatches, roundtrip_check
from gradmap.removal import remove_layers

spm = pytest.importorskip("sentencepiece")
gguf = pytest.importorskip("gguf")

try:
    converter_path()
    MISSING = None
except FileNotFoundError as exc:  # depends on the install
    MISSING = str(exc)

needs_converter = pytest.mark.skipif(MISSING is not None, reason=f"llama.cpp converter not installed: {MISSING}")

SLIDING, FULL = "sliding_attention", "full_attention"
GEMMA3_PATTERN_12 = ([SLIDING] * 5 + [FULL]) * 2  # llama.cpp / transformers: layer i global iff i % 6 == 5


def gguf_config(family: str, num_layers: int = 6):
    """Config of a tiny model of ``family`` that the GGUF readers can rebuild exactly (see module docstring)."""
    common = dict(COMMON, num_hidden_layers=num_layers)
    if family == "gemma2":
        return Gemma2Config(**{**common, "tie_word_embeddings": True}, head_dim=256, query_pre_attn_scalar=256,
                            sliding_window=8)
    if family == "gemma3_text":
        return Gemma3TextConfig(**common, head_dim=256, query_pre_attn_scalar=256, sliding_window=8,
                                layer_types=GEMMA3_PATTERN_12[:num_layers])
    if family == "qwen3":
        return Qwen3Config(**common, head_dim=128)
    config = CONFIGS[family]()
    config.num_hidden_layers = num_layers
    return config


def build(config, seed: int = 0):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():  # make every decoder layer matter (random init has tiny residual branches)
        for name, p in model.named_parameters():
            if ".layers." in name and p.dim() == 2:
                p.mul_(4.0)
    return model


def sentencepiece_model() -> bytes:
    """A SentencePiece BPE model with exactly VOCAB pieces (<pad>=0, <s>=1, </s>=2, <unk>=3), trained here."""
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(SAMPLE_TEXT.split(". ")), model_writer=buf,
                                   vocab_size=VOCAB, model_type="bpe", pad_id=0, bos_id=1, eos_id=2, unk_id=3,
                                   minloglevel=2)
    return buf.getvalue()


@pytest.fixture(scope="module")
def sp_model() -> bytes:
    return sentencepiece_model()


def save(model, path, sp_model: bytes, kept: list[int] | None = None):
    model.save_pretrained(path)
    (path / "tokenizer.model").write_bytes(sp_model)
    if kept is not None:  # what gradmap's save writes (only kept_layers is read by the export)
        (path / "gradmap_report.json").write_text(json.dumps({"kept_layers": kept}))
    return path


ROUNDTRIP = ["llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2", "gemma3_text"]
NOT_ROUNDTRIP = {
    "gpt2": "converter reads config n_ctx, absent from transformers 5 GPT2Config: export refuses gpt2",
    "falcon": "multi-query falcon: transformers 5 config breaks the converter's QKV reshape (export refuses); "
              "non-multi-query falcon converts but transformers' GGUF loader assumes multi-query",
    "opt": "no OPT support in llama.cpp's converter nor in transformers' GGUF loader",
}


@needs_converter
@pytest.mark.parametrize("pruned", [False, True], ids=["dense", "pruned"])
@pytest.mark.parametrize("family", ROUNDTRIP + [
    pytest.param(f, marks=pytest.mark.skip(reason=r), id=f"{f}-skip:{r[:60]}") for f, r in NOT_ROUNDTRIP.items()])
def test_roundtrip_f32(family, pruned, tmp_path, sp_model):
    """f32 GGUF reloaded by transformers gives the checkpoint's logits (up to float32 summation order)."""
    layers = 12 if family == "gemma3_text" else 6
    model = build(gguf_config(family, layers))
    kept = list(range(layers))
    if pruned:  # gemma3: removing layers 2..7 of the 12 keeps the every-6th-global pattern (kept: 0 1 8 9 10 11)
        drop = [2, 3, 4, 5, 6, 7] if family == "gemma3_text" else ([0, 1] if family == "gemma2" else [1, 4])
        remove_layers(model, drop)
        kept = [i for i in kept if i not in drop]
    src = save(model, tmp_path / "hf", sp_model, kept)
    out = export_gguf(src, tmp_path / "out" / "model.gguf")
    assert out.is_file() and out.parent == (tmp_path / "out").absolute()
    assert not [p for p in out.parent.iterdir() if p.name.endswith(".partial.gguf")]
    reader = gguf.GGUFReader(str(out))
    arch = str(reader.fields["general.architecture"].contents())
    assert int(reader.fields[f"{arch}.block_count"].contents()) == len(kept)
    r = roundtrip_check(src, out)
    window = getattr(model.config, "sliding_window", None)
    if window:
        assert r["seq_len"] > 2 * window
    assert r["max_abs_logit"] > 0.1
    assert r["max_abs_diff"] <= 1e-5 * max(1.0, r["max_abs_logit"]), r
    if getattr(model.config, "layer_types", None) is not None:
        assert r["layer_types"] == list(model.config.layer_types)


def _round_to(model, dtype):
    """Oracle for f16/bf16 files: every weight MATRIX rounded to ``dtype`` (the converter keeps 1-D tensors f32)."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.copy_(p.to(dtype).float())
    return model


@needs_converter
@pytest.mark.parametrize("outtype,dtype", [("f16", torch.float16), ("bf16", torch.bfloat16)])
def test_half_precision_matches_rounded_weights(outtype, dtype, tmp_path, sp_model):
    model = build(gguf_config("llama"))
    remove_layers(model, [2])
    src = save(model, tmp_path / "hf", sp_model)
    out = export_gguf(src, tmp_path / f"m-{outtype}.gguf", outtype=outtype)
    reader = gguf.GGUFReader(str(out))
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.ffn_down.weight"] == outtype.upper() and types["blk.0.attn_norm.weight"] == "F32"
    from transformers import GgufConfig

    gg = AutoModelForCausalLM.from_pretrained(out.parent, gguf_file=out.name, dtype=torch.float32,
                                              quantization_config=GgufConfig(dequantize=True)).eval()
    oracle = _round_to(build(gguf_config("llama")), dtype)
    remove_layers(oracle, [2])
    ids = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (gg(ids).logits - oracle(ids).logits).abs().max().item()
    assert diff <= 1e-5


def _q8_0_reference(w: np.ndarray) -> np.ndarray:
    """llama.cpp Q8_0 quantize-dequantize (ggml-quants.c quantize_row_q8_0_ref): blocks of 32 along a row,
    d = max|x| / 127 stored as fp16, q = round(x / d) to nearest (ties away from zero), value = q * d."""
    blocks = w.reshape(-1, 32).astype(np.float32)
    d = np.abs(blocks).max(axis=1, keepdims=True) / 127.0
    inv = np.where(d == 0, 0.0, 1.0 / np.where(d == 0, 1.0, d))
    q = np.sign(blocks * inv) * np.floor(np.abs(blocks * inv) + 0.5)
    return (q * d.astype(np.float16).astype(np.float32)).reshape(w.shape)


@needs_converter
def test_q8_0_weights_are_llamacpp_blocks(tmp_path, sp_model):
    model = build(gguf_config("qwen2"))
    src = save(model, tmp_path / "hf", sp_model)
    out = export_gguf(src, tmp_path / "q.gguf", outtype="q8_0")
    from gguf import GGUFReader, dequantize

    reader = GGUFReader(str(out))
    t = next(t for t in reader.tensors if t.name == "blk.3.ffn_down.weight")
    assert t.tensor_type.name == "Q8_0"
    got = dequantize(t.data, t.tensor_type).reshape(32, 64)
    want = _q8_0_reference(model.model.layers[3].mlp.down_proj.weight.detach().numpy())
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    r = roundtrip_check(src, out)
    assert 0 < r["max_abs_diff"] < 0.05 * r["max_abs_logit"]


# ---- refusals: what the GGUF or its readers cannot carry --------------------------------------------------------


@needs_converter
def test_gemma3_pattern_broken_by_pruning_is_refused(tmp_path, sp_model):
    """Removing layer 1 of a pattern-following 6-layer Gemma-3 moves the global layer 5 to index 4: refused."""
    model = build(gguf_config("gemma3_text", 6))
    remove_layers(model, [1])
    assert model.config.layer_types == [SLIDING] * 4 + [FULL]
    src = save(model, tmp_path / "hf", sp_model, kept=[0, 2, 3, 4, 5])
    out = tmp_path / "g.gguf"
    with pytest.raises(ValueError) as e:
        export_gguf(src, out)
    msg = str(e.value)
    assert "layer_types at layers [4] (original layers [5])" in msg and "set_swa_pattern(6)" in msg
    assert "full_attention -> sliding_attention" in msg
    assert not out.exists() and list(tmp_path.glob("*.gguf")) == []
    # allowed: written with a warning, and the reader really builds the fixed pattern (a different model)
    with pytest.warns(UserWarning, match="layer_types at layers \\[4\\]"):
        export_gguf(src, out, allow_mismatch=True)
    r = roundtrip_check(src, out)
    assert r["layer_types"] == [SLIDING] * 5
    assert r["max_abs_diff"] > 1e-3


@needs_converter
def test_gemma3_pruned_that_keeps_pattern_is_accepted(tmp_path, sp_model):
    model = build(gguf_config("gemma3_text", 12))
    remove_layers(model, [6, 7, 8, 9, 10, 11])
    assert gguf_mismatches(save(model, tmp_path / "hf", sp_model)) == []
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        export_gguf(tmp_path / "hf", tmp_path / "ok.gguf")


def test_gemma2_alternation_broken_by_pruning(tmp_path, sp_model):
    """Gemma-2 readers alternate sliding/full from layer 0; dropping one layer flips every later one."""
    model = build(gguf_config("gemma2"))
    remove_layers(model, [2])
    src = save(model, tmp_path / "hf", sp_model, kept=[0, 1, 3, 4, 5])
    ms = gguf_mismatches(src)
    assert [(m.prop, m.layers, m.original_layers, m.reader) for m in ms] == [
        ("layer_types", [2, 3, 4], [3, 4, 5], "llama.cpp")]


def test_conftest_gemmas_are_refused_with_reasons(tmp_path, sp_model):
    """The shared tiny Gemma-2 (head_dim 8, query_pre_attn_scalar 256, untied) and Gemma-3 (alternating) configs."""
    g2 = save(build(CONFIGS["gemma2"]()), tmp_path / "g2", sp_model)
    props = {m.prop for m in gguf_mismatches(g2)}
    assert props == {"query_pre_attn_scalar", "lm_head"}
    g3 = save(build(CONFIGS["gemma3_text"]()), tmp_path / "g3", sp_model)
    (m,) = [m for m in gguf_mismatches(g3) if m.prop == "layer_types"]
    assert m.layers == [1, 3]  # layer 5 is global in both the config and the every-6th rule


def test_gemma_27b_layer_count_changes_attention_scale(tmp_path, sp_model):
    """llama.cpp takes a 46-layer Gemma-2 for 27B (query scale from hidden/heads); pruned, it uses head_dim instead."""
    # hidden 32 / 4 heads = 8 = query_pre_attn_scalar, head_dim 16 (as in Gemma-2-27B: 4608 / 32 = 144 vs 128)
    cfg = Gemma2Config(**{**COMMON, "tie_word_embeddings": True, "num_hidden_layers": 46}, head_dim=16,
                       query_pre_attn_scalar=8, sliding_window=8)
    d = tmp_path / "cfg27"
    d.mkdir()
    cfg.save_pretrained(d)
    assert gguf_mismatches(d) == []  # 46 layers: llama.cpp uses hidden/heads = 8 = query_pre_attn_scalar
    cfg.num_hidden_layers = 44
    cfg.layer_types = cfg.layer_types[:44]
    cfg.save_pretrained(d)
    (m,) = gguf_mismatches(d)
    assert m.prop == "query_pre_attn_scalar" and "= 16" in m.detail


def test_sliding_window_families(tmp_path):
    """A Mistral sliding window and Qwen2 sliding layers are not carried (all readers run full attention)."""
    cfg = CONFIGS["mistral"]()
    cfg.sliding_window = 16
    cfg.save_pretrained(tmp_path / "m")
    (m,) = gguf_mismatches(tmp_path / "m")
    assert m.prop == "layer_types" and m.layers == list(range(6))
    cfg.sliding_window = 4096  # covers the whole context (128): full attention in effect
    cfg.save_pretrained(tmp_path / "m")
    assert gguf_mismatches(tmp_path / "m") == []


@pytest.mark.parametrize("family,match", [("gpt2", "n_ctx"), ("falcon", "multi_query"), ("opt", "not supported")])
def test_unsupported_families_refused(family, match, tmp_path):
    CONFIGS[family]().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=match):
        export_gguf(tmp_path, tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()


@needs_converter
def test_untied_lm_head_dropped_by_converter_is_caught_after_conversion(tmp_path, sp_model, monkeypatch):
    """The post-conversion check reads the file: without the static Gemma-2 rule, the dropped lm_head is still found."""
    import gradmap.export_gguf as eg

    cfg = gguf_config("gemma2")
    cfg.tie_word_embeddings = False
    src = save(build(cfg), tmp_path / "hf", sp_model)
    monkeypatch.setattr(eg, "_static_mismatches", lambda *a: [])
    with pytest.raises(ValueError, match="lm_head .*no output.weight"):
        export_gguf(src, tmp_path / "x.gguf")
    assert list(tmp_path.glob("*.gguf")) == [] and list(tmp_path.glob(".*partial*")) == []


# ---- arguments ---------------------------------------------------------------------------------------------------


def test_bad_arguments(tmp_path, sp_model):
    src = save(build(gguf_config("llama")), tmp_path / "hf", sp_model)
    with pytest.raises(ValueError, match="outtype"):
        export_gguf(src, tmp_path / "a.gguf", outtype="q4_0")
    with pytest.raises(ValueError, match="out_file"):
        export_gguf(src, tmp_path / "a.bin")
    with pytest.raises(ValueError, match="model_dir"):
        export_gguf(tmp_path / "nope", tmp_path / "a.gguf")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="config.json"):
        export_gguf(tmp_path / "empty", tmp_path / "a.gguf")
    (tmp_path / "a.gguf").write_bytes(b"old")
    with pytest.raises(FileExistsError, match="overwrite"):
        export_gguf(src, tmp_path / "a.gguf")
    assert (tmp_path / "a.gguf").read_bytes() == b"old"
    assert set(OUTTYPES) == {"f32", "f16", "bf16", "q8_0"}


@needs_converter
def test_converter_failure_leaves_old_file(tmp_path, sp_model):
    """A converter error (here: the tokenizer is missing) raises RuntimeError and leaves the previous file intact."""
    src = save(build(gguf_config("llama")), tmp_path / "hf", sp_model)
    (src / "tokenizer.model").unlink()
    (tmp_path / "a.gguf").write_bytes(b"old")
    with pytest.raises(RuntimeError, match="convert_hf_to_gguf failed"):
        export_gguf(src, tmp_path / "a.gguf", overwrite=True)
    assert (tmp_path / "a.gguf").read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.gguf", "hf"]


def test_missing_converter_message(tmp_path, monkeypatch):
    monkeypatch.setenv("GRADMAP_GGUF_CONVERTER", str(tmp_path / "none"))
    with pytest.raises(FileNotFoundError, match="pip install --no-deps --target"):
        converter_path()


@needs_converter
def test_cli_prune_writes_the_gguf_too(tmp_path, sp_model):
    """``gradmap prune --export-gguf`` on a SentencePiece-tokenized tiny Llama: the pruned checkpoint and its GGUF,
    which reloads with transformers' GGUF loader and gives the checkpoint's logits."""
    from gradmap.cli import main
    from gradmap.export_gguf import roundtrip_check

    path = save(build(gguf_config("llama")), tmp_path / "dense", sp_model)
    (path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer"}))  # for AutoTokenizer
    (tmp_path / "text.txt").write_text(SAMPLE_TEXT, encoding="utf-8")
    out, gguf = tmp_path / "out", tmp_path / "out.gguf"
    assert main(["prune", "--model", str(path), "--num-layers", "2", "--text", str(tmp_path / "text.txt"),
                 "--nsamples", "4", "--seqlen", "16", "--no-eval", "--no-speed", "--compensate", "none", "-q",
                 "--output", str(out), "--export-gguf", str(gguf)]) == 0
    assert gguf.is_file() and json.loads((out / "gradmap_report.json").read_text())["removed_layers"]
    check = roundtrip_check(out, gguf)
    assert check["max_abs_diff"] <= 1e-4 * max(1.0, check["max_abs_logit"])
