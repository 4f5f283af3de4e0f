"""Native stage-2 ops (csrc/, torch.ops.gradmap.*) against fp64 references, on every device.

Every op test runs on the CPU and, where ``torch.cuda.is_available()``, on CUDA (the ``device`` parameter; the CUDA
cases skip with a reason here). The ops are bound from the dispatcher, so a CUDA tensor runs the CUDA kernel; the
``native`` fixture first asserts that the library registered a kernel for that device (``gradmap.ops.backend``), so a
missing kernel fails instead of silently testing the reference.

The library is built by ``pip install --no-build-isolation .``, ``python3 setup.py build_ext --inplace``, or compiled
on first use (gradmap/ops.py); these tests fail, not skip, when it is missing, except the CMake build test, which
skips with the reason when cmake is absent.
"""

import glob
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap

import pytest
import torch

import gradmap.adapters as adapters_mod
import gradmap.compensation.statistics as stats_mod
from conftest import DEVICES, NEEDS_CUDA, random_calibration, tiny_model
from gradmap import ops
from gradmap.adapters import get_adapter
from gradmap.projection import (fold_projection_, fold_projection_reference, gram_accumulate_, solve_ridge,
                                gram_accumulate_reference)
from gradmap import build_calibration, load_model, load_text
from gradmap.compensation import compensate, gram_statistics
from gradmap.engine import Engine, Windows
from test_compensation import stage2

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
fold_op = torch.ops.gradmap.fold_projection_ if ops.backend("cpu") == "cpp" else None  # loads the library
gram_op = torch.ops.gradmap.gram_accumulate_ if ops.backend("cpu") == "cpp" else None
NATIVE = {"cpu": "cpp", "cuda": "cuda"}
WEIGHT_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ACT_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
# |op − fp64 reference| ≤ atol + rtol·|reference| for the folded weight: the rounding of the weight dtype (the op and
# the reference may round a value that sits near a tie differently) plus, for fp32 T, fp32 accumulation over K terms
# (IEEE fp32 on every device: TF32 would miss these by ~1e-3).
FOLD_TOL = {(torch.float32, torch.float64): (1e-6, 1e-5), (torch.float32, torch.float32): (1e-5, 1e-4),
            (torch.float16, torch.float64): (1e-3, 1e-3), (torch.float16, torch.float32): (1e-3, 1e-3),
            (torch.bfloat16, torch.float64): (8e-3, 8e-3), (torch.bfloat16, torch.float32): (8e-3, 8e-3),
            (torch.float64, torch.float64): (1e-12, 1e-12)}
# Gram statistics against the exact fp64 sum G0 + XᵀX: fp64 G/C differ by summation order only; fp32 G/C receive the
# call's fp64 increment rounded once (accumulation in fp64 on every device), i.e. at most half an fp32 ulp: 2^-24.
GRAM_TOL = {torch.float64: (1e-12, 1e-10), torch.float32: (1.2e-7, 1e-9)}


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


@pytest.fixture
def native(device):
    """The device of the case, after checking that the library has this device's kernels (not the reference)."""
    assert ops.backend(device) == NATIVE[device], \
        f"native {device} kernels not loaded: {ops.unavailable_reason()} (build: see README)"
    return device


def _gram_oracle(G0, C0, X, Y):
    """fp64 G0 + XᵀX and C0 + XᵀY on X's device (one plain fp64 GEMM each)."""
    X64, Y64 = X.double(), Y.double()
    return G0.double() + X64.T @ X64, C0.double() + X64.T @ Y64


def test_backend_reports_native_kernels():
    assert ops.backend("cpu") == "cpp", f"native ops not loaded: {ops.unavailable_reason()} (build: see README)"
    assert ops.backend("cuda:0") == "cuda"  # the CUDA kernels are compiled into every build (plain C++, ATen GEMMs)
    assert ops.backend("meta") == "reference"
    assert ops.unavailable_reason() is None
    info = ops.library_info()
    assert info["source"] in ("prebuilt", "jit") and os.path.isfile(info["path"]) and info["error"] is None


@pytest.mark.parametrize("wdtype,tdtype", list(FOLD_TOL))
@pytest.mark.parametrize("shape", [(70, 133), (1, 5), (65, 1), (128, 64)])
def test_fold_matches_reference(native, shape, wdtype, tdtype):
    g = torch.Generator().manual_seed(sum(shape))
    W = torch.randn(shape, generator=g).to(wdtype)
    T = (torch.randn(shape[0], shape[0], generator=g, dtype=torch.float64) * 0.2 + torch.eye(shape[0])).to(tdtype)
    want = W.clone()
    fold_projection_reference(want, T)  # fp64 on the CPU, rounded once to the weight dtype
    got = W.to(native, copy=True)
    ptr = got.data_ptr()
    fold_op(got, T.to(native))
    assert got.data_ptr() == ptr and got.dtype == wdtype and got.shape == W.shape and got.device.type == native
    rtol, atol = FOLD_TOL[(wdtype, tdtype)]
    torch.testing.assert_close(got.cpu(), want, rtol=rtol, atol=atol)


def test_fold_hand_computed(native):
    """W ← TᵀW on a 2×3 case worked by hand: Tᵀ = [[1, 3], [2, 4]]."""
    W = torch.tensor([[1.0, 0.0, 2.0], [0.0, 1.0, -1.0]], device=native)
    fold_op(W, torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64, device=native))
    assert W.tolist() == [[1.0, 3.0, -1.0], [2.0, 4.0, 0.0]]


@pytest.mark.parametrize("gdtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("ydtype", ACT_DTYPES)
@pytest.mark.parametrize("xdtype", ACT_DTYPES)
def test_gram_matches_reference(native, xdtype, ydtype, gdtype):
    g = torch.Generator().manual_seed(3)
    X = torch.randn(301, 67, generator=g).to(xdtype)
    Y = torch.randn(301, 131, generator=g).to(ydtype)
    G0 = torch.randn(67, 67, generator=g, dtype=gdtype)
    C0 = torch.randn(67, 131, generator=g, dtype=gdtype)
    G_want, C_want = _gram_oracle(G0, C0, X, Y)  # on the CPU
    G, C = G0.to(native, copy=True), C0.to(native, copy=True)
    ptrs = (G.data_ptr(), C.data_ptr())
    gram_op(G, C, X.to(native), Y.to(native))
    assert (G.data_ptr(), C.data_ptr()) == ptrs and G.dtype == C.dtype == gdtype
    rtol, atol = GRAM_TOL[gdtype]
    torch.testing.assert_close(G.cpu().double(), G_want, rtol=rtol, atol=atol)
    torch.testing.assert_close(C.cpu().double(), C_want, rtol=rtol, atol=atol)


def test_gram_hand_computed_and_symmetric(native):
    X = torch.tensor([[1.0, 2.0], [3.0, -1.0]], device=native)
    Y = torch.tensor([[1.0], [2.0]], device=native)
    G = torch.zeros(2, 2, dtype=torch.float64, device=native)
    C = torch.zeros(2, 1, dtype=torch.float64, device=native)
    gram_op(G, C, X, Y)
    gram_op(G, C, X, Y)  # accumulates
    assert G.tolist() == [[20.0, -2.0], [-2.0, 10.0]] and C.tolist() == [[14.0], [0.0]]
    X = torch.randn(40, 1100, device=native)  # several column blocks on every device: mirrored off-diagonal blocks
    G = torch.zeros(1100, 1100, dtype=torch.float64, device=native)
    gram_op(G, torch.zeros(1100, 0, dtype=torch.float64, device=native), X, torch.zeros(40, 0, device=native))
    assert torch.equal(G, G.T)


# (tokens, d, e) that give two token panels (the second partial) and two column blocks of the symmetric update (the
# second partial) on each device: CPU panels of 1024 tokens and blocks of 256; CUDA panels of
# clamp(64 MiB / (8·(d + e)), 256, 8192) tokens (8192 at d + e = 770) and blocks of 512.
PANEL_CASES = {"cpu": (1100, 300, 70), "cuda": (9000, 700, 70)}


@pytest.mark.parametrize("gdtype", [torch.float64, torch.float32])
def test_gram_several_panels_and_blocks(native, gdtype):
    """Two token panels × two column blocks into a non-symmetric G: both triangles get XᵀX, the mirrored block
    included; fp32 G/C get the fp64 sum rounded once."""
    n, d, e = PANEL_CASES[native]
    g = torch.Generator().manual_seed(8)
    X = torch.randn(n, d, generator=g).to(torch.bfloat16).to(native)
    Y = torch.randn(n, e, generator=g).to(native)
    G0 = torch.randn(d, d, generator=g, dtype=torch.float64).to(gdtype).to(native)
    C0 = torch.randn(d, e, generator=g, dtype=torch.float64).to(gdtype).to(native)
    G, C = G0.clone(), C0.clone()
    gram_op(G, C, X, Y)
    G_want, C_want = _gram_oracle(G0, C0, X, Y)
    rtol, atol = GRAM_TOL[gdtype]
    torch.testing.assert_close(G.double(), G_want, rtol=rtol, atol=atol * 10)
    torch.testing.assert_close(C.double(), C_want, rtol=rtol, atol=atol * 10)
    torch.testing.assert_close(G - G0, (G - G0).T, rtol=0, atol=atol * 10 + rtol * 2 * n)  # symmetric increment


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("wdtype", [torch.float32, torch.bfloat16])
def test_fold_several_column_panels_cpu_threads(wdtype, threads):
    """CPU: 1100 weight columns, 37 rows: five 256-column panels (the last 76 wide), split over one or two threads."""
    assert ops.backend("cpu") == "cpp"
    g = torch.Generator().manual_seed(9)
    W = torch.randn(37, 1100, generator=g).to(wdtype)
    T = torch.randn(37, 37, generator=g, dtype=torch.float64) * 0.2 + torch.eye(37, dtype=torch.float64)
    want = (T.T @ W.double()).to(wdtype)
    got = W.clone()
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        fold_op(got, T)
    finally:
        torch.set_num_threads(before)
    rtol, atol = FOLD_TOL[(wdtype, torch.float64)]
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol)


@NEEDS_CUDA
@pytest.mark.parametrize("tdtype", [torch.float64, torch.float32])
def test_fold_several_column_panels_cuda(tdtype):
    """CUDA: panels of max(256, 64 MiB / (2·8·out)) columns: 2048 at out = 2048 with fp64 T, 4096 with fp32 T; 9000
    columns give 5 (fp64) or 3 (fp32) panels, the last partial. Oracle: one fp64 GEMM of the whole weight."""
    assert ops.backend("cuda") == "cuda"
    g = torch.Generator(device="cuda").manual_seed(10)
    W = torch.randn(2048, 9000, generator=g, device="cuda").to(torch.bfloat16)
    T = (torch.randn(2048, 2048, generator=g, device="cuda", dtype=torch.float64) * 0.02
         + torch.eye(2048, device="cuda", dtype=torch.float64)).to(tdtype)
    want = (T.double().T @ W.double()).to(torch.bfloat16)
    got = W.clone()
    fold_op(got, T)
    rtol, atol = FOLD_TOL[(torch.bfloat16, tdtype)]
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol)


@NEEDS_CUDA
def test_cuda_fold_ignores_tf32_setting():
    """fp32 T accumulates in IEEE fp32 even when the caller allows TF32 for matmuls (TF32 keeps 10 mantissa bits:
    errors ~1e-3, far outside the fp32 tolerance); the caller's setting is restored afterwards."""
    g = torch.Generator(device="cuda").manual_seed(11)
    W = torch.randn(512, 700, generator=g, device="cuda")
    T = torch.randn(512, 512, generator=g, device="cuda") * 0.05 + torch.eye(512, device="cuda")
    want = (T.double().T @ W.double()).float()
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        got = W.clone()
        fold_op(got, T)
        assert torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)


def test_fold_transposed_and_strided_views_in_place(native):
    """GPT-2's Conv1D stores down_proj as [in, out]: folding weight.T must update that storage."""
    g = torch.Generator().manual_seed(5)
    for dtype in WEIGHT_DTYPES:
        storage = torch.randn(97, 70, generator=g).to(dtype)  # Conv1D layout [in, out]
        T = torch.randn(70, 70, generator=g, dtype=torch.float64)
        want = storage.T.clone()
        fold_projection_reference(want, T)
        on_device = storage.to(native, copy=True)
        fold_op(on_device.T, T.to(native))
        rtol, atol = FOLD_TOL[(dtype, torch.float64)]
        torch.testing.assert_close(on_device.T.cpu(), want, rtol=rtol, atol=atol)
    # every other column of a wider matrix: the skipped columns stay untouched
    full = torch.randn(33, 40, generator=g)
    T = torch.randn(33, 33, generator=g, dtype=torch.float64)
    want = full[:, ::2].clone()
    fold_projection_reference(want, T)
    work = full.to(native, copy=True)
    fold_op(work[:, ::2], T.to(native))
    torch.testing.assert_close(work[:, ::2].cpu(), want, rtol=1e-6, atol=1e-5)
    assert torch.equal(work[:, 1::2].cpu(), full[:, 1::2])
    # non-contiguous T
    T2 = torch.randn(33, 66, generator=g, dtype=torch.float64)[:, ::2]
    w1, w2 = full.to(native, copy=True), full.clone()
    fold_op(w1, T2.to(native))
    fold_projection_reference(w2, T2.contiguous())
    torch.testing.assert_close(w1.cpu(), w2, rtol=1e-6, atol=1e-5)


def test_gram_strided_inputs_and_outputs(native):
    g = torch.Generator().manual_seed(6)
    Xt = torch.randn(70, 200, generator=g).to(native)  # X = Xt.T is [200, 70], column-major
    Y = torch.randn(200, 100, generator=g).to(native)[:, ::2]
    Gbig = torch.zeros(70, 140, dtype=torch.float64, device=native)
    G = Gbig[:, ::2]  # strided accumulator
    C = torch.zeros(50, 70, dtype=torch.float64, device=native).T
    Cf = torch.zeros(50, 70, device=native).T  # fp32, transposed
    gram_op(G, C, Xt.T, Y)
    G_want, C_want = _gram_oracle(torch.zeros(70, 70), torch.zeros(70, 50), Xt.T.cpu(), Y.cpu())
    torch.testing.assert_close(G.cpu(), G_want, rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(C.cpu(), C_want, rtol=1e-12, atol=1e-10)
    assert torch.all(Gbig[:, 1::2] == 0)
    gram_op(G.float(), Cf, Xt.T, Y)
    torch.testing.assert_close(Cf.cpu().double(), C_want, rtol=1.2e-7, atol=1e-9)


def test_aliased_and_overlapping_inputs_refused(native):
    W = torch.randn(8, 8, device=native)
    with pytest.raises(ValueError, match="weight shares memory with T"):
        fold_op(W, W)
    wide = torch.randn(8, 16, device=native)
    with pytest.raises(ValueError, match="weight shares memory with T"):  # conservative: byte ranges intersect
        fold_op(wide[:, :8], wide[:, 8:])
    with pytest.raises(ValueError, match="internally overlapping"):
        fold_op(torch.ones(4, 1, device=native).expand(4, 3), torch.eye(4, device=native))
    G = torch.zeros(5, 5, dtype=torch.float64, device=native)
    with pytest.raises(ValueError, match="G shares memory with C"):
        gram_op(G, G, torch.randn(3, 5, device=native), torch.randn(3, 5, device=native))
    with pytest.raises(ValueError, match="G shares memory with X"):
        gram_op(G, torch.zeros(5, 5, dtype=torch.float64, device=native), G, G.clone())
    with pytest.raises(ValueError, match="internally overlapping"):
        gram_op(torch.zeros(1, 5, dtype=torch.float64, device=native).expand(5, 5),
                torch.zeros(5, 5, dtype=torch.float64, device=native), torch.randn(3, 5, device=native),
                torch.randn(3, 5, device=native))


def test_op_errors_name_the_argument(native):
    def z(*shape, dtype=torch.float32):
        return torch.zeros(*shape, dtype=dtype, device=native)

    other = "meta" if native == "cpu" else "cpu"
    with pytest.raises(ValueError, match=r"T must be \[4, 4\]"):
        fold_op(z(4, 3), torch.eye(3, device=native))
    with pytest.raises(TypeError, match="T dtype must be float32 or float64"):
        fold_op(z(3, 3), torch.eye(3, dtype=torch.float16, device=native))
    with pytest.raises(TypeError, match="weight dtype must be"):
        fold_op(z(3, 3, dtype=torch.int32), torch.eye(3, device=native))
    with pytest.raises(ValueError, match="same device"):
        fold_op(z(3, 3), torch.eye(3, device=other))
    with pytest.raises(ValueError, match="X and Y must be"):
        gram_op(z(2, 2), z(2, 2), z(3, 2), z(4, 2))
    with pytest.raises(ValueError, match=r"G and C must be \[2, 2\] and \[2, 3\]"):
        gram_op(z(2, 2, dtype=torch.float64), z(2, 2, dtype=torch.float64), z(3, 2), z(3, 3))
    with pytest.raises(TypeError, match="G and C must both be float64 or both float32"):
        gram_op(z(2, 2, dtype=torch.float64), z(2, 2), z(3, 2), z(3, 2))
    with pytest.raises(TypeError, match="X and Y dtypes"):
        gram_op(z(2, 2), z(2, 2), z(3, 2, dtype=torch.int64), z(3, 2))
    with pytest.raises(ValueError, match="one device"):
        gram_op(z(2, 2), z(2, 2), torch.zeros(3, 2, device=other), z(3, 2))


@pytest.mark.parametrize("tdtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("wdtype", WEIGHT_DTYPES)
def test_opcheck_fold(native, wdtype, tdtype):
    torch.library.opcheck(fold_op.default, (torch.randn(9, 5, device=native).to(wdtype),
                                            torch.randn(9, 9, dtype=tdtype, device=native)))


@pytest.mark.parametrize("gdtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("xdtype", ACT_DTYPES)
def test_opcheck_gram(native, xdtype, gdtype):
    args = (torch.zeros(6, 6, dtype=gdtype, device=native), torch.zeros(6, 4, dtype=gdtype, device=native),
            torch.randn(11, 6, device=native).to(xdtype), torch.randn(11, 4, device=native).to(xdtype))
    torch.library.opcheck(gram_op.default, args)


@NEEDS_CUDA
def test_cuda_and_host_kernels_agree():
    """The CUDA kernels agree with the CPU kernels on the same inputs to the accumulation rule's rounding (fp64 G:
    order of fp64 sums; bf16 weight: at most one bf16 rounding step apart)."""
    g = torch.Generator().manual_seed(12)
    X = torch.randn(3000, 320, generator=g).to(torch.bfloat16)
    Y = torch.randn(3000, 320, generator=g).to(torch.bfloat16)
    stats = {}
    for dev in ("cpu", "cuda"):
        G = torch.zeros(320, 320, dtype=torch.float64, device=dev)
        C = torch.zeros(320, 320, dtype=torch.float64, device=dev)
        gram_op(G, C, X.to(dev), Y.to(dev))
        stats[dev] = (G.cpu(), C.cpu())
    torch.testing.assert_close(stats["cuda"], stats["cpu"], rtol=1e-12, atol=1e-9)
    W = torch.randn(320, 900, generator=g).to(torch.bfloat16)
    T = torch.randn(320, 320, generator=g, dtype=torch.float64) * 0.05 + torch.eye(320, dtype=torch.float64)
    w_cpu, w_cuda = W.clone(), W.cuda()
    fold_op(w_cpu, T)
    fold_op(w_cuda, T.cuda())
    torch.testing.assert_close(w_cuda.cpu(), w_cpu, rtol=8e-3, atol=8e-3)


def _stage2(family, device):
    """Stage 2 on a tiny pruned model (layers 2, 3 of 6 removed) on ``device``, through whatever the stage-2 functions
    dispatch to.

    ``gradmap.compensation.statistics`` imports ``gram_accumulate_`` and ``gradmap.adapters`` imports
    ``fold_projection_`` at module level: the two names the reference run monkeypatches.

    Returns the Gram matrix of kept position 1, the down_proj weight of that layer after folding its ridge solution
    (λ = 1e-3, applied unconditionally), and the folded down_proj weights after the full :func:`compensate` (which
    may keep or skip a fold by its cross-validation guard, 4 groups); returned on the CPU.
    """
    cal = random_calibration(nsamples=8, seqlen=16)
    with stage2(cal, family=family, device=device) as (model, engine, traj, dense):
        stats = gram_statistics(traj, dense, 1)
        assert stats.tokens == 8 * 15  # SKIP_FIRST: first position of each window is context only
        G, C = stats.total()
        assert G.device.type == device
        adapter = get_adapter(model)
        down = adapter.down_proj(adapter.layers(model)[1])
        folded, _ = adapter.folded_mlp_out(down.weight, down.bias, solve_ridge(G, C, 1e-3))
        compensate(traj, dense, mode="every-gap", ridge=1e-3)
        full = {orig: o["mlp.down_proj.weight"].cpu() for orig, o in engine.view.overrides.items()}
    return G.cpu(), folded.cpu(), full


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_stage2_through_ops_equals_reference(native, family, monkeypatch):
    G, folded, full = _stage2(family, native)
    monkeypatch.setattr(stats_mod, "gram_accumulate_", gram_accumulate_reference)
    monkeypatch.setattr(adapters_mod, "fold_projection_", fold_projection_reference)
    G_ref, folded_ref, full_ref = _stage2(family, native)
    # G: fp64 sums of the same fp32 products (order differs); weights fp32: T from (nearly) the same solve, folded
    # with fp64 accumulation by both paths, so the difference is fp32 rounding of the written weight.
    torch.testing.assert_close(G, G_ref, rtol=1e-12, atol=1e-9)
    torch.testing.assert_close(folded, folded_ref, rtol=1e-5, atol=1e-6)
    unfolded = get_adapter(tiny_model(family)).down_proj(get_adapter(tiny_model(family)).layers(tiny_model(family))[1])
    assert not torch.allclose(folded, unfolded.weight, atol=1e-4)  # the fold changed the weight
    assert full.keys() == full_ref.keys()
    for k in full:
        torch.testing.assert_close(full[k], full_ref[k], rtol=1e-5, atol=1e-6)


_HAND_CHECK = textwrap.dedent("""
    import json, warnings, torch
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        from gradmap import ops
        from gradmap.projection import fold_projection_, gram_accumulate_
        W = torch.tensor([[1.0, 0.0, 2.0], [0.0, 1.0, -1.0]])
        fold_projection_(W, torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64))
        G = torch.zeros(2, 2, dtype=torch.float64); C = torch.zeros(2, 1, dtype=torch.float64)
        gram_accumulate_(G, C, torch.tensor([[1.0, 2.0], [3.0, -1.0]]), torch.tensor([[1.0], [2.0]]))
        ops.backend("cpu"); ops.backend("cuda")  # asking again neither reloads nor warns again
    assert W.tolist() == [[1.0, 3.0, -1.0], [2.0, 4.0, 0.0]], W
    assert G.tolist() == [[10.0, -1.0], [-1.0, 5.0]] and C.tolist() == [[7.0], [0.0]], (G, C)
    warned = [str(w.message) for w in caught if "native ops unavailable" in str(w.message)]
    print(json.dumps({"backend": ops.backend("cpu"), "info": ops.library_info(), "warned": warned}))
""")


def _run_hand_check(env_overrides: dict, pythonpath: str = ROOT) -> dict:
    """Run :data:`_HAND_CHECK` in a fresh interpreter; return its JSON line. Fails on any traceback."""
    env = {k: v for k, v in os.environ.items() if k not in ("GRADMAP_EXT", "GRADMAP_DISABLE_EXT")}
    env.update(env_overrides, PYTHONPATH=pythonpath)
    out = subprocess.run([sys.executable, "-c", _HAND_CHECK], env=env, capture_output=True, text=True, timeout=900,
                         cwd=pythonpath)  # `python -c` puts the working directory first on sys.path
    assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr[-4000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("switch", [{"GRADMAP_DISABLE_EXT": "1"}, {"GRADMAP_EXT": "off"}])
def test_package_works_without_extension(switch):
    """Native ops switched off: no library loaded, no warning, backend 'reference', and the stage-2 functions still
    give the right values (hand-computed)."""
    result = _run_hand_check(switch)
    assert result["backend"] == "reference" and result["warned"] == [], result
    assert result["info"]["path"] is None and result["info"]["error"].startswith("disabled by"), result


def test_library_for_another_torch_is_rebuilt_just_in_time(tmp_path):
    """A prebuilt library whose _C.build.json names another torch is not loaded; the library is compiled with
    torch.utils.cpp_extension into the cache instead (once: a second process reuses it without compiling)."""
    package = tmp_path / "site" / "gradmap"
    shutil.copytree(os.path.join(ROOT, "gradmap"), package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(os.path.join(ROOT, "csrc"), package / "csrc")  # what an installed wheel carries (setup.py)
    for lib in glob.glob(str(package / "_C*.so")):
        os.remove(lib)
    # a library that WOULD load here (this torch's own build), labelled as built for torch 0.0.1
    shutil.copy(ops.library_info()["path"], package / ("_C" + sysconfig.get_config_var("EXT_SUFFIX")))
    (package / ops.BUILD_INFO).write_text(json.dumps({"torch": "0.0.1", "cuda": None, "python": "3"}))
    env = {"GRADMAP_CACHE": str(tmp_path / "cache")}
    first = _run_hand_check(env, str(tmp_path / "site"))
    assert first["backend"] == "cpp" and first["warned"] == [], first
    info = first["info"]
    assert info["source"] == "jit" and info["path"].startswith(str(tmp_path / "cache" / "torch_extensions")), info
    assert len(info["rejected"]) == 1 and "was built for torch 0.0.1" in info["rejected"][0], info
    built = os.stat(info["path"]).st_mtime_ns
    second = _run_hand_check(env, str(tmp_path / "site"))
    assert second["info"]["path"] == info["path"] and os.stat(info["path"]).st_mtime_ns == built


@pytest.mark.parametrize("env,reason", [
    ({"GRADMAP_EXT": "jit", "CXX": "false"}, "JIT build in "),  # the compiler fails: no library at all
    ({"GRADMAP_EXT": "fast"}, "$GRADMAP_EXT: 'fast' is not one of auto, prebuilt, jit, off"),
])
def test_no_library_warns_once_and_uses_the_reference(tmp_path, env, reason):
    """Whatever goes wrong, importing and using gradmap works: one RuntimeWarning naming the cause, no traceback,
    backend 'reference', the right values from the PyTorch references."""
    result = _run_hand_check({**env, "GRADMAP_CACHE": str(tmp_path / "cache")})
    assert result["backend"] == "reference" and len(result["warned"]) == 1, result
    assert reason in result["warned"][0] and reason in result["info"]["error"], result
    assert result["info"]["path"] is None and result["info"]["source"] is None


@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake not found on PATH: CMake build not tested")
def test_cmake_build_loads_and_computes(tmp_path):
    """The C++-user path: CMakeLists.txt + find_package(Torch) builds the library (CPU and CUDA kernels); load it in
    a fresh process and run the CPU kernel."""
    build = tmp_path / "build"
    prefix = torch.utils.cmake_prefix_path
    env = dict(os.environ, CMAKE_BUILD_PARALLEL_LEVEL=os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL", "2"))
    for cmd in (["cmake", "-S", ROOT, "-B", str(build), f"-DCMAKE_PREFIX_PATH={prefix}",
                 "-DCMAKE_BUILD_TYPE=Release"], ["cmake", "--build", str(build)]):
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
        assert out.returncode == 0, f"{' '.join(cmd)}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    libs = glob.glob(str(build / "libgradmap_ops.so"))
    assert libs, os.listdir(build)
    code = textwrap.dedent(f"""
        import torch
        torch.ops.load_library({libs[0]!r})
        W = torch.tensor([[1.0, 0.0, 2.0], [0.0, 1.0, -1.0]])
        torch.ops.gradmap.fold_projection_(W, torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64))
        assert W.tolist() == [[1.0, 3.0, -1.0], [2.0, 4.0, 0.0]], W
        assert torch._C._dispatch_has_kernel_for_dispatch_key("gradmap::gram_accumulate_", "CUDA")
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr


@pytest.mark.real_model
def test_stage2_through_ops_on_bundled_model(monkeypatch):
    """SmolLM2-135M (d=576), layers 20-23 removed: Gram statistics and the fold at kept layer 19, ops vs reference."""
    torch.set_num_threads(1)
    dense, tok = load_model("default")
    cal = build_calibration(tok, load_text("wiki", "calibration"), nsamples=4, seqlen=64, seed=0)
    results = []
    adapter = get_adapter(dense)
    down = adapter.down_proj(adapter.layers(dense)[19])
    for gram, fold in ((gram_accumulate_, fold_projection_), (gram_accumulate_reference, fold_projection_reference)):
        monkeypatch.setattr(stats_mod, "gram_accumulate_", gram)
        with Engine.for_module(dense) as engine:
            traj = engine.trajectory(Windows.from_calibration(cal, 4, groups=2))
            traj.forward()
            snapshot = traj.snapshot()
            for layer in (20, 21, 22, 23):
                engine.remove(layer)
            stats = gram_statistics(traj, snapshot, 19)
        G, C = stats.total()
        weight = down.weight.detach().clone()
        fold(weight, solve_ridge(G, C, 1e-2))
        results.append((G, weight))
    assert stats.tokens == 4 * 63
    (G, w), (G_ref, w_ref) = results
    torch.testing.assert_close(G, G_ref, rtol=1e-12, atol=1e-8)
    torch.testing.assert_close(w, w_ref, rtol=1e-5, atol=1e-6)  # fp32 weights, fp64 fold on both paths
    assert (w - down.weight).abs().max() > 1e-3  # the fold changed the weight
