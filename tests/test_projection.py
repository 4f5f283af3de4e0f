"""Stage-2 linear algebra: streamed Gram statistics, ridge solve, fold into down_proj."""

import pytest
import torch

from gradmap.projection import fold_projection_, gram_accumulate_, solve_ridge


def test_recovers_exact_linear_map_streamed():
    g = torch.Generator().manual_seed(0)
    d = 24
    A = torch.randn(d, d, generator=g, dtype=torch.float64)
    X = torch.randn(500, d, generator=g, dtype=torch.float64)
    Y = X @ A
    G = torch.zeros(d, d, dtype=torch.float64)
    C = torch.zeros(d, d, dtype=torch.float64)
    for chunk in range(0, 500, 64):  # streamed: memory does not grow with tokens
        gram_accumulate_(G, C, X[chunk:chunk + 64].float(), Y[chunk:chunk + 64].float())
    T = solve_ridge(G, C, 0.0)
    torch.testing.assert_close(T, A, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(G, X.float().double().T @ X.float().double(), rtol=1e-12, atol=1e-9)


def test_ridge_hand_computed():
    """1-D case: T = c / (g + lambda * g)."""
    G = torch.tensor([[4.0]], dtype=torch.float64)
    C = torch.tensor([[2.0]], dtype=torch.float64)
    assert solve_ridge(G, C, 0.0).item() == pytest.approx(0.5)
    assert solve_ridge(G, C, 1.0).item() == pytest.approx(2.0 / 8.0)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2), (torch.float16, 2e-3)])
def test_fold_equals_runtime_projection(dtype, tol):
    g = torch.Generator().manual_seed(1)
    lin = torch.nn.Linear(12, 8, bias=True).to(dtype)
    T = torch.randn(8, 8, generator=g, dtype=torch.float64) * 0.3 + torch.eye(8, dtype=torch.float64)
    x = torch.randn(5, 12, generator=g).to(dtype)
    with torch.no_grad():
        want = (lin(x).double() @ T)
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
    with pytest.raises(ValueError, match="X, Y"):
        gram_accumulate_(torch.zeros(2, 2), torch.zeros(2, 2), torch.zeros(3, 2), torch.zeros(4, 2))
