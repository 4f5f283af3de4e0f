"""Scale: data parallel over torch.distributed (gloo, 2 processes) takes the same decisions as one process; a memory
cap smaller than the model streams and gives the resident result; the planner's sizes by hand."""

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from transformers import AutoModelForCausalLM, LlamaConfig

from conftest import SAMPLE_TEXT, make_tokenizer, random_calibration, tiny_model
from gradmap import prune
from gradmap.engine.memory import GiB, ModelShape, RunSettings, parse_max_memory, plan_run
from gradmap.engine.weights import build_skeleton

# the metric's decisions (verify_top=0): on a random tiny model the loss check's candidates can tie to within the
# rounding of a sum split across ranks; the check's data-parallel path is covered by the torchrun CLI test below
SETTINGS = dict(num_layers=2, metric="grad_update_norm", compensate_mode="every-gap", micro_batch=2, verify_top=0)


def _summary(result) -> dict:
    return {"removed": result.removed, "scores": {str(k): v for k, v in result.selection.steps[0].scores.items()},
            "fits": [(f.layer, f.ridge, f.applied) for f in result.compensation.fits],
            "shifts": {str(k): v for k, v in result.compensation.shifts.items()}}


def _rank_main(rank: int, world: int, init: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        result = prune(tiny_model("llama"), random_calibration(nsamples=8, seqlen=16, pad_last=3), **SETTINGS)
        if rank == 0:
            with open(out, "w", encoding="utf-8") as fh:
                json.dump(_summary(result), fh)
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_take_the_same_decisions_as_one(tmp_path):
    single = _summary(prune(tiny_model("llama"), random_calibration(nsamples=8, seqlen=16, pad_last=3), **SETTINGS))
    out = tmp_path / "rank0.json"
    mp.spawn(_rank_main, args=(2, f"file://{tmp_path / 'init'}", str(out)), nprocs=2, join=True)
    multi = json.loads(out.read_text())
    assert multi["removed"] == single["removed"]
    for k, v in single["scores"].items():
        assert multi["scores"][k] == pytest.approx(v, rel=1e-4)
    for k, v in single["shifts"].items():
        assert multi["shifts"][k] == pytest.approx(v, rel=1e-4)
    assert [tuple(f) for f in multi["fits"]] == [tuple(f) for f in single["fits"]]


def test_torchrun_cli_two_processes(tmp_path):
    model = tiny_model("qwen2", tied=True)
    model.save_pretrained(tmp_path / "dense")
    make_tokenizer().save_pretrained(tmp_path / "dense")
    text = tmp_path / "text.txt"
    text.write_text(SAMPLE_TEXT, encoding="utf-8")
    common = ["--model", str(tmp_path / "dense"), "--text", str(text), "--eval-text", str(text), "--nsamples", "4",
              "--seqlen", "16", "--micro-batch", "1", "--num-layers", "2", "--eval-seqlen", "32", "-q",
              "--device", "cpu"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "gradmap",
                    "prune", *common, "--output", str(tmp_path / "two")], check=True, env=env, capture_output=True)
    subprocess.run([sys.executable, "-m", "gradmap", "prune", *common, "--output", str(tmp_path / "one")],
                   check=True, env=env, capture_output=True)
    two = json.loads((tmp_path / "two" / "gradmap_report.json").read_text())
    one = json.loads((tmp_path / "one" / "gradmap_report.json").read_text())
    assert two["settings"]["world_size"] == 2 and one["settings"]["world_size"] == 1
    assert two["removal_order"] == one["removal_order"]
    for k, v in one["steps"][0]["scores"].items():
        assert two["steps"][0]["scores"][k] == pytest.approx(v, rel=1e-4)
    assert two["perplexity"]["compensated"]["ppl"] == pytest.approx(one["perplexity"]["compensated"]["ppl"], rel=1e-4)
    assert not any(p.name.startswith(".two") for p in tmp_path.iterdir())  # lock and state files cleaned up


@pytest.mark.parametrize("family", ["llama", "gemma3_text", "opt"])
def test_memory_cap_below_the_model_streams_and_matches_resident(family, tmp_path):
    model = tiny_model(family)
    model.save_pretrained(tmp_path / "dense")
    cal = random_calibration(nsamples=6, seqlen=16, pad_last=2)
    resident = prune(model, cal, num_layers=2)
    size = sum(p.numel() * 4 for p in model.parameters())
    streamed = prune(str(tmp_path / "dense"), cal, num_layers=2, max_memory=int(size * 0.6), device="cpu")
    assert streamed.memory["mode"] == "streamed" and streamed.model is None
    assert streamed.memory["streamed_layers"] > 0
    assert streamed.removed == resident.removed
    for k, v in resident.selection.steps[0].scores.items():
        assert streamed.selection.steps[0].scores[k] == pytest.approx(v, rel=1e-5)
    for a, b in zip(streamed.compensation.fits, resident.compensation.fits):
        assert (a.layer, a.ridge, a.applied) == (b.layer, b.ridge, b.applied)
    out = streamed.save(tmp_path / "out")
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(cal.input_ids).logits, resident.model(cal.input_ids).logits,
                                   rtol=1e-5, atol=1e-5)
    folded = {n: p for n, p in reloaded.named_parameters() if "down_proj" in n or "fc2" in n}
    mine = dict(resident.model.named_parameters())
    for n, p in folded.items():
        torch.testing.assert_close(p, mine[n], rtol=1e-6, atol=1e-6)


def test_plan_sizes_by_hand():
    config = LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False)
    shape = ModelShape.from_model(build_skeleton(config))
    # per layer: q,k,v,o 4*64*64 + gate,up,down 3*64*128 + 2 norms 2*64 = 16384 + 24576 + 128 = 41088
    assert shape.layer_params == [41088] * 4
    # outer: embed 1000*64 + lm_head 1000*64 + final norm 64
    assert shape.outer_params == 128064
    settings = RunSettings(nsamples=8, seqlen=32, micro_batch=4, compensate=True, folds=4, logits_chunk=16)
    plan = plan_run(shape, settings, device=torch.device("cpu"), dtype=torch.float32)
    assert plan.mode == "resident" and plan.weights_total == (4 * 41088 + 128064) * 4
    state = 8 * 32 * 64 * 4  # tokens × hidden × fp32
    assert plan.boundary_states == 5 * state + 5 * state  # every boundary h_0..h_4, and the dense copy of them
    assert plan.stride == 1 and plan.host_states == 0
    assert plan.gradients == 2 * state
    assert plan.gram == (2 * 4 + 6) * 64 * 64 * 8  # 4 groups' G and C, their totals, 4 solve temporaries
    assert plan.lm_head == 16 * 1000 * 4 + 16 * 64 * 4 * 2  # fp32 logits chunk (gradient in place), rows + grads
    bt = 2 * 32  # micro-batch 4, but 8 windows in 4 cross-validation groups: 2 windows per micro-batch
    assert plan.activations_forward == bt * (4 * 64 + 3 * 128) * 4
    saved = 9 * 64 + 4 * 128 + 2 * 16 + 4  # per token: 9h + 4f + 2·head_dim + heads (measured on SDPA Llama layers)
    per_layer = bt * (saved + 3 * 64 + 2 * 128) * 4  # saved tensors + the backward's transients
    # resident: one micro-batch's graph through every layer, i.e. layers 1..3's saved tensors held besides layer 0's
    assert plan.keep_graph and plan.activations_backward == per_layer + 3 * bt * saved * 4
    selection = 2 * state + plan.activations_backward + plan.lm_head + 4 * 4
    stage2 = plan.gram + 64 * 128 * 4 + plan.activations_forward + plan.lm_head
    assert plan.peak_device == plan.weights_total + plan.boundary_states + max(selection, stage2)
    # the loss check of 3 candidates holds 2 more resumed streams: of all 8 windows, or of the check's 2 windows only
    full = plan_run(shape, RunSettings(nsamples=8, seqlen=32, micro_batch=4, folds=4, logits_chunk=16, candidates=3),
                    device=torch.device("cpu"), dtype=torch.float32)
    subset = plan_run(shape, RunSettings(nsamples=8, seqlen=32, micro_batch=4, folds=4, logits_chunk=16, candidates=3,
                                         candidate_windows=2), device=torch.device("cpu"), dtype=torch.float32)
    assert full.boundary_states == 10 * state + 2 * state
    assert subset.boundary_states == 10 * state + 2 * (2 * 32 * 64 * 4)
    # a cap of the outer unit + 2 layers + 1 more layer: one layer resident, three stream
    cap = (128064 + 3 * 41088) * 4
    capped = plan_run(shape, settings, device=torch.device("cpu"), dtype=torch.float32, max_memory=cap)
    assert capped.mode == "streamed" and capped.resident_layers == 1 and capped.streamed_layers == 3
    assert not capped.keep_graph and capped.activations_backward == per_layer  # streamed: layer by layer
    assert capped.moved_per_decision == 3 * 41088 * 4 * 2
    too_small = plan_run(shape, settings, device=torch.device("cpu"), dtype=torch.float32, max_memory=1000)
    assert not too_small.fits and "--max-memory" in too_small.advice


def test_max_memory_notation():
    assert parse_max_memory("20GiB", torch.device("cpu")) == {"cpu": 20 * GiB}
    assert parse_max_memory("1.5GB", torch.device("cuda", 0)) == {"device": 1_500_000_000}
    assert parse_max_memory({0: "70GiB", "cpu": "200GiB", 1: "1GiB"}, torch.device("cuda", 0)) == {
        "device": 70 * GiB, "cpu": 200 * GiB}
    assert parse_max_memory("cuda=70GiB,cpu=400GiB", torch.device("cuda", 0)) == {"device": 70 * GiB,
                                                                                  "cpu": 400 * GiB}
    with pytest.raises(ValueError, match="--max-memory"):
        parse_max_memory("lots", torch.device("cpu"))
    with pytest.raises(ValueError, match="--max-memory"):
        parse_max_memory("cuda=,cpu=1GiB", torch.device("cuda", 0))


LLAMA3 = {  # the public shapes of Llama-3-8B and Llama-3-70B (nothing downloaded: the configs are written here)
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, tie_word_embeddings=False),
    "70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, tie_word_embeddings=False),
}


@pytest.mark.parametrize("name,params", [("8b", 8_030_261_248), ("70b", 70_553_706_496)])
def test_llama3_plans_on_one_and_eight_80gb_gpus(name, params):
    shape = ModelShape.from_model(build_skeleton(LlamaConfig(**LLAMA3[name])))
    assert sum(shape.layer_params) + shape.outer_params == params  # the published parameter counts
    settings = dict(nsamples=128, seqlen=2048, micro_batch=8, compensate=True, folds=4)
    one = plan_run(shape, RunSettings(**settings), device=torch.device("cuda", 0), dtype=torch.bfloat16,
                   max_memory={0: "80GiB", "cpu": "1800GiB"})
    eight = plan_run(shape, RunSettings(**settings, world_size=8), device=torch.device("cuda", 0),
                     dtype=torch.bfloat16, max_memory={0: "80GiB", "cpu": "225GiB"})
    for plan in (one, eight):
        assert plan.fits and plan.peak_device <= 80 * GiB and plan.weights_total == params * 2
    state = 128 * 2048 * shape.hidden * 2  # one boundary of every calibration token, bf16
    assert one.boundary_states == 2 * (shape.num_layers + 1) * state  # the live and the dense trajectory
    assert eight.boundary_states == 2 * (shape.num_layers + 1) * (state // 8)  # each rank holds 1/8 of the windows
    if name == "70b":  # 141 GB of bf16 weights: streams on one GPU, and still on eight (data parallel, not sharded)
        assert one.mode == eight.mode == "streamed" and one.moved_per_decision > 0
        assert one.host_states > 0  # hidden states spill to host memory on one GPU
