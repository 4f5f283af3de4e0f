"""Fused weight-gradient reductions (gradmap.kernels): the Triton kernel and the chunked PyTorch path equal the naive
reference (materialized dW, fp64), the custom op passes opcheck, and fused scoring equals the reference layer scores.

Every kernel test runs on the CPU and, where ``torch.cuda.is_available()``, on CUDA (the ``device`` parameter). The
Triton kernel runs where it really runs: compiled on CUDA tensors (bf16 ``tl.dot`` on the tensor cores, the autotuner
and its config pruning), and on CPU tensors only in Triton's interpreter, which conftest.py switches on
(``TRITON_INTERPRET=1``) only when no GPU is present. Cases that cannot run here skip with the reason.
"""

import importlib.util

import pytest
import torch

from conftest import DEVICES, random_calibration, tiny_model
from gradmap.adapters import get_adapter
from gradmap.data import Calibration
from gradmap.engine import Engine, Windows
from gradmap.kernels import (ScoredLinear, fused_layer_scope, linear_grad_reduce,
                             reference_linear_grad_reduce, resolve_backend, triton_interpreting)
from gradmap.kernels import grad_reduce as grad_reduce_mod
from gradmap.methods.metrics import reference_layer_scores, score_layers
from gradmap.names import WEIGHT_METRICS

HAS_TRITON = importlib.util.find_spec("triton") is not None


def triton_skip_reason(device: str):
    """None when the Triton kernel runs on ``device`` tensors here (compiled on CUDA, interpreted on the CPU), else
    why not."""
    if not HAS_TRITON:
        return "triton is not installed"
    if device == "cpu" and not triton_interpreting():
        return "Triton runs on CPU tensors only in its interpreter (TRITON_INTERPRET=1), which conftest.py sets only " \
               "when no GPU is present"
    if device == "cuda" and triton_interpreting():
        return "TRITON_INTERPRET=1 is set: the compiled kernel would not run (unset it on a GPU machine)"
    return None


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


@pytest.fixture
def triton_device(device):
    """``device``, skipping the case where the Triton kernel does not run on it here (reason given)."""
    reason = triton_skip_reason(device)
    if reason:
        pytest.skip(reason)
    return device


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The shapes here are tiny: one intra-op thread is faster, and far faster when other jobs load the cores (a
    2-thread op waits for a descheduled thread: the tiny-model scoring below took 13 s with 2 threads, 0.08 s with
    1, on 2 busy cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# Odd shapes: x [5, 123, 77] -> 615 tokens, out 45 (ragged in every tile dimension); a ragged token count with
# several row tiles (out 150 > 2 x 64) and a partial token block; a single token.
SHAPES = [((5, 123), 77, 45), ((97,), 70, 150), ((1,), 33, 65)]

# Tolerances, against the fp64 reference computed from the SAME (already rounded) inputs. A product of two fp16 or
# bf16 values is exact in fp32 and every path accumulates in fp32 (the chunked path and the interpreter upcast to
# fp32 first, the GPU's tensor cores multiply exactly and accumulate in fp32), so the half-precision cases have the
# same error as fp32: rounding of the fp32 accumulation and of the sums, measured at <= 3e-7 relative here (several
# seeds, up to 2000 tokens). rtol 1e-5 for every dtype on the CPU. On CUDA the half-precision tolerance is 1e-4:
# tensor-core fp32 accumulation does not round to nearest at every add, so its error grows faster with the token
# count. What is NOT small is the distance to the fp32 values before rounding to fp16/bf16: that is the input
# rounding itself (2^-11 / 2^-8 per element), covered by test_half_inputs_vs_unrounded with rtol 1e-2.
RTOL = {torch.float32: 1e-5, torch.float16: 1e-5, torch.bfloat16: 1e-5}
RTOL_CUDA = {torch.float32: 1e-5, torch.float16: 1e-4, torch.bfloat16: 1e-4}


def _inputs(lead, in_f, out_f, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, in_f, generator=g)
    dy = torch.randn(*lead, out_f, generator=g)
    w = torch.randn(out_f, in_f, generator=g)
    return x.to(device, dtype), dy.to(device, dtype), w.to(device, dtype)


def _padding_mask(lead, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(*lead, generator=g) > 0.3


def _check(got, want, dtype):
    assert got.dtype == torch.float32 and got.shape == (3,)
    rtol = (RTOL_CUDA if got.is_cuda else RTOL)[dtype]
    torch.testing.assert_close(got.cpu(), want.cpu(), rtol=rtol, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("lead,in_f,out_f", SHAPES)
@pytest.mark.parametrize("masked", [False, True])
def test_triton_matches_reference(triton_device, lead, in_f, out_f, dtype, masked):
    x, dy, w = _inputs(lead, in_f, out_f, dtype, triton_device)
    mask = _padding_mask(lead).to(triton_device) if masked and lead != (1,) else None
    want = reference_linear_grad_reduce(x, dy, w, mask)
    _check(linear_grad_reduce(x, dy, w, mask, backend="triton"), want, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("lead,in_f,out_f", SHAPES)
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("chunk_rows", [0, 7])
def test_chunked_matches_reference(device, lead, in_f, out_f, dtype, masked, chunk_rows):
    x, dy, w = _inputs(lead, in_f, out_f, dtype, device)
    mask = _padding_mask(lead).to(device) if masked and lead != (1,) else None
    want = reference_linear_grad_reduce(x, dy, w, mask)
    _check(linear_grad_reduce(x, dy, w, mask, backend="torch", chunk_rows=chunk_rows), want, dtype)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_mask_equals_zeroed_rows_and_dropped_rows(device, backend):
    """A token mask, zeroed dy rows and removing the rows all give the same sums."""
    if backend == "triton" and triton_skip_reason(device):
        pytest.skip(triton_skip_reason(device))
    x, dy, w = _inputs((4, 40), 50, 70, device=device)
    mask = _padding_mask((4, 40)).to(device)
    masked = linear_grad_reduce(x, dy, w, mask, backend=backend)
    zeroed = linear_grad_reduce(x, dy * mask[..., None], w, backend=backend)
    dropped = linear_grad_reduce(x[mask], dy[mask], w, backend=backend)
    torch.testing.assert_close(masked, zeroed, rtol=1e-5, atol=0)
    torch.testing.assert_close(masked, dropped, rtol=1e-5, atol=0)
    # padding rows full of garbage (even inf) are ignored under the mask
    x_bad = x.masked_fill(~mask[..., None], float("inf"))
    torch.testing.assert_close(linear_grad_reduce(x_bad, dy, w, mask, backend=backend), masked, rtol=1e-5, atol=0)


def test_half_inputs_vs_unrounded(device):
    """bf16 inputs vs the fp32 values before rounding: the sums move by the input rounding only (well under 1 %)."""
    x, dy, w = _inputs((3, 50), 64, 96, device=device)
    exact = reference_linear_grad_reduce(x, dy, w)
    for dtype in (torch.float16, torch.bfloat16):
        got = linear_grad_reduce(x.to(dtype), dy.to(dtype), w.to(dtype), backend="torch")
        torch.testing.assert_close(got, exact, rtol=1e-2, atol=0)


def test_mixed_dtypes_and_zero_tokens(device):
    x, dy, w = _inputs((30,), 20, 10, device=device)
    want = reference_linear_grad_reduce(x, dy.bfloat16(), w)
    torch.testing.assert_close(linear_grad_reduce(x, dy.bfloat16(), w, backend="torch"), want, rtol=1e-5, atol=0)
    empty = linear_grad_reduce(x[:0], dy[:0], w, backend="torch")
    assert torch.equal(empty.cpu(), torch.zeros(3))


def test_triton_mixed_dtypes_zero_tokens_and_strides(triton_device):
    x, dy, w = _inputs((30,), 20, 70, device=triton_device)
    want = reference_linear_grad_reduce(x, dy.bfloat16(), w)
    torch.testing.assert_close(linear_grad_reduce(x, dy.bfloat16(), w, backend="triton"), want, rtol=1e-5, atol=0)
    assert torch.equal(linear_grad_reduce(x[:0], dy[:0], w, backend="triton").cpu(), torch.zeros(3))
    # non-contiguous operands (transposed views, strided rows)
    xt = torch.randn(20, 60, device=triton_device).t()[::2]
    dyt = torch.randn(70, 60, device=triton_device).t()[::2]
    wt = torch.randn(20, 70, device=triton_device).t()
    torch.testing.assert_close(linear_grad_reduce(xt, dyt, wt, backend="triton"),
                               reference_linear_grad_reduce(xt, dyt, wt), rtol=1e-5, atol=0)


def test_validation_errors():
    x, dy, w = _inputs((8,), 6, 5)
    with pytest.raises(ValueError, match="dy must be"):
        linear_grad_reduce(x, dy[:, :4], w, backend="torch")
    with pytest.raises(ValueError, match="differ in their leading"):
        linear_grad_reduce(x, dy[:7], w, backend="torch")
    with pytest.raises(ValueError, match="token_mask must have"):
        linear_grad_reduce(x, dy, w, torch.ones(7, dtype=torch.bool), backend="torch")
    with pytest.raises(TypeError, match="accepted: float32"):
        linear_grad_reduce(x.int(), dy, w, backend="torch")
    with pytest.raises(ValueError, match="backend: 'cuda' is not one of auto, triton, torch"):
        linear_grad_reduce(x, dy, w, backend="cuda")


def test_backend_resolution(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_backend("torch", cpu, torch.float32) == "torch"
    assert resolve_backend(None, cpu, torch.float64) == "torch"
    assert resolve_backend(None, cuda, torch.float64) == "torch"
    monkeypatch.setenv("GRADMAP_GRAD_REDUCE", "torch")
    assert resolve_backend(None, cpu, torch.float32) == "torch"
    assert resolve_backend(None, cuda, torch.bfloat16) == "torch"
    monkeypatch.setenv("GRADMAP_GRAD_REDUCE", "fast")
    with pytest.raises(ValueError, match=r"\$GRADMAP_GRAD_REDUCE: 'fast'"):
        resolve_backend(None, cpu, torch.float32)
    monkeypatch.delenv("GRADMAP_GRAD_REDUCE")
    # auto: CUDA tensors take the Triton kernel whenever triton is installed; CPU tensors only under the interpreter
    assert resolve_backend(None, cuda, torch.bfloat16) == ("triton" if HAS_TRITON else "torch")
    assert resolve_backend(None, cpu, torch.float32) == ("triton" if HAS_TRITON and triton_interpreting() else "torch")
    with pytest.raises(RuntimeError, match="float64"):
        resolve_backend("triton", cpu, torch.float64)


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_config_pruning_keeps_tiles_that_fit():
    """The autotuner's early pruning drops configs whose tile is much larger than the layer (next power of two,
    at least 64), and keeps the smallest config when none fits."""
    configs = grad_reduce_mod._cuda_configs()
    small = grad_reduce_mod._prune_configs(configs, {"OUT": 45, "IN": 77})
    assert small and all(c.kwargs["BLOCK_M"] == 64 and c.kwargs["BLOCK_N"] <= 128 for c in small)
    assert {c.kwargs["BLOCK_N"] for c in small} == {64, 128}
    wide = grad_reduce_mod._prune_configs(configs, {"OUT": 100, "IN": 5000})
    assert {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) for c in wide} == {(128, 256), (128, 128), (64, 128),
                                                                           (128, 64), (64, 64)}  # no 256-row tile
    assert grad_reduce_mod._prune_configs(configs, {"OUT": 4096, "IN": 4096}) == configs
    assert grad_reduce_mod._prune_configs(configs[:1], {"OUT": 1, "IN": 1}) == configs[:1]  # nothing fits: keep one


def test_cuda_kernel_is_compiled_and_autotuned():
    """On a GPU the op runs the compiled, autotuned kernel (not the interpreter): after a call on a small layer the
    autotuner has chosen, for that layer's key, a config that config pruning allows."""
    reason = triton_skip_reason("cuda") if torch.cuda.is_available() else "no CUDA device: the compiled kernel " \
                                                                          "runs where torch.cuda.is_available()"
    if reason:
        pytest.skip(reason)
    plain, tuned = grad_reduce_mod._kernels()
    assert type(plain).__name__ != "InterpretedFunction"
    x, dy, w = _inputs((300,), 77, 45, torch.bfloat16, "cuda")
    got = linear_grad_reduce(x, dy, w, backend="triton")
    _check(got, reference_linear_grad_reduce(x, dy, w), torch.bfloat16)
    chosen = [cfg for key, cfg in tuned.cache.items() if key[:2] == (45, 77)]
    assert chosen and chosen[0].kwargs["BLOCK_M"] == 64 and chosen[0].kwargs["BLOCK_N"] <= 128, tuned.cache


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_opcheck(device, backend):
    if backend == "triton" and triton_skip_reason(device):
        pytest.skip(triton_skip_reason(device))
    x, dy, w = _inputs((2, 9), 40, 70, device=device)
    mask = _padding_mask((2, 9)).to(device)
    for args in [(x, dy, w, None, backend, 0), (x, dy, w, mask, backend, 5)]:
        torch.library.opcheck(torch.ops.gradmap.linear_grad_reduce.default, args)


def test_compiles(device):
    """The op is opaque to torch.compile (fake kernel) and gives the same sums compiled."""
    x, dy, w = _inputs((16,), 24, 40, device=device)
    fn = torch.compile(lambda a, b, c: linear_grad_reduce(a, b, c, backend="torch") * 2, backend="eager",
                       fullgraph=True)
    torch.testing.assert_close(fn(x, dy, w), 2 * reference_linear_grad_reduce(x, dy, w), rtol=1e-5, atol=0)


def test_scored_linear_grads(device):
    """ScoredLinear: dX equals the plain linear's, and acc gets exactly the metric sum of dW."""
    torch.manual_seed(0)
    x = torch.randn(3, 7, 20).to(device).requires_grad_(True)
    lin = torch.nn.Linear(20, 30).to(device).requires_grad_(False)
    gy = torch.randn(3, 7, 30).to(device)
    acc = torch.zeros(2, device=device)
    ScoredLinear.apply(x, lin.weight, lin.bias, acc, 1, "taylor", "torch").backward(gy)
    dx = x.grad.clone()
    x.grad = None
    lin.requires_grad_(True)
    lin(x).backward(gy)
    torch.testing.assert_close(dx, x.grad)
    want = (lin.weight.grad.double() * lin.weight.detach().double()).abs().sum().float()
    torch.testing.assert_close(acc, torch.stack([torch.tensor(0.0, device=device), want]), rtol=1e-5, atol=0)
    with pytest.raises(ValueError, match="must not require grad"):
        ScoredLinear.apply(x, lin.weight, lin.bias, acc, 0, "taylor")


def _selection(scores):
    return int(torch.argmin(scores))


def fused_layer_scores(model, cal, metric, *, micro_batch=8, kernel="torch", monkeypatch=None):
    """The fused backend's scores with the reduction kernel forced (GRADMAP_GRAD_REDUCE)."""
    monkeypatch.setenv("GRADMAP_GRAD_REDUCE", kernel)
    return score_layers(model, cal, metric, micro_batch=micro_batch, backend="fused")


@pytest.mark.parametrize("metric", WEIGHT_METRICS)
def test_fused_scores_equal_reference(device, metric, monkeypatch):
    """Whole model (tiny Llama, padded windows, 2 micro-batches), chunked PyTorch path: same scores as the naive
    reference and as the hook path, and the same first layer removed. The reference runs on a CPU copy, so on CUDA
    the forward itself differs slightly between devices: rtol 1e-4 there."""
    model = tiny_model("llama").to(device)
    cal = random_calibration(nsamples=4, seqlen=12, pad_last=3)
    got, stats = fused_layer_scores(model, cal, metric, micro_batch=2, monkeypatch=monkeypatch)
    want = reference_layer_scores(tiny_model("llama"), cal, metric, micro_batch=2)
    hooks, _ = score_layers(model, cal, metric, micro_batch=2)
    assert got.shape == (6,) and got.dtype == torch.float32
    assert stats.micro_batches == 2 and stats.tokens == cal.num_targets
    rtol = 1e-4 if device == "cuda" else 1e-5
    torch.testing.assert_close(got.cpu(), want.cpu(), rtol=rtol, atol=0)
    torch.testing.assert_close(got.cpu(), hooks.cpu(), rtol=rtol, atol=0)
    assert got.min() > 0
    assert _selection(got) == _selection(want)


@pytest.mark.parametrize("metric", WEIGHT_METRICS)
def test_fused_scores_triton_equal_reference(triton_device, metric, monkeypatch):
    """Whole model through the Triton kernel. On CUDA the reference runs on a CPU copy (reference_layer_scores
    accumulates on the CPU), so the forward itself differs slightly between devices: rtol 1e-4 there."""
    model = tiny_model("llama").to(triton_device)
    cal = random_calibration(nsamples=2, seqlen=10, pad_last=3)
    got, _ = fused_layer_scores(model, cal, metric, micro_batch=2, kernel="triton", monkeypatch=monkeypatch)
    want = reference_layer_scores(tiny_model("llama"), cal, metric, micro_batch=2)
    torch.testing.assert_close(got.cpu(), want.cpu(), rtol=1e-4 if triton_device == "cuda" else 1e-5, atol=0)
    assert _selection(got) == _selection(want)


def test_padding_rows_contribute_nothing(monkeypatch):
    """Right padding: dy is exactly zero on padded rows, so scores with padding appended equal those without."""
    model = tiny_model("llama")
    cal = random_calibration(nsamples=2, seqlen=10)
    padded = Calibration(torch.cat([cal.input_ids, torch.zeros(2, 4, dtype=torch.long)], dim=1),
                         torch.cat([cal.attention_mask, torch.zeros(2, 4, dtype=torch.long)], dim=1))
    a, _ = fused_layer_scores(model, cal, "taylor", monkeypatch=monkeypatch)
    b, _ = fused_layer_scores(model, padded, "taylor", monkeypatch=monkeypatch)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=0)
    # and the dy rows themselves are zero at the padded positions (the engine's reverse sweep through layer 3)
    layer = get_adapter(model).layers(model)[3]
    seen = []
    handle = layer.mlp.down_proj.register_full_backward_hook(lambda m, gin, gout: seen.append(gout[0].detach()))
    try:
        with Engine.for_module(model) as engine:
            engine.trajectory(Windows.from_calibration(padded, 2)).backward()
    finally:
        handle.remove()
    assert seen and torch.count_nonzero(seen[0][:, 10:]) == 0 and torch.count_nonzero(seen[0][:, :9]) > 0


def test_scope_restores_model_and_checks(monkeypatch):
    model = tiny_model("llama")
    model.model.embed_tokens.weight.requires_grad_(False)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fused_layer_scores(model, random_calibration(nsamples=2, seqlen=8), "grad_l2", monkeypatch=monkeypatch)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())
    assert all("forward" not in m.__dict__ for m in model.modules())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    layer = get_adapter(model).layers(model)[0]
    with pytest.raises(ValueError, match="not a weight-gradient metric"):
        with fused_layer_scope(layer, "gate", torch.zeros(6), 0):
            pass
    # a 2-D matrix that is not an nn.Linear weight is refused
    layer.extra = torch.nn.Parameter(torch.zeros(2, 2))
    with pytest.raises(ValueError, match="not nn.Linear weights"):
        fused_layer_scores(model, random_calibration(), "taylor", monkeypatch=monkeypatch)
    del layer.extra
    assert all("forward" not in m.__dict__ for m in model.modules())


def test_linear_called_twice_is_refused():
    model = tiny_model("llama")
    mlp = get_adapter(model).layers(model)[1].mlp
    original = type(mlp).forward
    mlp.forward = lambda x: original(mlp, x) + mlp.down_proj(mlp.act_fn(mlp.gate_proj(x)))
    with pytest.raises(ValueError, match="ran more than once"):
        score_layers(model, random_calibration(nsamples=2, seqlen=8), "taylor", backend="fused")
