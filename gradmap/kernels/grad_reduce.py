"""Weight-gradient metric sums of a linear layer without materializing the weight gradient.

For a linear layer :math:`y = x W^\\top` (``x: [T, in]``, ``dy = ∂L/∂y: [T, out]``, ``W: [out, in]``) the weight
gradient is :math:`dW = dy^\\top x` (``[out, in]``). GradMAP's parameter-gradient layer scores (Li et al.,
arXiv 2602.14649, Sec. 3, stage 1) and the first-order Taylor importance (Kim et al., arXiv 2402.02834, Eq. 2) reduce
it to three sums:

* ``grad_l1``: :math:`\\sum_{ij} |dW_{ij}|`
* ``grad_l2``: :math:`\\sum_{ij} dW_{ij}^2`
* ``taylor``:  :math:`\\sum_{ij} |W_{ij}\\, dW_{ij}|`

:func:`linear_grad_reduce` (the custom op ``gradmap::linear_grad_reduce``) returns all three as an fp32 tensor
``[3]`` in that order (:data:`METRIC_INDEX`); computing the two unused sums costs a few element-wise operations per
tile, far less than the matmul, so one op serves every metric. Backends:

* ``triton`` (:func:`_triton_grad_reduce`): one program per ``[BLOCK_M, BLOCK_N]`` tile of dW. It accumulates the
  tile over the token dimension with ``tl.dot`` in fp32 (``BLOCK_K`` tokens per step), then, in the epilogue, loads
  the matching tile of W and reduces the tile to its three sums. Every tile writes its own partials to an fp32
  ``[3, num_tiles]`` buffer, which one ``torch.sum`` reduces afterwards: deterministic (no atomics), and the buffer is
  ``3 * num_tiles`` floats. dW exists only tile by tile in registers. The token dimension cannot be split across
  programs (split-K): the sums are non-linear in dW, so each tile must see all tokens before it is reduced.
* ``torch`` (:func:`_chunked_grad_reduce`): plain PyTorch, dW computed ``chunk_rows`` output rows at a time
  (``dW[r0:r1] = dy[:, r0:r1]ᵀ x``), each chunk reduced and dropped before the next; at most one chunk of dW (and
  one chunk-sized temporary) is alive. Runs on any device.

Dispatch (``backend="auto"``): CUDA tensors → ``triton``; CPU tensors → ``torch``, except that under
``TRITON_INTERPRET=1`` (set before triton is first imported) CPU tensors go to the Triton kernel, run by Triton's
interpreter. The environment variable ``GRADMAP_GRAD_REDUCE=triton|torch|auto`` or the ``backend`` argument forces
one (the argument wins). fp64 inputs always take the ``torch`` path (computed in fp64).

Padding tokens: pass ``token_mask`` (bool ``[T]``, True = real token) to exclude rows, or zero the rows of ``dy``
(a zero ``dy`` row contributes nothing to dW). In LM-loss scoring the padded targets are excluded from the loss, so
``dy`` is already exactly zero at right-padded positions and no mask is needed (see
:mod:`gradmap.kernels.fused_scoring`).

Precision: products are taken in fp32 (fp16/bf16 operands are exact in fp32 products on the tensor cores and are
upcast to fp32 on the CPU and in the interpreter), accumulation in fp32; fp32 operands use ``input_precision="ieee"``
on the GPU (no TF32), so the sums agree with an fp64 reference on the same inputs to fp32 rounding.
"""

from __future__ import annotations

import functools
import os
from typing import Optional

import torch

METRIC_INDEX = {"grad_l1": 0, "grad_l2": 1, "taylor": 2}
"""Position of each metric's sum in the tensor :func:`linear_grad_reduce` returns."""

BACKENDS = ("auto", "triton", "torch")
ENV_BACKEND = "GRADMAP_GRAD_REDUCE"
DEFAULT_CHUNK_ELEMENTS = 1 << 18
"""Default chunk of the ``torch`` path: 2**18 dW elements (1 MiB in fp32), small enough to stay in the L2 cache."""

_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_MIN_BLOCK = 64  # every Triton config has BLOCK_M, BLOCK_N >= this; sizes the partials buffer

# Fixed config for Triton's interpreter (autotuning there would only cost time; small blocks are slow there).
INTERPRETER_CONFIG = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, GROUP_M=4)


# ----------------------------------------------------------------------------------------------------- reference


def reference_linear_grad_reduce(x: torch.Tensor, dy: torch.Tensor, w: torch.Tensor,
                                 token_mask: Optional[torch.Tensor] = None,
                                 dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The naive reference: materialize the whole ``dW = dyᵀ x`` in ``dtype`` and reduce it.

    Args:
        x: layer input ``[..., in]``, any float dtype.
        dy: gradient of the layer output ``[..., out]`` (same leading shape as ``x``).
        w: weight ``[out, in]``.
        token_mask: optional bool ``[...]`` (leading shape of ``x``); False rows are excluded.
        dtype: compute dtype (fp64 by default, fp32 for a cheaper check).

    Returns:
        fp32 ``[3]``: Σ|dW|, Σ dW², Σ|W⊙dW| (GradMAP arXiv 2602.14649 Sec. 3 stage 1; Kim et al. arXiv 2402.02834
        Eq. 2). Holds a full ``[out, in]`` dW; for tests and benchmarks only.
    """
    x2, dy2, mask = _flatten(x, dy, w, token_mask)
    if mask is not None:
        x2, dy2 = x2[mask], dy2[mask]
    dw = dy2.to(dtype).t() @ x2.to(dtype)
    return torch.stack([dw.abs().sum(), dw.square().sum(), (dw * w.to(dtype)).abs().sum()]).float()


# --------------------------------------------------------------------------------------------------- validation


def _flatten(x, dy, w, token_mask):
    """Check shapes/dtypes/devices; return ``x [T, in]``, ``dy [T, out]``, ``mask [T] bool | None``."""
    if not (isinstance(x, torch.Tensor) and isinstance(dy, torch.Tensor) and isinstance(w, torch.Tensor)):
        raise TypeError("linear_grad_reduce: x, dy and w must be tensors")
    if w.dim() != 2:
        raise ValueError(f"linear_grad_reduce: w must be [out, in], got shape {tuple(w.shape)}")
    out_f, in_f = w.shape
    if x.dim() < 1 or x.shape[-1] != in_f:
        raise ValueError(f"linear_grad_reduce: x must be [..., {in_f}] for w {tuple(w.shape)}, got {tuple(x.shape)}")
    if dy.dim() < 1 or dy.shape[-1] != out_f:
        raise ValueError(f"linear_grad_reduce: dy must be [..., {out_f}] for w {tuple(w.shape)}, got "
                         f"{tuple(dy.shape)}")
    if x.shape[:-1] != dy.shape[:-1]:
        raise ValueError(f"linear_grad_reduce: x {tuple(x.shape)} and dy {tuple(dy.shape)} differ in their leading "
                         "(token) dimensions")
    for name, t in (("x", x), ("dy", dy), ("w", w)):
        if t.dtype not in _DTYPES:
            raise TypeError(f"linear_grad_reduce: {name} has dtype {t.dtype}; accepted: float32, float16, bfloat16, "
                            "float64")
    if x.device != dy.device or x.device != w.device:
        raise ValueError(f"linear_grad_reduce: x, dy, w on different devices ({x.device}, {dy.device}, {w.device})")
    mask = None
    if token_mask is not None:
        if token_mask.shape != x.shape[:-1]:
            raise ValueError(f"linear_grad_reduce: token_mask must have the leading shape {tuple(x.shape[:-1])} of x, "
                             f"got {tuple(token_mask.shape)}")
        if token_mask.device != x.device:
            raise ValueError(f"linear_grad_reduce: token_mask on {token_mask.device}, x on {x.device}")
        mask = token_mask.reshape(-1).bool()
    return x.reshape(-1, in_f), dy.reshape(-1, out_f), mask


def resolve_backend(backend: Optional[str], device: torch.device, dtype: torch.dtype) -> str:
    """The backend that runs: ``backend`` (if not None/"auto"), else ``$GRADMAP_GRAD_REDUCE``, else by device.

    Raises:
        ValueError: an unknown backend name (argument or environment variable).
        RuntimeError: ``triton`` forced where it cannot run (no triton; CPU tensors without ``TRITON_INTERPRET=1``;
            fp64 inputs).
    """
    source = "backend"
    if backend in (None, "", "auto"):
        backend, source = os.environ.get(ENV_BACKEND, "auto").strip().lower() or "auto", f"${ENV_BACKEND}"
    if backend not in BACKENDS:
        raise ValueError(f"{source}: {backend!r} is not one of {', '.join(BACKENDS)}")
    if backend == "auto":
        if dtype == torch.float64:
            return "torch"
        if device.type == "cuda" and _triton_available():
            return "triton"
        if device.type == "cpu" and _triton_available() and triton_interpreting():
            return "triton"
        return "torch"
    if backend == "triton":
        if not _triton_available():
            raise RuntimeError(f"{source}: triton is not installed (pip install triton)")
        if dtype == torch.float64:
            raise RuntimeError(f"{source}: the Triton kernel takes fp32/fp16/bf16, not float64; use backend='torch'")
        if device.type == "cpu" and not triton_interpreting():
            raise RuntimeError(f"{source}: the Triton kernel needs a CUDA device, or TRITON_INTERPRET=1 set before "
                               "triton is first imported to interpret it on the CPU")
        if device.type not in ("cpu", "cuda"):
            raise RuntimeError(f"{source}: the Triton kernel does not run on {device.type} tensors")
    return backend


# ----------------------------------------------------------------------------------------------- torch (chunked)


def _chunked_grad_reduce(x: torch.Tensor, dy: torch.Tensor, w: torch.Tensor, mask: Optional[torch.Tensor],
                         chunk_rows: int) -> torch.Tensor:
    """The three sums with dW computed ``chunk_rows`` output rows at a time (at most one chunk of dW and one
    chunk-sized temporary alive).

    ``x [T, in]``, ``dy [T, out]``, ``w [out, in]``; fp16/bf16 are computed in fp32 (x is upcast once: a ``[T, in]``
    fp32 copy, activation-sized), fp64 in fp64. Chunk sums are accumulated in fp64. Returns fp32 ``[3]``.
    """
    out_f, in_f = w.shape
    compute = torch.float64 if torch.float64 in (x.dtype, dy.dtype, w.dtype) else torch.float32
    if mask is not None:
        x, dy = x[mask], dy[mask]
    x = x.to(compute)
    if chunk_rows <= 0:
        chunk_rows = max(1, DEFAULT_CHUNK_ELEMENTS // max(in_f, 1))
    sums = torch.zeros(3, dtype=torch.float64, device=x.device)
    if x.shape[0] == 0:
        return sums.float()
    for r0 in range(0, out_f, chunk_rows):
        r1 = min(out_f, r0 + chunk_rows)
        g = dy[:, r0:r1].to(compute).t() @ x  # [r1 - r0, in]: this chunk of dW, reduced in place below
        # Tensor.sum() is cascade-summed on the CPU; torch.dot and vector_norm accumulate fp32 naively (dot: 2e-6
        # relative error at 2**18 elements, 2.5e-3 at 45 M; vector_norm(ord=1): 0.1 at 45 M).
        sums[1] += g.square().sum()  # the one chunk-sized temporary
        sums[0] += g.abs_().sum()
        sums[2] += g.mul_(w[r0:r1].to(compute)).abs_().sum()
        del g
    return sums.float()


# ------------------------------------------------------------------------------------------------------- triton


@functools.cache
def _triton_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("triton") is not None


def _env_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def triton_interpreting() -> bool:
    """True when the Triton kernel runs in Triton's CPU interpreter.

    Triton picks the interpreter when a kernel is decorated, if ``TRITON_INTERPRET=1`` then; this module decorates
    its kernel on first use, so the kernel object decides once it exists (before that, the environment variable).
    Set the variable before triton is first imported (torch._dynamo/_inductor import it too).
    """
    if not _triton_available():
        return False
    if _kernels.cache_info().currsize == 0 and not _env_interpret():
        return False
    return type(_kernels()[0]).__name__ == "InterpretedFunction"


def _cuda_configs():
    """Autotune configs for Ampere/Hopper (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages): fp16/bf16 tiles as in
    the usual GEMM sweeps, plus smaller tiles for small layers and for fp32 (twice the shared memory per stage).
    Configs that do not fit in shared memory fail to compile and are skipped by the autotuner."""
    import triton

    rows = [(128, 256, 64, 8, 3), (256, 128, 64, 8, 3), (128, 128, 64, 8, 4), (128, 128, 64, 4, 4),
            (128, 128, 32, 4, 4), (64, 128, 64, 4, 4), (128, 64, 64, 4, 4), (64, 64, 64, 4, 4), (64, 64, 32, 4, 5)]
    assert all(m >= _MIN_BLOCK and n >= _MIN_BLOCK for m, n, *_ in rows)
    return [triton.Config(dict(BLOCK_M=m, BLOCK_N=n, BLOCK_K=k, GROUP_M=8), num_warps=wp, num_stages=st)
            for m, n, k, wp, st in rows]


def _prune_configs(configs, named_args, **kwargs):
    """Drop configs whose tile is much larger than the matrix (e.g. 256-row tiles for a 64-row layer)."""
    import triton

    args = {**named_args, **kwargs}
    out_f, in_f = args["OUT"], args["IN"]
    cap_m, cap_n = max(_MIN_BLOCK, triton.next_power_of_2(out_f)), max(_MIN_BLOCK, triton.next_power_of_2(in_f))
    kept = [c for c in configs if c.kwargs["BLOCK_M"] <= cap_m and c.kwargs["BLOCK_N"] <= cap_n]
    return kept or configs[-1:]


@functools.cache
def _kernels():
    """Build the Triton kernel (plain, for the interpreter) and its autotuned variant (for CUDA) on first use, so that
    importing this module does not import triton."""
    import triton
    import triton.language as tl

    @triton.jit
    def linear_grad_reduce_kernel(
        x_ptr, dy_ptr, w_ptr, mask_ptr, partials_ptr,
        T, OUT, IN, T_BUCKET, num_slots,
        stride_xt, stride_xi, stride_dyt, stride_dyo, stride_wo, stride_wi,
        HAS_MASK: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    ):
        # Tile (pid_m, pid_n) of dW = dy^T x, in grouped order so that GROUP_M row-tiles reuse the same x columns
        # from L2.
        pid = tl.program_id(0)
        num_m = tl.cdiv(OUT, BLOCK_M)
        num_n = tl.cdiv(IN, BLOCK_N)
        per_group = GROUP_M * num_n
        first_m = (pid // per_group) * GROUP_M
        group_rows = tl.minimum(num_m - first_m, GROUP_M)
        pid_m = first_m + (pid % per_group) % group_rows
        pid_n = (pid % per_group) // group_rows

        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        m_ok = offs_m < OUT
        n_ok = offs_n < IN
        # dy^T tile [BLOCK_M, BLOCK_K] and x tile [BLOCK_K, BLOCK_N]; pointers advance by BLOCK_K token rows.
        a_ptrs = dy_ptr + offs_m[:, None] * stride_dyo + offs_k[None, :] * stride_dyt
        b_ptrs = x_ptr + offs_k[:, None] * stride_xt + offs_n[None, :] * stride_xi
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in tl.range(0, T, BLOCK_K):
            k_ok = (k0 + offs_k) < T
            if HAS_MASK:
                keep = tl.load(mask_ptr + k0 + offs_k, mask=k_ok, other=0)
                k_ok = k_ok & (keep != 0)
            a = tl.load(a_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            if UPCAST:  # interpreter: tl.dot on bf16 is wrong there
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
            a_ptrs += BLOCK_K * stride_dyt
            b_ptrs += BLOCK_K * stride_xt

        # Epilogue: reduce the finished dW tile (out-of-range rows/columns are exactly 0: masked loads).
        w_ptrs = w_ptr + offs_m[:, None].to(tl.int64) * stride_wo + offs_n[None, :].to(tl.int64) * stride_wi
        w = tl.load(w_ptrs, mask=m_ok[:, None] & n_ok[None, :], other=0.0).to(tl.float32)
        l1 = tl.sum(tl.sum(tl.abs(acc), axis=1), axis=0)
        l2 = tl.sum(tl.sum(acc * acc, axis=1), axis=0)
        ty = tl.sum(tl.sum(tl.abs(acc * w), axis=1), axis=0)
        tl.store(partials_ptr + pid, l1)
        tl.store(partials_ptr + num_slots + pid, l2)
        tl.store(partials_ptr + 2 * num_slots + pid, ty)

    tuned = triton.autotune(configs=_cuda_configs(), key=["OUT", "IN", "T_BUCKET"], reset_to_zero=["partials_ptr"],
                            prune_configs_by={"early_config_prune": _prune_configs})(linear_grad_reduce_kernel)
    return linear_grad_reduce_kernel, tuned


def _triton_grad_reduce(x: torch.Tensor, dy: torch.Tensor, w: torch.Tensor,
                        mask: Optional[torch.Tensor]) -> torch.Tensor:
    """Launch the Triton kernel: ``x [T, in]``, ``dy [T, out]``, ``w [out, in]`` → fp32 ``[3]``."""
    import triton

    plain, tuned = _kernels()
    interpreting = type(plain).__name__ == "InterpretedFunction"
    if x.dtype != dy.dtype:  # tl.dot needs one operand dtype
        common = torch.promote_types(x.dtype, dy.dtype)
        x, dy = x.to(common), dy.to(common)
    t_len, in_f = x.shape
    out_f = w.shape[0]
    # The kernel's first pointer offsets are int32 (later steps advance 64-bit pointers): a view whose feature
    # stride is huge (e.g. a transposed [in, T] buffer) is copied so that feature offsets stay below 2**31.
    x = x if x.stride(1) * in_f < 2**31 else x.contiguous()
    dy = dy if dy.stride(1) * out_f < 2**31 else dy.contiguous()
    num_slots = triton.cdiv(out_f, _MIN_BLOCK) * triton.cdiv(in_f, _MIN_BLOCK)
    partials = torch.zeros(3, max(num_slots, 1), dtype=torch.float32, device=x.device)
    if t_len == 0 or num_slots == 0:
        return partials.sum(dim=1)
    mask_arg = mask.to(torch.uint8).contiguous() if mask is not None else partials  # dummy pointer when unused
    upcast = interpreting and x.dtype != torch.float32
    precision = "ieee" if (x.dtype == torch.float32 or upcast) else "tf32"  # only fp32 operands look at it
    args = (x, dy, w, mask_arg, partials, t_len, out_f, in_f, triton.next_power_of_2(t_len), num_slots,
            x.stride(0), x.stride(1), dy.stride(0), dy.stride(1), w.stride(0), w.stride(1))
    flags = dict(HAS_MASK=mask is not None, UPCAST=upcast, DOT_PRECISION=precision)

    def grid(meta):
        return (triton.cdiv(out_f, meta["BLOCK_M"]) * triton.cdiv(in_f, meta["BLOCK_N"]),)

    if interpreting:
        plain[grid](*args, **flags, **INTERPRETER_CONFIG)
    else:
        with torch.cuda.device(x.device):
            tuned[grid](*args, **flags)
    return partials.sum(dim=1)


# ---------------------------------------------------------------------------------------------------- custom op


@torch.library.custom_op("gradmap::linear_grad_reduce", mutates_args=())
def _linear_grad_reduce_op(x: torch.Tensor, dy: torch.Tensor, w: torch.Tensor,
                           token_mask: Optional[torch.Tensor] = None, backend: str = "auto",
                           chunk_rows: int = 0) -> torch.Tensor:
    x2, dy2, mask = _flatten(x, dy, w, token_mask)
    dtype = torch.float64 if torch.float64 in (x.dtype, dy.dtype, w.dtype) else x.dtype
    chosen = resolve_backend(backend, x.device, dtype)
    if chosen == "triton":
        return _triton_grad_reduce(x2, dy2, w, mask)
    return _chunked_grad_reduce(x2, dy2, w, mask, chunk_rows)


@_linear_grad_reduce_op.register_fake
def _(x, dy, w, token_mask=None, backend="auto", chunk_rows=0):
    torch._check(w.dim() == 2, lambda: "linear_grad_reduce: w must be [out, in]")
    torch._check(x.shape[-1] == w.shape[1] and dy.shape[-1] == w.shape[0],
                 lambda: "linear_grad_reduce: x [..., in] / dy [..., out] do not match w [out, in]")
    return x.new_empty((3,), dtype=torch.float32)


def linear_grad_reduce(x: torch.Tensor, dy: torch.Tensor, w: torch.Tensor, token_mask: Optional[torch.Tensor] = None,
                       *, backend: Optional[str] = None, chunk_rows: int = 0) -> torch.Tensor:
    """Σ|dW|, Σ dW², Σ|W⊙dW| of the weight gradient ``dW = dyᵀ x`` of ``y = x Wᵀ``, without materializing dW.

    Formulas: GradMAP (Li et al., arXiv 2602.14649, Sec. 3, stage 1) parameter-gradient magnitudes; the Taylor sum is
    the first-order Taylor importance of Kim et al. (arXiv 2402.02834, Eq. 2). Calls the custom op
    ``torch.ops.gradmap.linear_grad_reduce`` (usable under ``torch.compile``; not differentiable).

    Args:
        x: layer input ``[..., in]`` (leading dims are flattened into tokens), fp32/fp16/bf16 (fp64: torch path).
        dy: ``∂L/∂y``, ``[..., out]``, same leading shape as ``x``; may differ in dtype from ``x`` (promoted).
        w: the weight ``[out, in]``; only read by the ``taylor`` sum.
        token_mask: optional bool ``[...]`` (leading shape of ``x``): False rows (padding) are excluded. Zeroing the
            rows of ``dy`` instead has the same effect.
        backend: ``"triton"``, ``"torch"`` or ``"auto"``/None (then ``$GRADMAP_GRAD_REDUCE``, then by device; see the
            module docstring).
        chunk_rows: rows of dW per chunk on the ``torch`` path (0: about 2**18 elements per chunk).

    Returns:
        fp32 tensor ``[3]`` on ``x``'s device: ``[Σ|dW|, Σ dW², Σ|W⊙dW|]`` (indices in :data:`METRIC_INDEX`).

    Raises:
        TypeError: non-tensor inputs or an unsupported dtype.
        ValueError: shapes that do not match ``w [out, in]``, mixed devices, a bad ``token_mask`` or backend name.
        RuntimeError: ``backend="triton"`` where the kernel cannot run (see :func:`resolve_backend`).
    """
    return torch.ops.gradmap.linear_grad_reduce(x, dy, w, token_mask, backend or "auto", int(chunk_rows))
