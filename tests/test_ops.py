"""Native stage-2 ops (csrc/, torch.ops.gradmap.*) against the PyTorch references in gradmap.projection.

The extension is built by ``pip install --no-build-isolation --use-pep517 -e .`` (scripts/install.sh) or
``python3 setup.py build_ext --inplace``; these tests fail, not skip, when it is missing, except the nvcc / cmake
build tests, which skip with the reason when the tool is absent.
"""

import glob
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

import gradmap.adapters as adapters_mod
import gradmap.compensation.statistics as stats_mod
from conftest import random_calibration, tiny_model
from gradmap import ops
from gradmap.adapters import get_adapter
from gradmap.projection import (fold_projection_, fold_projection_reference, gram_accumulate_, solve_ridge,
                                gram_accumulate_reference)
from gradmap import build_calibration, load_model, load_text
from gradmap.compensation import compensate, gram_statistics
from gradmap.engine import Engine, Windows
from test_compensation import stage2

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
fold_op = torch.ops.gradmap.fold_projection_ if ops.backend() == "cpp" else None
gram_op = torch.ops.gradmap.gram_accumulate_ if ops.backend() == "cpp" else None
WEIGHT_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ACT_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
# |op − reference| ≤ atol + rtol·|reference| for the folded weight: the rounding of the weight dtype (the op and the
# reference may round a value that sits near a tie differently) plus, for fp32 T, fp32 accumulation over K terms.
FOLD_TOL = {(torch.float32, torch.float64): (1e-6, 1e-5), (torch.float32, torch.float32): (1e-5, 1e-4),
            (torch.float16, torch.float64): (1e-3, 1e-3), (torch.float16, torch.float32): (1e-3, 1e-3),
            (torch.bfloat16, torch.float64): (8e-3, 8e-3), (torch.bfloat16, torch.float32): (8e-3, 8e-3)}


def test_backend_is_cpp():
    assert ops.backend("cpu") == "cpp", f"native ops not loaded: {ops.unavailable_reason()} (build: see README)"
    assert ops.backend("cuda") in ("cuda", "reference")
    assert ops.unavailable_reason() is None


@pytest.mark.parametrize("tdtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("wdtype", WEIGHT_DTYPES)
@pytest.mark.parametrize("shape", [(70, 133), (1, 5), (65, 1), (128, 64)])
def test_fold_matches_reference(shape, wdtype, tdtype):
    g = torch.Generator().manual_seed(sum(shape))
    W = torch.randn(shape, generator=g).to(wdtype)
    T = (torch.randn(shape[0], shape[0], generator=g, dtype=torch.float64) * 0.2 + torch.eye(shape[0])).to(tdtype)
    want = W.clone()
    fold_projection_reference(want, T)
    got = W.clone()
    ptr = got.data_ptr()
    fold_op(got, T)
    assert got.data_ptr() == ptr and got.dtype == wdtype and got.shape == W.shape
    rtol, atol = FOLD_TOL[(wdtype, tdtype)]
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol)


def test_fold_hand_computed():
    """W ← TᵀW on a 2×3 case worked by hand: Tᵀ = [[1, 3], [2, 4]]."""
    W = torch.tensor([[1.0, 0.0, 2.0], [0.0, 1.0, -1.0]])
    fold_op(W, torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64))
    assert W.tolist() == [[1.0, 3.0, -1.0], [2.0, 4.0, 0.0]]


@pytest.mark.parametrize("gdtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("ydtype", ACT_DTYPES)
@pytest.mark.parametrize("xdtype", ACT_DTYPES)
def test_gram_matches_reference(xdtype, ydtype, gdtype):
    g = torch.Generator().manual_seed(3)
    X = torch.randn(301, 67, generator=g).to(xdtype)
    Y = torch.randn(301, 131, generator=g).to(ydtype)
    G0 = torch.randn(67, 67, generator=g, dtype=gdtype)
    C0 = torch.randn(67, 131, generator=g, dtype=gdtype)
    Gw, Cw, Gg, Cg = G0.clone(), C0.clone(), G0.clone(), C0.clone()
    gram_accumulate_reference(Gw, Cw, X, Y)
    ptrs = (Gg.data_ptr(), Cg.data_ptr())
    gram_op(Gg, Cg, X, Y)
    assert (Gg.data_ptr(), Cg.data_ptr()) == ptrs
    # fp64: both accumulate exactly representable products in fp64 (orders differ); fp32 G: the op adds its fp64
    # sum over the call into G once, the reference accumulates in fp32.
    rtol, atol = (1e-12, 1e-10) if gdtype == torch.float64 else (1e-5, 1e-3)
    torch.testing.assert_close(Gg, Gw, rtol=rtol, atol=atol)
    torch.testing.assert_close(Cg, Cw, rtol=rtol, atol=atol)


def test_gram_hand_computed_and_symmetric():
    X = torch.tensor([[1.0, 2.0], [3.0, -1.0]])
    Y = torch.tensor([[1.0], [2.0]])
    G = torch.zeros(2, 2, dtype=torch.float64)
    C = torch.zeros(2, 1, dtype=torch.float64)
    gram_op(G, C, X, Y)
    gram_op(G, C, X, Y)  # accumulates
    assert G.tolist() == [[20.0, -2.0], [-2.0, 10.0]] and C.tolist() == [[14.0], [0.0]]
    X = torch.randn(40, 150)  # several 64-wide tiles: mirrored off-diagonal tiles
    G = torch.zeros(150, 150, dtype=torch.float64)
    gram_op(G, torch.zeros(150, 0, dtype=torch.float64), X, torch.zeros(40, 0))
    assert torch.equal(G, G.T)


@pytest.mark.parametrize("gdtype", [torch.float64, torch.float32])
def test_gram_several_panels_and_blocks(gdtype):
    """1100 tokens (two token panels of the CPU kernel) × 300 features (two 256-wide blocks of its symmetric update,
    the second partial) into a non-symmetric G: both triangles get XᵀX, the mirrored block included."""
    g = torch.Generator().manual_seed(8)
    X = torch.randn(1100, 300, generator=g).to(torch.bfloat16)
    Y = torch.randn(1100, 70, generator=g)
    G0 = torch.randn(300, 300, generator=g, dtype=torch.float64).to(gdtype)
    C0 = torch.randn(300, 70, generator=g, dtype=torch.float64).to(gdtype)
    G, C = G0.clone(), C0.clone()
    gram_op(G, C, X, Y)
    X64, Y64 = X.double(), Y.double()
    G_want, C_want = G0.double() + X64.T @ X64, C0.double() + X64.T @ Y64
    # fp64: sums of exactly representable products, orders differ; fp32 G/C: one fp32 rounding of the fp64 sum
    rtol, atol = (1e-12, 1e-9) if gdtype == torch.float64 else (1.2e-7, 1e-4)
    torch.testing.assert_close(G.double(), G_want, rtol=rtol, atol=atol)
    torch.testing.assert_close(C.double(), C_want, rtol=rtol, atol=atol)
    torch.testing.assert_close(G - G0, (G - G0).T, rtol=0, atol=atol)  # the increment is symmetric


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("wdtype", [torch.float32, torch.bfloat16])
def test_fold_several_column_panels(wdtype, threads):
    """1100 weight columns, 37 rows: five 256-column panels (the last 76 wide), split over one or two threads."""
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


def test_fold_transposed_and_strided_views_in_place():
    """GPT-2's Conv1D stores down_proj as [in, out]: folding weight.T must update that storage."""
    g = torch.Generator().manual_seed(5)
    for dtype in WEIGHT_DTYPES:
        storage = torch.randn(97, 70, generator=g).to(dtype)  # Conv1D layout [in, out]
        T = torch.randn(70, 70, generator=g, dtype=torch.float64)
        want = storage.T.clone()
        fold_projection_reference(want, T)
        view = storage.T
        fold_op(view, T)
        rtol, atol = FOLD_TOL[(dtype, torch.float64)]
        torch.testing.assert_close(storage.T, want, rtol=rtol, atol=atol)
    # every other column of a wider matrix: the skipped columns stay untouched
    full = torch.randn(33, 40, generator=g)
    before = full.clone()
    T = torch.randn(33, 33, generator=g, dtype=torch.float64)
    want = full[:, ::2].clone()
    fold_projection_reference(want, T)
    fold_op(full[:, ::2], T)
    torch.testing.assert_close(full[:, ::2], want, rtol=1e-6, atol=1e-5)
    assert torch.equal(full[:, 1::2], before[:, 1::2])
    # non-contiguous T
    T2 = torch.randn(33, 66, generator=g, dtype=torch.float64)[:, ::2]
    w1, w2 = before.clone(), before.clone()
    fold_op(w1, T2)
    fold_projection_reference(w2, T2.contiguous())
    torch.testing.assert_close(w1, w2, rtol=1e-6, atol=1e-5)


def test_gram_strided_inputs_and_outputs():
    g = torch.Generator().manual_seed(6)
    Xt = torch.randn(70, 200, generator=g)  # X = Xt.T is [200, 70], column-major
    Y = torch.randn(200, 100, generator=g)[:, ::2]
    Gbig = torch.zeros(70, 140, dtype=torch.float64)
    G = Gbig[:, ::2]  # strided accumulator
    C = torch.zeros(50, 70, dtype=torch.float64).T
    gram_op(G, C, Xt.T, Y)
    Gw = torch.zeros(70, 70, dtype=torch.float64)
    Cw = torch.zeros(70, 50, dtype=torch.float64)
    gram_accumulate_reference(Gw, Cw, Xt.T.contiguous(), Y.contiguous())
    torch.testing.assert_close(G, Gw, rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(C, Cw, rtol=1e-12, atol=1e-10)
    assert torch.all(Gbig[:, 1::2] == 0)


def test_aliased_and_overlapping_inputs_refused():
    W = torch.randn(8, 8)
    with pytest.raises(ValueError, match="weight shares memory with T"):
        fold_op(W, W)
    wide = torch.randn(8, 16)
    with pytest.raises(ValueError, match="weight shares memory with T"):  # conservative: byte ranges intersect
        fold_op(wide[:, :8], wide[:, 8:])
    with pytest.raises(ValueError, match="internally overlapping"):
        fold_op(torch.ones(4, 1).expand(4, 3), torch.eye(4))
    G = torch.zeros(5, 5, dtype=torch.float64)
    with pytest.raises(ValueError, match="G shares memory with C"):
        gram_op(G, G, torch.randn(3, 5), torch.randn(3, 5))
    with pytest.raises(ValueError, match="G shares memory with X"):
        gram_op(G, torch.zeros(5, 5, dtype=torch.float64), G, G.clone())
    with pytest.raises(ValueError, match="internally overlapping"):
        gram_op(torch.zeros(1, 5, dtype=torch.float64).expand(5, 5), torch.zeros(5, 5, dtype=torch.float64),
                torch.randn(3, 5), torch.randn(3, 5))


def test_op_errors_name_the_argument():
    with pytest.raises(ValueError, match=r"T must be \[4, 4\]"):
        fold_op(torch.zeros(4, 3), torch.eye(3))
    with pytest.raises(TypeError, match="T dtype must be float32 or float64"):
        fold_op(torch.zeros(3, 3), torch.eye(3, dtype=torch.float16))
    with pytest.raises(TypeError, match="weight dtype must be"):
        fold_op(torch.zeros(3, 3, dtype=torch.int32), torch.eye(3))
    with pytest.raises(ValueError, match="same device"):
        fold_op(torch.zeros(3, 3), torch.eye(3, device="meta"))
    with pytest.raises(ValueError, match="X and Y must be"):
        gram_op(torch.zeros(2, 2), torch.zeros(2, 2), torch.zeros(3, 2), torch.zeros(4, 2))
    with pytest.raises(ValueError, match=r"G and C must be \[2, 2\] and \[2, 3\]"):
        gram_op(torch.zeros(2, 2, dtype=torch.float64), torch.zeros(2, 2, dtype=torch.float64), torch.zeros(3, 2),
                torch.zeros(3, 3))
    with pytest.raises(TypeError, match="G and C must both be float64 or both float32"):
        gram_op(torch.zeros(2, 2, dtype=torch.float64), torch.zeros(2, 2), torch.zeros(3, 2), torch.zeros(3, 2))
    with pytest.raises(TypeError, match="X and Y dtypes"):
        gram_op(torch.zeros(2, 2), torch.zeros(2, 2), torch.zeros(3, 2, dtype=torch.int64), torch.zeros(3, 2))


@pytest.mark.parametrize("tdtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("wdtype", WEIGHT_DTYPES)
def test_opcheck_fold(wdtype, tdtype):
    torch.library.opcheck(fold_op.default, (torch.randn(9, 5).to(wdtype), torch.randn(9, 9, dtype=tdtype)))


@pytest.mark.parametrize("gdtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("xdtype", ACT_DTYPES)
def test_opcheck_gram(xdtype, gdtype):
    args = (torch.zeros(6, 6, dtype=gdtype), torch.zeros(6, 4, dtype=gdtype), torch.randn(11, 6).to(xdtype),
            torch.randn(11, 4).to(xdtype))
    torch.library.opcheck(gram_op.default, args)


def _stage2(family):
    """Stage 2 on a tiny pruned model (layers 2, 3 of 6 removed), through whatever the stage-2 functions dispatch to.

    ``gradmap.compensation.statistics`` imports ``gram_accumulate_`` and ``gradmap.adapters`` imports
    ``fold_projection_`` at module level: the two names the reference run monkeypatches.

    Returns the Gram matrix of kept position 1, the down_proj weight of that layer after folding its ridge solution
    (λ = 1e-3, applied unconditionally), and the folded down_proj weights after the full :func:`compensate` (which
    may keep or skip a fold by its cross-validation guard, 4 groups).
    """
    cal = random_calibration(nsamples=8, seqlen=16)
    with stage2(cal, family=family) as (model, engine, traj, dense):
        stats = gram_statistics(traj, dense, 1)
        assert stats.tokens == 8 * 15  # SKIP_FIRST: first position of each window is context only
        G, C = stats.total()
        adapter = get_adapter(model)
        down = adapter.down_proj(adapter.layers(model)[1])
        folded, _ = adapter.folded_mlp_out(down.weight, down.bias, solve_ridge(G, C, 1e-3))
        compensate(traj, dense, mode="every-gap", ridge=1e-3)
        full = {orig: o["mlp.down_proj.weight"] for orig, o in engine.view.overrides.items()}
    return G, folded, full


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_stage2_through_ops_equals_reference(family, monkeypatch):
    G, folded, full = _stage2(family)
    monkeypatch.setattr(stats_mod, "gram_accumulate_", gram_accumulate_reference)
    monkeypatch.setattr(adapters_mod, "fold_projection_", fold_projection_reference)
    G_ref, folded_ref, full_ref = _stage2(family)
    # G: fp64 sums of the same fp32 products (order differs); weights fp32: T from (nearly) the same solve, folded
    # with fp64 accumulation by both paths, so the difference is fp32 rounding of the written weight.
    torch.testing.assert_close(G, G_ref, rtol=1e-12, atol=1e-9)
    torch.testing.assert_close(folded, folded_ref, rtol=1e-5, atol=1e-6)
    unfolded = get_adapter(tiny_model(family)).down_proj(get_adapter(tiny_model(family)).layers(tiny_model(family))[1])
    assert not torch.allclose(folded, unfolded.weight, atol=1e-4)  # the fold changed the weight
    assert full.keys() == full_ref.keys()
    for k in full:
        torch.testing.assert_close(full[k], full_ref[k], rtol=1e-5, atol=1e-6)


def test_package_works_without_extension():
    """GRADMAP_DISABLE_EXT=1: no library loaded, backend 'reference', stage-2 functions still give the right values."""
    code = textwrap.dedent("""
        import warnings, torch
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import gradmap
            from gradmap import ops
            from gradmap.projection import fold_projection_, gram_accumulate_
        assert not [w for w in caught if "native ops" in str(w.message)]  # a deliberate disable does not warn
        assert ops.backend("cpu") == "reference", ops.backend("cpu")
        W = torch.tensor([[1.0, 0.0, 2.0], [0.0, 1.0, -1.0]])
        fold_projection_(W, torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64))
        assert W.tolist() == [[1.0, 3.0, -1.0], [2.0, 4.0, 0.0]], W
        G = torch.zeros(2, 2, dtype=torch.float64); C = torch.zeros(2, 1, dtype=torch.float64)
        gram_accumulate_(G, C, torch.tensor([[1.0, 2.0], [3.0, -1.0]]), torch.tensor([[1.0], [2.0]]))
        assert G.tolist() == [[10.0, -1.0], [-1.0, 5.0]] and C.tolist() == [[7.0], [0.0]]
        print("ok", ops.unavailable_reason())
    """)
    env = dict(os.environ, GRADMAP_DISABLE_EXT="1", PYTHONPATH=ROOT)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "ok disabled by GRADMAP_DISABLE_EXT" in out.stdout


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not found on PATH: CUDA sources not compiled")
def test_cuda_sources_compile_with_nvcc(tmp_path):
    include = os.path.join(os.path.dirname(torch.__file__), "include")
    for src in glob.glob(os.path.join(ROOT, "csrc", "**", "*.cu"), recursive=True):
        cmd = ["nvcc", "-c", "-std=c++20", "-arch=sm_80", f"-I{include}",
               f"-I{os.path.join(include, 'torch', 'csrc', 'api', 'include')}", src, "-o",
               str(tmp_path / (os.path.basename(src) + ".o"))]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, f"{' '.join(cmd)}\n{out.stderr[-4000:]}"
        assert (tmp_path / (os.path.basename(src) + ".o")).stat().st_size > 0


@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake not found on PATH: CMake build not tested")
def test_cmake_build_loads_and_computes(tmp_path):
    """The C++-user path: CMakeLists.txt + find_package(Torch) builds the CPU library; load it in a fresh process."""
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
