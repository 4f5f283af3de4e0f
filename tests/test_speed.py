"""gradmap.speed: structure and token counts only (timings are never asserted; benchmarks/bench_speed.py measures)."""

from __future__ import annotations

import pytest
import torch
from conftest import VOCAB, tiny_model

from gradmap.removal import remove_layers
from gradmap.speed import compare_speed, make_inputs, measure_speed

KEYS = {"device", "device_name", "torch_threads", "dtype", "batch_size", "prompt_tokens", "new_tokens", "repeats",
        "seed", "num_layers", "num_parameters", "prefill_seconds", "prefill_tokens_per_s", "time_to_first_token_s",
        "decode_seconds", "decode_tokens_per_s", "generated_tokens_per_row", "peak_memory_bytes",
        "prefill_seconds_all", "decode_seconds_all"}

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_measure_speed_structure(device, tiny_tokenizer):
    model = tiny_model("llama")
    r = measure_speed(model, tiny_tokenizer, device=device, batch_size=2, prompt_tokens=16, new_tokens=5, repeats=2)
    assert set(r) == KEYS
    assert r["device"].startswith(device) and r["device_name"]
    assert r["torch_threads"] == torch.get_num_threads()
    assert (r["batch_size"], r["prompt_tokens"], r["new_tokens"], r["repeats"]) == (2, 16, 5, 2)
    assert r["generated_tokens_per_row"] == 5
    assert r["num_layers"] == 6 and r["dtype"] == "float32"
    assert r["num_parameters"] == sum(p.numel() for p in model.parameters())
    assert len(r["prefill_seconds_all"]) == len(r["decode_seconds_all"]) == 2
    for k in ("prefill_seconds", "decode_seconds", "time_to_first_token_s", "prefill_tokens_per_s",
              "decode_tokens_per_s"):
        assert r[k] > 0
    # throughput = tokens / median seconds (decode: the new_tokens - 1 cached steps)
    assert r["prefill_tokens_per_s"] == pytest.approx(2 * 16 / r["prefill_seconds"])
    assert r["decode_tokens_per_s"] == pytest.approx(2 * 4 / r["decode_seconds"])
    assert (r["peak_memory_bytes"] is None) == (device == "cpu")


def test_never_stops_early_on_eos():
    """A model that always predicts EOS: plain greedy generate stops after 1 token; the measurement decodes all."""
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.norm.weight.zero_()  # final hidden states 0 -> all logits 0 -> argmax is token 0
    model.config.eos_token_id = 0
    model.generation_config.eos_token_id = 0
    model.generation_config.pad_token_id = 0
    ids = make_inputs(VOCAB, 3, 8, seed=0)
    with torch.no_grad():
        plain = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False)
    assert plain.shape[1] - 8 == 1  # the oracle: EOS ends every row at once without min_new_tokens
    r = measure_speed(model, VOCAB, device="cpu", batch_size=3, prompt_tokens=8, new_tokens=6, repeats=1)
    assert r["generated_tokens_per_row"] == 6


def test_inputs_deterministic_and_in_vocab():
    a, b = make_inputs(50, 2, 64, seed=3), make_inputs(50, 2, 64, seed=3)
    assert torch.equal(a, b) and a.shape == (2, 64) and a.dtype == torch.long
    assert int(a.min()) >= 0 and int(a.max()) < 50
    assert not torch.equal(a, make_inputs(50, 2, 64, seed=4))


def test_model_state_restored():
    model = tiny_model("qwen2").train()
    measure_speed(model, VOCAB, device="cpu", prompt_tokens=8, new_tokens=2, repeats=1)
    assert model.training and next(model.parameters()).device.type == "cpu"


def test_compare_speed(tiny_tokenizer):
    dense = tiny_model("llama")
    pruned = tiny_model("llama")
    remove_layers(pruned, [1, 3])
    r = compare_speed(dense, pruned, tiny_tokenizer, device="cpu", prompt_tokens=12, new_tokens=4, repeats=2)
    assert set(r) == {"dense", "pruned", "speedup"}
    assert r["dense"]["num_layers"] == 6 and r["pruned"]["num_layers"] == 4
    assert r["dense"]["generated_tokens_per_row"] == r["pruned"]["generated_tokens_per_row"] == 4
    s = r["speedup"]
    assert s["prefill"] == pytest.approx(r["pruned"]["prefill_tokens_per_s"] / r["dense"]["prefill_tokens_per_s"])
    assert s["decode"] == pytest.approx(r["pruned"]["decode_tokens_per_s"] / r["dense"]["decode_tokens_per_s"])
    assert s["time_to_first_token"] == pytest.approx(r["dense"]["time_to_first_token_s"]
                                                     / r["pruned"]["time_to_first_token_s"])


@pytest.mark.parametrize("kwargs,match", [
    (dict(batch_size=0), "batch_size"), (dict(prompt_tokens=0), "prompt_tokens"), (dict(new_tokens=1), "new_tokens"),
    (dict(repeats=0), "repeats"), (dict(prompt_tokens=120, new_tokens=16), "maximum sequence length"),
    (dict(batch_size=1.5), "batch_size")])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        measure_speed(tiny_model("llama"), VOCAB, device="cpu", **kwargs)


def test_bad_vocab():
    with pytest.raises(TypeError, match="tokenizer_or_vocab"):
        measure_speed(tiny_model("llama"), object(), device="cpu")
    with pytest.raises(ValueError, match="tokenizer_or_vocab"):
        measure_speed(tiny_model("llama"), 0, device="cpu")
