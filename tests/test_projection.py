"""Stage-2 linear algebra: streamed Gram statistics, ridge solve, fold into down_proj.

The public functions of gradmap.projection run on the CPU and, where a GPU is present, on CUDA (``device``), through
the native ops where they are loaded; the references follow the same accumulation rule.
"""

import pytest
import torch

from conftest import DEVICES
from gradmap.projection import (fold_projection_, gram_accumulate_, gram_accumulate_reference, solve_ridge, PRIORS)


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


@pytest.mark.parametrize("gdtype", [torch.float64, torch.float32])
def test_recovers_exact_linear_map_streamed(device, gdtype):
    g = torch.Generator().manual_seed(0)
    d = 24
    A = torch.randn(d, d, generator=g, dtype=torch.float64)
    X = torch.randn(500, d, generator=g, dtype=torch.float64)
    Y = X @ A
    G = torch.zeros(d, d, dtype=gdtype, device=device)
    C = torch.zeros(d, d, dtype=gdtype, device=device)
    for chunk in range(0, 500, 64):  # streamed: memory does not grow with tokens
        gram_accumulate_(G, C, X[chunk:chunk + 64].float().to(device), Y[chunk:chunk + 64].float().to(device))
    T = solve_ridge(G, C, 0.0)
    assert T.device.type == device and T.dtype == torch.float64
    # fp32 statistics: 8 calls, each adding an fp64 increment rounded once to fp32
    tol = 1e-4 if gdtype == torch.float64 else 2e-3
    torch.testing.assert_close(T.cpu(), A, rtol=tol, atol=tol)
    want = X.float().double().T @ X.float().double()
    if gdtype == torch.float64:
        torch.testing.assert_close(G.cpu(), want, rtol=1e-12, atol=1e-9)
    else:  # 8 roundings, each at most 2^-24 of the running sum (diagonal ~500, off-diagonal partial sums < 40)
        torch.testing.assert_close(G.cpu().double(), want, rtol=8 * 2**-24, atol=8 * 2**-24 * 40)


@pytest.mark.parametrize("xdtype", [torch.float32, torch.bfloat16])
def test_reference_follows_the_accumulation_rule(device, xdtype):
    """gram_accumulate_reference into fp32 G/C: the exact fp64 increment rounded once (as the op), not an fp32 GEMM."""
    g = torch.Generator().manual_seed(7)
    X = torch.randn(400, 33, generator=g).to(xdtype)
    Y = torch.randn(400, 20, generator=g).to(xdtype)
    G0, C0 = torch.randn(33, 33, generator=g), torch.randn(33, 20, generator=g)
    G, C = G0.to(device, copy=True), C0.to(device, copy=True)
    gram_accumulate_reference(G, C, X.to(device), Y.to(device))
    X64, Y64 = X.double(), Y.double()
    torch.testing.assert_close(G.cpu().double(), G0.double() + X64.T @ X64, rtol=1.2e-7, atol=1e-9)
    torch.testing.assert_close(C.cpu().double(), C0.double() + X64.T @ Y64, rtol=1.2e-7, atol=1e-9)


def test_ridge_hand_computed(device):
    """1-D case: T = c / (g + lambda * g)."""
    G = torch.tensor([[4.0]], dtype=torch.float64, device=device)
    C = torch.tensor([[2.0]], dtype=torch.float64, device=device)
    assert solve_ridge(G, C, 0.0).item() == pytest.approx(0.5)
    assert solve_ridge(G, C, 1.0).item() == pytest.approx(2.0 / 8.0)


def test_identity_prior_hand_computed(device):
    """2x2: G = [[3, 1], [1, 2]] (mean diagonal 2.5), ridge 0.4 -> alpha = 1; (G + I) T = C + I."""
    G = torch.tensor([[3.0, 1.0], [1.0, 2.0]], dtype=torch.float64, device=device)
    C = torch.tensor([[1.0, 0.0], [2.0, 1.0]], dtype=torch.float64, device=device)
    # A = [[4, 1], [1, 3]], A^-1 = [[3, -1], [-1, 4]] / 11, C + I = [[2, 0], [2, 2]]
    want = torch.tensor([[4.0, -2.0], [6.0, 8.0]], dtype=torch.float64) / 11
    torch.testing.assert_close(solve_ridge(G, C, 0.4, prior="identity").cpu(), want, rtol=1e-12, atol=1e-14)
    # the zero prior on the same data: A^-1 C = [[1, -1], [7, 4]] / 11
    torch.testing.assert_close(solve_ridge(G, C, 0.4).cpu(), torch.tensor([[1.0, -1.0], [7.0, 4.0]],
                                                                          dtype=torch.float64) / 11,
                               rtol=1e-12, atol=1e-14)


def test_identity_prior_equals_augmented_least_squares(device):
    """min ||M T - R||^2 + alpha ||T - I||^2 = least squares on [M; sqrt(alpha) I] T = [R; sqrt(alpha) I]."""
    g = torch.Generator().manual_seed(3)
    d, n, lam = 6, 4, 0.05  # fewer tokens than dimensions: G is singular, the prior fills the gap
    M = torch.randn(n, d, generator=g, dtype=torch.float64)
    R = torch.randn(n, d, generator=g, dtype=torch.float64)
    G, C = M.T @ M, M.T @ R
    alpha = lam * torch.diagonal(G).mean()
    eye = torch.eye(d, dtype=torch.float64)
    want = torch.linalg.lstsq(torch.cat([M, alpha.sqrt() * eye]), torch.cat([R, alpha.sqrt() * eye])).solution
    got = solve_ridge(G.to(device), C.to(device), lam, prior="identity")
    assert got.device.type == device
    torch.testing.assert_close(got.cpu(), want, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("prior", PRIORS)
def test_overwrite_gives_the_same_solve_and_only_then_touches_inputs(prior):
    g = torch.Generator().manual_seed(5)
    M = torch.randn(40, 6, generator=g, dtype=torch.float64)
    R = torch.randn(40, 6, generator=g, dtype=torch.float64)
    G, C = M.T @ M, M.T @ R
    G0, C0 = G.clone(), C.clone()
    want = solve_ridge(G, C, 0.3, prior=prior)
    assert torch.equal(G, G0) and torch.equal(C, C0)  # default: inputs untouched
    got = solve_ridge(G, C, 0.3, prior=prior, overwrite=True)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    alpha = 0.3 * float(torch.diagonal(G0).mean())
    torch.testing.assert_close(G, G0 + alpha * torch.eye(6, dtype=torch.float64))  # G + αI, in place


def test_identity_prior_limits():
    g = torch.Generator().manual_seed(4)
    M = torch.randn(10, 5, generator=g, dtype=torch.float64)
    R = torch.randn(10, 5, generator=g, dtype=torch.float64)
    eye = torch.eye(5, dtype=torch.float64)
    # alpha -> inf: T - I = (G + alpha I)^-1 (C - G), of order |C - G| / alpha ~ 1e-12 here
    torch.testing.assert_close(solve_ridge(M.T @ M, M.T @ R, 1e12, prior="identity"), eye, rtol=0, atol=1e-9)
    zero = torch.zeros(5, 5, dtype=torch.float64)
    for ridge in (1e-8, 1e-3, 1.0):  # no data: exactly the identity (the no-op fold)
        assert torch.equal(solve_ridge(zero, zero, ridge, prior="identity"), eye)
    assert torch.equal(solve_ridge(zero.float(), zero.float(), 0.1, prior="identity"), eye)  # fp64 out


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2), (torch.float16, 2e-3)])
def test_fold_equals_runtime_projection(device, dtype, tol):
    g = torch.Generator().manual_seed(1)
    lin = torch.nn.Linear(12, 8, bias=True).to(device, dtype)
    T = torch.randn(8, 8, generator=g, dtype=torch.float64) * 0.3 + torch.eye(8, dtype=torch.float64)
    x = torch.randn(5, 12, generator=g).to(device, dtype)
    with torch.no_grad():
        want = (lin(x).double() @ T.to(device))  # T on the CPU for the fold: moved to the weight's device
        ptr = lin.weight.data_ptr()
        fold_projection_(lin.weight, T, lin.bias)
        assert lin.weight.data_ptr() == ptr and lin.weight.dtype == dtype
        torch.testing.assert_close(lin(x).double(), want, rtol=tol, atol=tol * 4)


def test_errors():
    with pytest.raises(ValueError, match="T: need"):
        fold_projection_(torch.zeros(4, 3), torch.eye(3))
    with pytest.raises(ValueError, match="NaN/inf"):
        solve_ridge(torch.full((2, 2), float("inf")), torch.zeros(2, 2), 0.1)
    with pytest.raises(ValueError, match="ridge: must be >= 0"):
        solve_ridge(torch.eye(2), torch.zeros(2, 2), -1.0)
    with pytest.raises(ValueError, match="prior: 'ones' is not one of 'zero', 'identity'"):
        solve_ridge(torch.eye(2), torch.zeros(2, 2), 0.1, prior="ones")
    with pytest.raises(ValueError, match=r"C: prior='identity' needs a square \[2, 2\] cross term, got \(2, 3\)"):
        solve_ridge(torch.eye(2), torch.zeros(2, 3), 0.1, prior="identity")
    assert solve_ridge(torch.eye(2), torch.zeros(2, 3), 0.1).shape == (2, 3)  # the zero prior takes any [d, e]
    with pytest.raises(ValueError, match="X, Y"):
        gram_accumulate_(torch.zeros(2, 2), torch.zeros(2, 2), torch.zeros(3, 2), torch.zeros(4, 2))
