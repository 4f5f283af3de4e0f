"""Fused linear cross-entropy (gradmap.kernels.linear_cross_entropy) against independent oracles.

The oracle (:func:`_oracle`) is written here: full logits in fp64 from the same (already rounded) inputs,
``F.cross_entropy(reduction="sum")`` and autograd for the input gradient. One small case is also checked against
numbers derived by hand. The Triton backend runs under Triton's interpreter on CPU tensors (TRITON_INTERPRET=1, set
before anything imports triton) or on CUDA where a GPU is present.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before any import of triton (torch._dynamo imports it too)

import importlib
import importlib.util
import math

import pytest
import torch
import torch.nn.functional as F

from gradmap.kernels.linear_cross_entropy import default_chunk_size, linear_cross_entropy, reference_linear_cross_entropy

# The package exports the function under the module's own name, so `import gradmap.kernels.linear_cross_entropy as m`
# would bind the function; import_module returns the module.
lce_module = importlib.import_module("gradmap.kernels.linear_cross_entropy")

HAS_TRITON = importlib.util.find_spec("triton") is not None
HAS_CUDA = torch.cuda.is_available()
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device here"))]
BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.skipif(not HAS_TRITON, reason="triton not installed"))]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]

# Tolerances against the fp64 oracle on the same rounded inputs. The loss is fp32 from fp32 logits (fp16/bf16 products
# are exact in fp32), measured <= 7e-8 relative on the CPU for every dtype: rtol 1e-6 (1e-5 on CUDA). The gradient is
# returned in the input dtype, so its error is the final rounding (bf16 2^-9, fp16 2^-11 relative; measured 2.5e-3
# and 3.2e-4 of max|grad|) and, in fp32, accumulation order (measured 9e-7). On CUDA, dL/dz is also rounded to
# fp16/bf16 before the tensor-core GEMM, hence the looser CUDA gradient tolerances.
LOSS_RTOL = {"cpu": 1e-6, "cuda": 1e-5}
GRAD_TOL = {"cpu": {torch.float32: 1e-5, torch.bfloat16: 8e-3, torch.float16: 1e-3},
            "cuda": {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 4e-3}}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny shapes: one intra-op thread is faster, and far steadier on a loaded machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _triton_runnable(request):
    """The Triton backend runs CPU tensors only under the interpreter (TRITON_INTERPRET=1, as conftest sets it), and
    CUDA tensors either way; skip a CPU case when the interpreter is off (e.g. a GPU run with TRITON_INTERPRET=0)."""
    params = getattr(request.node, "callspec", None)
    params = params.params if params else {}
    if params.get("backend") == "triton" and params.get("device", "cpu") == "cpu" and not lce_module.interpreting():
        pytest.skip("triton backend on CPU tensors needs TRITON_INTERPRET=1 (Triton's interpreter)")


def _inputs(n=37, d=24, vocab=300, dtype=torch.float32, device="cpu", seed=0, bias=False, ignored=()):
    """hidden [n, d] (requires grad), weight [vocab, d], targets [n] (rows in ``ignored`` set to -100), bias."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g).to(device, dtype).requires_grad_(True)
    w = (torch.randn(vocab, d, generator=g) * 0.5).to(device, dtype)
    y = torch.randint(0, vocab, (n,), generator=g)
    y[list(ignored)] = -100
    b = torch.randn(vocab, generator=g).to(device, dtype) if bias else None
    return h, w, y.to(device), b


def _oracle(h, w, y, bias=None, softcap=None, ignore_index=-100):
    """fp64 loss (float) and dL/dh (fp64 [N, d]) from full logits and F.cross_entropy."""
    h64 = h.detach().double().requires_grad_(True)
    z = h64 @ w.detach().double().t()
    if bias is not None:
        z = z + bias.detach().double()
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    loss = F.cross_entropy(z, y.long(), ignore_index=ignore_index, reduction="sum")
    loss.backward()
    return loss.item(), h64.grad


def _check(loss, grad, want_loss, want_grad, dtype, device):
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert grad.dtype == dtype
    assert loss.item() == pytest.approx(want_loss, rel=LOSS_RTOL[device], abs=1e-6)
    tol = GRAD_TOL[device][dtype]
    scale = float(want_grad.abs().max()) or 1.0
    torch.testing.assert_close(grad.double(), want_grad, rtol=tol, atol=tol * scale)


def _run(h, w, y, **kw):
    h.grad = None
    loss = linear_cross_entropy(h, w, y, **kw)
    loss.backward()
    return loss, h.grad


# ---------------------------------------------------------------------------------------------------- hand case


@pytest.mark.parametrize("backend", BACKENDS)
def test_hand_computed(backend):
    """h = I₂, W = [[1,0],[0,1],[1,1]], targets [0, 2]: both rows have logits {1, 0, 1} up to order, so each NLL is
    log(1 + 2e) − 1; row 0's dL/dz = [e/(1+2e) − 1, 1/(1+2e), e/(1+2e)], so dL/dh₀ = [2e/(1+2e) − 1, (1+e)/(1+2e)];
    row 1's dL/dz = [1/(1+2e), e/(1+2e), e/(1+2e) − 1], so dL/dh₁ = [(1+e)/(1+2e) − 1, 2e/(1+2e) − 1]."""
    e = math.e
    h = torch.eye(2, requires_grad=True)
    w = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    loss, grad = _run(h, w, torch.tensor([0, 2]), backend=backend)
    assert loss.item() == pytest.approx(2 * (math.log(1 + 2 * e) - 1), rel=1e-6)
    q = 1 + 2 * e
    want = torch.tensor([[2 * e / q - 1, (1 + e) / q], [(1 + e) / q - 1, 2 * e / q - 1]])
    torch.testing.assert_close(grad, want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_hand_computed_softcap(backend):
    """One token, logits [2, 0] soft-capped at c = 1: z' = [tanh 2, 0]; NLL(target 1) = log(e^{tanh 2} + 1);
    dL/dz = [σ·(1 − tanh² 2), (1 − σ − 1)·(1 − tanh² 0)] = [σ·(1 − tanh² 2), −σ] with σ = e^{tanh 2}/(e^{tanh 2} + 1)
    (the softmax of entry 0); dL/dh = dL/dz (W = I)."""
    t = math.tanh(2.0)
    sig = math.exp(t) / (math.exp(t) + 1)
    h = torch.tensor([[2.0, 0.0]], requires_grad=True)
    loss, grad = _run(h, torch.eye(2), torch.tensor([1]), softcap=1.0, backend=backend)
    assert loss.item() == pytest.approx(math.log(math.exp(t) + 1), rel=1e-6)
    torch.testing.assert_close(grad, torch.tensor([[sig * (1 - t * t), -sig]]), rtol=1e-5, atol=1e-7)


def test_reference_hand_computed():
    h = torch.eye(2, requires_grad=True)
    w = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    loss = reference_linear_cross_entropy(h, w, torch.tensor([0, 2]))
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(2 * (math.log(1 + 2 * math.e) - 1), rel=1e-6)


# ------------------------------------------------------------------------------------------------ vs the oracle


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("softcap,bias", [(None, False), (None, True), (5.0, False), (5.0, True)])
def test_matches_oracle(device, backend, dtype, softcap, bias):
    """Ragged: 37 rows, 10 ignored (27 left), chunks of 8 (27 = 3·8 + 3), V = 300 (not a multiple of the block)."""
    h, w, y, b = _inputs(dtype=dtype, device=device, bias=bias, ignored=range(5, 15))
    loss, grad = _run(h, w, y, bias=b, softcap=softcap, chunk_size=8, backend=backend)
    want_loss, want_grad = _oracle(h, w, y, b, softcap)
    _check(loss, grad, want_loss, want_grad, dtype, device)
    assert torch.all(grad[5:15] == 0)  # ignored rows: exactly no gradient


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("chunk_size", [1, 7, None, 1000])
def test_chunk_sizes(backend, chunk_size):
    """One row per chunk, a chunk that does not divide N, the default, and N (20) smaller than one chunk."""
    h, w, y, _ = _inputs(n=20, vocab=200, seed=3, ignored=[0, 19])
    loss, grad = _run(h, w, y, chunk_size=chunk_size, backend=backend)
    _check(loss, grad, *_oracle(h, w, y), torch.float32, "cpu")


@pytest.mark.parametrize("softcap", [None, 3.0])
def test_torch_row_blocks(monkeypatch, softcap):
    """The torch path works through cache-sized blocks of rows; shrink the block to 3 rows so that a chunk of 16
    spans several blocks (3·5 + 1) and check it against the oracle."""
    monkeypatch.setattr(lce_module, "_ROW_BLOCK_BYTES", 3 * 4 * 200)
    h, w, y, _ = _inputs(n=16, vocab=200, seed=4, ignored=[2])
    loss, grad = _run(h, w, y, softcap=softcap, chunk_size=16, backend="torch")
    _check(loss, grad, *_oracle(h, w, y, softcap=softcap), torch.float32, "cpu")


@pytest.mark.parametrize("backend", BACKENDS)
def test_ignore_index(backend):
    """A whole chunk's worth of ignored rows (8..23 with chunks of 8) and a custom ignore_index that is also a valid
    class id (so rows with that target are skipped, not scored)."""
    h, w, y, _ = _inputs(n=30, vocab=150, seed=5, ignored=range(8, 24))
    loss, grad = _run(h, w, y, chunk_size=8, backend=backend)
    _check(loss, grad, *_oracle(h, w, y), torch.float32, "cpu")
    assert torch.all(grad[8:24] == 0)

    y2 = y.clone()
    y2[8:24] = 7
    y2[0] = 7
    loss2, grad2 = _run(h, w, y2, chunk_size=8, backend=backend, ignore_index=7)
    _check(loss2, grad2, *_oracle(h, w, y2, ignore_index=7), torch.float32, "cpu")
    assert torch.all(grad2[0] == 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_rows_ignored(backend):
    h, w, _, _ = _inputs(n=9, vocab=100)
    loss, grad = _run(h, w, torch.full((9,), -100), backend=backend)
    assert loss.item() == 0.0 and loss.dtype == torch.float32
    assert grad is not None and grad.shape == h.shape and torch.all(grad == 0)


def test_empty_input():
    h = torch.zeros(0, 8, requires_grad=True)
    loss, grad = _run(h, torch.randn(50, 8), torch.zeros(0, dtype=torch.long))
    assert loss.item() == 0.0 and grad.shape == (0, 8)


@pytest.mark.parametrize("backend", BACKENDS)
def test_upstream_gradient_scale(backend):
    h, w, y, _ = _inputs(n=12, vocab=128, seed=6)
    loss = linear_cross_entropy(h, w, y, chunk_size=5, backend=backend)
    (loss * 3.7).backward()
    want_loss, want_grad = _oracle(h, w, y)
    _check(loss.detach(), h.grad, want_loss, 3.7 * want_grad, torch.float32, "cpu")


def test_tied_head():
    """The head is an nn.Embedding's weight: refused while it requires grad in grad mode (no head gradient is
    produced); fine once frozen, or under no_grad; the embedding's weight is not changed or given a gradient."""
    torch.manual_seed(7)
    emb = torch.nn.Embedding(160, 16)
    ids = torch.randint(0, 160, (14,))
    h = (emb(ids) * 2.0).detach().requires_grad_(True)
    y = torch.roll(ids, -1)
    y[-1] = -100
    with pytest.raises(ValueError, match="weight requires grad.*head gradients are not produced"):
        linear_cross_entropy(h, emb.weight, y)
    with torch.no_grad():
        loss_ng = linear_cross_entropy(h, emb.weight, y)
    emb.weight.requires_grad_(False)
    before = emb.weight.clone()
    loss, grad = _run(h, emb.weight, y, chunk_size=4)
    want_loss, want_grad = _oracle(h, emb.weight, y)
    _check(loss, grad, want_loss, want_grad, torch.float32, "cpu")
    assert loss_ng.item() == loss.item()
    assert emb.weight.grad is None and torch.equal(emb.weight, before)


def test_bias_requires_grad_refused():
    h, w, y, b = _inputs(n=4, vocab=64, bias=True)
    with pytest.raises(ValueError, match="bias requires grad.*head gradients are not produced"):
        linear_cross_entropy(h, w, y, bias=b.requires_grad_(True))


def test_no_grad_needed():
    """hidden without requires_grad, or grad mode off: the loss only (no gradient is built or stored)."""
    h, w, y, _ = _inputs(n=10, vocab=90, seed=8)
    want_loss, _ = _oracle(h, w, y)
    loss = linear_cross_entropy(h.detach(), w, y)
    assert not loss.requires_grad and loss.item() == pytest.approx(want_loss, rel=1e-6)
    with torch.no_grad():
        loss = linear_cross_entropy(h, w, y)
    assert not loss.requires_grad and loss.item() == pytest.approx(want_loss, rel=1e-6)
    _, grad = torch.ops.gradmap.linear_cross_entropy_fwd(h.detach(), w, y, None, None, -100, 0, "torch", False)
    assert grad.shape == (0, h.shape[1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_deterministic(backend):
    h, w, y, b = _inputs(n=15, vocab=200, seed=9, bias=True)
    loss1, grad1 = _run(h, w, y, bias=b, softcap=4.0, chunk_size=6, backend=backend)
    grad1 = grad1.clone()
    loss2, grad2 = _run(h, w, y, bias=b, softcap=4.0, chunk_size=6, backend=backend)
    assert torch.equal(loss1, loss2) and torch.equal(grad1, grad2)


def test_reference_matches_oracle():
    h, w, y, b = _inputs(n=11, vocab=70, seed=10, bias=True, ignored=[3])
    loss = reference_linear_cross_entropy(h, w, y, bias=b, softcap=2.5)
    loss.backward()
    want_loss, want_grad = _oracle(h, w, y, b, 2.5)
    assert loss.item() == pytest.approx(want_loss, rel=1e-6)
    torch.testing.assert_close(h.grad.double(), want_grad, rtol=1e-6, atol=1e-9)


# -------------------------------------------------------------------------------------------------- chunk rule


def test_default_chunk_size():
    assert default_chunk_size(262144, 10**6) == 256  # 256 MiB / (262,144 x 4 B)
    assert default_chunk_size(49152, 10**6) == 1365
    assert default_chunk_size(128256, 10**6) == 523
    assert default_chunk_size(262144, 100) == 100  # never more than the rows there are
    assert default_chunk_size(10**9, 100) == 1  # at least one row
    assert default_chunk_size(262144, 10**6, device="cuda", dtype=torch.bfloat16) == 170  # + 2 B of half dL/dz
    assert default_chunk_size(262144, 10**6, device="cuda", dtype=torch.bfloat16, compute_grad=False) == 256


# ------------------------------------------------------------------------------------------------------ errors


def _bad_cases():
    h, w, y, _ = _inputs(n=6, d=8, vocab=40)
    h = h.detach()
    return [
        (dict(hidden=h[0]), "hidden must be a 2-D tensor"),
        (dict(hidden=h.double()), "hidden has dtype torch.float64"),
        (dict(hidden=h.long()), "hidden has dtype torch.int64"),
        (dict(weight=w[:, :5]), "weight must be \\[V, 8\\]"),
        (dict(weight=w.half()), "weight has dtype torch.float16, hidden torch.float32"),
        (dict(weight=w.to("meta")), "weight is on meta"),
        (dict(weight=w[:0]), "weight has an empty vocabulary"),
        (dict(targets=y[:5]), "targets must be a 1-D tensor \\[6\\]"),
        (dict(targets=y.float()), "targets has dtype torch.float32"),
        (dict(bias=torch.zeros(39)), "bias must be \\[40\\]"),
        (dict(softcap=0.0), "softcap must be None or a finite number > 0"),
        (dict(softcap=float("nan")), "softcap must be"),
        (dict(chunk_size=0), "chunk_size must be None or an int >= 1"),
        (dict(backend="cuda"), "backend 'cuda' is not one of"),
        (dict(ignore_index=None), "ignore_index must be an int"),
        (dict(targets=torch.tensor([0, 1, 40, 2, 3, 4])), "targets must lie in \\[0, 40\\).*got 40"),
        (dict(targets=torch.tensor([0, 1, -5, 2, 3, 4])), "targets must lie in .*got -5"),
    ], dict(hidden=h, weight=w, targets=y)


@pytest.mark.parametrize("case", range(len(_bad_cases()[0])))
def test_bad_inputs(case):
    cases, base = _bad_cases()
    change, message = cases[case]
    args = {**base, **change}
    kwargs = {k: v for k, v in args.items() if k not in ("hidden", "weight", "targets")}
    with pytest.raises(ValueError, match=message):
        linear_cross_entropy(args["hidden"], args["weight"], args["targets"], **kwargs)


# ----------------------------------------------------------------------------------------------------- opcheck


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("softcap,bias,compute_grad", [(None, False, True), (2.0, True, True), (None, True, False)])
def test_opcheck(backend, softcap, bias, compute_grad):
    h, w, y, b = _inputs(n=10, d=16, vocab=96, seed=11, bias=bias, ignored=[4])
    if not compute_grad:
        h = h.detach()
    torch.library.opcheck(torch.ops.gradmap.linear_cross_entropy_fwd.default,
                          (h, w, y, b, softcap, -100, 4, backend, compute_grad))
