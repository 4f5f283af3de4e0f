"""pytest-benchmark micro-benchmarks of gradmap's ops, each next to its reference in the same group.

    pytest benchmarks/ --benchmark-only                 # all groups (pytest.ini's testpaths keeps them out of `pytest`)
    pytest benchmarks/ --benchmark-only -k projection   # one group

Shapes are those of the default model (SmolLM2-135M: hidden 576, MLP 1536) on 512 tokens, except the scoring step,
which runs on a tiny random Llama (4 layers, hidden 64) so a round takes milliseconds. Every benchmark also checks its
result against the reference (a fast op that computes something else is not a speed-up). Times are CPU wall times at
the current ``torch.get_num_threads()``; compare ops within a group, on the same machine, in the same run.
"""

from __future__ import annotations

import os

os.environ.setdefault("GRADMAP_GRAD_REDUCE", "torch")  # the CPU path (the Triton kernel is for CUDA)

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from gradmap.data import Calibration
from gradmap.kernels.grad_reduce import linear_grad_reduce, reference_linear_grad_reduce
from gradmap.projection import fold_projection_, gram_accumulate_, solve_ridge
from gradmap.methods.metrics import reference_layer_scores
from gradmap.methods.metrics import score_layers as layer_scores


def lm_loss_sum(model, input_ids, attention_mask):
    """The model's own forward (full logits) and summed next-token cross-entropy: the reference pass."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    valid = (attention_mask[:, 1:] * attention_mask[:, :-1]).bool()
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(),
                                             input_ids[:, 1:].masked_fill(~valid, -100).flatten(),
                                             ignore_index=-100, reduction="sum")
    return loss, int(valid.sum())

TOKENS, HIDDEN, FFN = 512, 576, 1536


@pytest.fixture(scope="module")
def linear_inputs():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(TOKENS, FFN, generator=g)
    dy = torch.randn(TOKENS, HIDDEN, generator=g) / TOKENS
    w = torch.randn(HIDDEN, FFN, generator=g) * 0.02
    return x, dy, w


@pytest.mark.benchmark(group="grad_reduce (down_proj 576x1536, 512 tokens)")
def test_grad_reduce_chunked(benchmark, linear_inputs):
    x, dy, w = linear_inputs
    got = benchmark(linear_grad_reduce, x, dy, w, backend="torch")
    torch.testing.assert_close(got, reference_linear_grad_reduce(x, dy, w), rtol=1e-4, atol=0)


@pytest.mark.benchmark(group="grad_reduce (down_proj 576x1536, 512 tokens)")
def test_grad_reduce_reference_fp32(benchmark, linear_inputs):
    x, dy, w = linear_inputs
    got = benchmark(reference_linear_grad_reduce, x, dy, w, dtype=torch.float32)
    torch.testing.assert_close(got, reference_linear_grad_reduce(x, dy, w), rtol=1e-4, atol=0)


@pytest.fixture(scope="module")
def gram_inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randn(TOKENS, HIDDEN, generator=g), torch.randn(TOKENS, HIDDEN, generator=g)


def _gram(X, Y):
    G = torch.zeros(HIDDEN, HIDDEN, dtype=torch.float64)
    C = torch.zeros(HIDDEN, HIDDEN, dtype=torch.float64)
    gram_accumulate_(G, C, X, Y)
    return G, C


@pytest.mark.benchmark(group="projection: Gram accumulate (512 tokens, d=576, fp64)")
def test_gram_accumulate(benchmark, gram_inputs):
    X, Y = gram_inputs
    G, C = benchmark(_gram, X, Y)
    torch.testing.assert_close(G, X.double().T @ X.double(), rtol=1e-12, atol=1e-9)


@pytest.mark.benchmark(group="projection: Gram accumulate (512 tokens, d=576, fp64)")
def test_gram_reference(benchmark, gram_inputs):
    X, Y = gram_inputs
    G, C = benchmark(lambda: (X.double().T @ X.double(), X.double().T @ Y.double()))
    torch.testing.assert_close(C, _gram(X, Y)[1], rtol=1e-12, atol=1e-9)


@pytest.fixture(scope="module")
def ridge_inputs(gram_inputs):
    return _gram(*gram_inputs)


@pytest.mark.benchmark(group="projection: ridge solve (d=576, fp64)")
def test_solve_ridge(benchmark, ridge_inputs):
    G, C = ridge_inputs
    T = benchmark(solve_ridge, G, C, 1e-2)
    A = G + 1e-2 * torch.diagonal(G).mean() * torch.eye(HIDDEN, dtype=torch.float64)
    torch.testing.assert_close(A @ T, C, rtol=1e-9, atol=1e-6)


@pytest.mark.benchmark(group="projection: ridge solve (d=576, fp64)")
def test_solve_reference_lu(benchmark, ridge_inputs):
    G, C = ridge_inputs
    A = G + 1e-2 * torch.diagonal(G).mean() * torch.eye(HIDDEN, dtype=torch.float64)
    T = benchmark(torch.linalg.solve, A, C)
    torch.testing.assert_close(T, solve_ridge(G, C, 1e-2), rtol=1e-8, atol=1e-10)


@pytest.fixture(scope="module")
def fold_inputs():
    g = torch.Generator().manual_seed(2)
    return torch.randn(HIDDEN, FFN, generator=g) * 0.02, torch.eye(HIDDEN) + 0.01 * torch.randn(HIDDEN, HIDDEN,
                                                                                                  generator=g)


@pytest.mark.benchmark(group="projection: fold into down_proj (576x1536)")
def test_fold_projection(benchmark, fold_inputs):
    W0, T = fold_inputs
    W = W0.clone()

    def setup():  # every round folds into the original weight
        W.copy_(W0)
        return (W, T), {}

    benchmark.pedantic(fold_projection_, setup=setup, rounds=20)
    torch.testing.assert_close(W, (T.double().T @ W0.double()).float(), rtol=1e-6, atol=1e-7)


@pytest.mark.benchmark(group="projection: fold into down_proj (576x1536)")
def test_fold_reference_fp32(benchmark, fold_inputs):
    W0, T = fold_inputs
    got = benchmark(lambda: T.T @ W0)
    torch.testing.assert_close(got, (T.double().T @ W0.double()).float(), rtol=1e-4, atol=1e-6)


@pytest.fixture(scope="module")
def tiny():
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    ids = torch.randint(0, 128, (4, 64), generator=torch.Generator().manual_seed(3))
    return model, Calibration(ids, torch.ones_like(ids), {"source": "random"})


@pytest.mark.benchmark(group="scoring step (tiny Llama, 4x64 tokens)")
@pytest.mark.parametrize("metric", ["grad_update_norm", "taylor"])
def test_scoring_step(benchmark, tiny, metric):
    model, cal = tiny
    scores, _ = benchmark(layer_scores, model, cal, metric)
    torch.testing.assert_close(scores, reference_layer_scores(model, cal, metric), rtol=1e-4, atol=1e-7)


@pytest.mark.benchmark(group="scoring step (tiny Llama, 4x64 tokens)")
def test_scoring_reference_forward(benchmark, tiny):
    model, cal = tiny

    def forward():
        with torch.no_grad():
            return lm_loss_sum(model, cal.input_ids, cal.attention_mask)

    loss, n = benchmark(forward)
    assert n == 4 * 63 and torch.isfinite(loss)
