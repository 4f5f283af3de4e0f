"""Fused linear cross-entropy: the LM-head projection and the next-token loss without the full logits.

For the final-norm hidden states ``h: [N, d]`` of N tokens, the LM head ``W: [V, d]`` (optional bias ``b: [V]``)
and next-token targets ``y: [N]``, the loss is the summed softmax cross-entropy (the negative log-likelihood of the
target token, in nats)::

    z_i    = W h_i + b                                  logits, [V] per token
    z_i   <- c * tanh(z_i / c)                          optional final-logit soft-capping (Gemma 2, arXiv
                                                        2408.00118, Sec. 2: "logit soft-capping", c = 30 there)
    loss   = sum_{i: y_i != ignore}  logsumexp(z_i) - z_i[y_i]

and its gradient with respect to the hidden states is, per token (softmax cross-entropy derivative, with the chain
rule of the soft-cap ``d(c tanh(x/c))/dx = 1 - tanh²(x/c)``)::

    dL/dz_i = (softmax(z_i) - onehot(y_i)) * (1 - tanh²(z_i / c))     (last factor only with soft-capping)
    dL/dh_i = (dL/dz_i)ᵀ W

Materializing ``z`` for a whole batch costs ``N * V * 4`` bytes in fp32 (Gemma-3-270M: V = 262,144, so 1 GiB per
1,024 tokens, and autograd keeps two or three such tensors). :func:`linear_cross_entropy` instead walks the tokens in
chunks of ``chunk_size`` rows and, for each chunk, computes the logits (one GEMM, fp32 output), the log-sum-exp and
target NLL, overwrites the logits in place with ``dL/dz`` and multiplies it back through ``W`` (a second GEMM) into
the chunk's rows of ``grad_hidden [N, d]``. At most one chunk of logits is ever alive; the gradient is finished
during the forward, so the backward is only ``grad_output * grad_hidden`` (the design of Liger-Kernel's fused linear
cross-entropy; this is an independent implementation). Rows whose target is ``ignore_index`` are dropped before the
GEMM (they contribute neither loss nor gradient), so padding costs nothing.

Backends (``backend=``):

* ``"torch"`` (:func:`_torch_rows`): the per-chunk softmax step in plain PyTorch, in place on the chunk's fp32
  logits, a cache-sized block of rows (4 MiB) at a time (soft-capping needs one temporary of a block's size). Runs
  on any device; the default on CPU.
* ``"triton"`` (:func:`_triton_rows`): a Triton kernel, one program per token row, the vocabulary tiled in blocks of
  ``BLOCK_V``: pass 1 keeps a running max and rescaled sum (online log-sum-exp) and reads the target logit; pass 2
  (only when a gradient is wanted) rewrites each block with ``dL/dz``. No atomics: every program owns its row, so the
  result is deterministic. The default on CUDA; on the CPU it runs only under Triton's interpreter
  (``TRITON_INTERPRET=1`` set before triton is first imported), for tests.

Both backends share the GEMMs (:func:`_chunk_logits`, :func:`_chunk_grad`): fp32 inputs use ``torch.mm`` in fp32;
fp16/bf16 inputs produce fp32 logits (on CUDA ``torch.mm(..., out_dtype=torch.float32)``, cuBLAS with fp32
accumulation and output; on the CPU, which has no such GEMM, ``W`` is upcast to fp32 ``_CPU_UPCAST_BYTES`` at a
time). The loss is always fp32 (per-row NLLs summed in fp64, then rounded); ``grad_hidden`` is in ``hidden``'s dtype.

Default chunk size (:func:`default_chunk_size`)::

    chunk_rows = clamp(floor(target_bytes / (V * bytes_per_logit)), 1, max(1, N_valid))

with ``bytes_per_logit = 4`` (the fp32 logits buffer; +2 on CUDA for half-precision inputs when a gradient is
computed, the fp16/bf16 copy of ``dL/dz`` that feeds the second GEMM) and ``target_bytes`` =
:data:`CHUNK_TARGET_BYTES` = 256 MiB on every device: 256 rows for V = 262,144, 523 for V = 128,256, 1,365 for
V = 49,152. CPU tradeoff (``benchmarks/bench_loss.py --sweep-chunks``, V = 262,144, d = 640, 512 tokens, 1 thread,
docs/bench_loss.json): 26.3 ms per token at 32 rows per chunk, 21.0 at 64, 20.3 at 128, 17.5 at 256, 17.7 at 512.
Every chunk streams all of W twice (``2 V d`` elements, 1.3 GB here), which small chunks cannot amortize; a chunk that
fits the 32 MiB L3 cache (32 rows) is the slowest, so the target is set where the time flattens, not by cache size.

The op is registered as ``gradmap::linear_cross_entropy_fwd`` (:func:`torch.library.custom_op` with a fake kernel,
so it passes :func:`torch.library.opcheck` and traces under ``torch.compile``); its autograd formula
(:func:`torch.library.register_autograd`) scales the stored gradient. The C++ library's ``TORCH_LIBRARY(gradmap,
...)`` defines only ``fold_projection_`` and ``gram_accumulate_``; Python ops in the same namespace are added by
``torch.library`` fragments (as ``gradmap::linear_grad_reduce`` is), so the names must not collide, and do not.
"""

from __future__ import annotations

import functools
import importlib.util
import math
from typing import Optional

import torch
import torch.nn.functional as F

BACKENDS = ("auto", "torch", "triton")
CHUNK_TARGET_BYTES = 256 << 20
"""Memory target of one chunk's logits (and, on CUDA with fp16/bf16, their half-precision copy): 256 MiB."""

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_ROW_BLOCK_BYTES = 4 << 20  # torch path: fp32 logits of the rows processed together (cache-sized; the soft-cap temp)
_CPU_UPCAST_BYTES = 16 << 20  # fp32 bytes of W upcast at a time for fp16/bf16 GEMMs on the CPU
_CUDA_BLOCK_V, _CUDA_NUM_WARPS = 8192, 16  # Triton config on CUDA (not tuned on a GPU yet)
_INTERPRETER_BLOCK_V = 128  # Triton's interpreter: small vocabularies in tests, several blocks per row


# --------------------------------------------------------------------------------------------------- validation


def _check_inputs(name: str, hidden, weight, targets, bias, softcap, ignore_index, chunk_size, backend) -> None:
    """Shape/dtype/device checks shared by the fused function and the reference (no data-dependent checks, so it is
    safe under ``torch.compile``). Raises ValueError naming the argument."""
    if not isinstance(hidden, torch.Tensor) or hidden.dim() != 2:
        raise ValueError(f"{name}: hidden must be a 2-D tensor [N, d], got "
                         f"{tuple(hidden.shape) if isinstance(hidden, torch.Tensor) else type(hidden).__name__}")
    if hidden.dtype not in _DTYPES:
        raise ValueError(f"{name}: hidden has dtype {hidden.dtype}; accepted: float32, float16, bfloat16")
    n, d = hidden.shape
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.shape[1] != d:
        raise ValueError(f"{name}: weight must be [V, {d}] for hidden {tuple(hidden.shape)}, got "
                         f"{tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__}")
    if weight.dtype != hidden.dtype:
        raise ValueError(f"{name}: weight has dtype {weight.dtype}, hidden {hidden.dtype}; they must match")
    if weight.shape[0] == 0:
        raise ValueError(f"{name}: weight has an empty vocabulary (shape {tuple(weight.shape)})")
    if not isinstance(targets, torch.Tensor) or targets.dim() != 1 or targets.shape[0] != n:
        raise ValueError(f"{name}: targets must be a 1-D tensor [{n}] (one per hidden row), got "
                         f"{tuple(targets.shape) if isinstance(targets, torch.Tensor) else type(targets).__name__}")
    if targets.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"{name}: targets has dtype {targets.dtype}; expected torch.long (or int32)")
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or bias.dim() != 1 or bias.shape[0] != weight.shape[0]:
            raise ValueError(f"{name}: bias must be [{weight.shape[0]}] (one per vocabulary row of weight), got "
                             f"{tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__}")
        if bias.dtype not in _DTYPES:
            raise ValueError(f"{name}: bias has dtype {bias.dtype}; accepted: float32, float16, bfloat16")
    for arg, t in (("weight", weight), ("targets", targets), ("bias", bias)):
        if t is not None and t.device != hidden.device:
            raise ValueError(f"{name}: {arg} is on {t.device}, hidden on {hidden.device}")
    if softcap is not None and (isinstance(softcap, bool) or not isinstance(softcap, (int, float))
                                or not math.isfinite(softcap) or softcap <= 0):
        raise ValueError(f"{name}: softcap must be None or a finite number > 0, got {softcap!r}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise ValueError(f"{name}: ignore_index must be an int, got {ignore_index!r}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"{name}: chunk_size must be None or an int >= 1, got {chunk_size!r}")
    if backend not in BACKENDS:
        raise ValueError(f"{name}: backend {backend!r} is not one of {', '.join(BACKENDS)}")


def default_chunk_size(vocab_size: int, num_rows: int, *, device: torch.device | str = "cpu",
                       dtype: torch.dtype = torch.float32, compute_grad: bool = True,
                       target_bytes: int = CHUNK_TARGET_BYTES) -> int:
    """Token rows per chunk: ``clamp(target_bytes // (vocab_size * bytes_per_logit), 1, max(1, num_rows))``.

    ``bytes_per_logit`` is 4 (the fp32 logits buffer), plus 2 on CUDA for fp16/bf16 inputs with ``compute_grad``
    (the half-precision copy of dL/dz fed to the second GEMM). With the default 256 MiB target: 256 rows for
    V = 262,144 and 1,365 for V = 49,152.

    Args:
        vocab_size: V, rows of the LM head.
        num_rows: tokens to process (the non-ignored rows); the chunk never exceeds it.
        device, dtype: where and in which dtype the inputs are.
        compute_grad: whether the gradient with respect to the hidden states is computed.
        target_bytes: memory target of one chunk, in bytes.

    Returns:
        int >= 1.
    """
    per_logit = 4
    if torch.device(device).type == "cuda" and dtype != torch.float32 and compute_grad:
        per_logit += 2
    rows = target_bytes // max(1, vocab_size * per_logit)
    return int(max(1, min(rows, max(1, num_rows))))


def _triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    """True when this module's Triton kernel runs in Triton's CPU interpreter (decided when the kernel is first
    built: ``TRITON_INTERPRET=1`` must be set before triton is first imported). Builds the kernel (imports triton);
    False if triton is not installed."""
    if not _triton_available():
        return False
    return type(_row_kernel()).__name__ == "InterpretedFunction"


def resolve_backend(backend: str, device: torch.device) -> str:
    """The backend that runs: ``backend`` if given, else ``triton`` on CUDA (when triton is installed), ``torch``
    otherwise (also on the CPU under the interpreter: ask for ``triton`` explicitly there).

    Raises:
        ValueError: an unknown backend name.
        RuntimeError: ``triton`` where it cannot run (not installed; CPU tensors without the interpreter; another
            device type).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend: {backend!r} is not one of {', '.join(BACKENDS)}")
    if backend == "auto":
        return "triton" if device.type == "cuda" and _triton_available() else "torch"
    if backend == "triton":
        if not _triton_available():
            raise RuntimeError("backend='triton': triton is not installed (pip install triton)")
        if device.type == "cpu" and not interpreting():
            raise RuntimeError("backend='triton' on CPU tensors needs TRITON_INTERPRET=1 set before triton is first "
                               "imported (Triton's interpreter); use backend='torch' on the CPU")
        if device.type not in ("cpu", "cuda"):
            raise RuntimeError(f"backend='triton' does not run on {device.type} tensors; use backend='torch'")
    return backend


# ---------------------------------------------------------------------------------------------------------- GEMMs


def _upcast_rows(weight: torch.Tensor) -> int:
    """Rows of ``weight`` upcast to fp32 at a time on the CPU (about ``_CPU_UPCAST_BYTES``)."""
    return max(1, _CPU_UPCAST_BYTES // (4 * weight.shape[1]))


def _chunk_logits(h: torch.Tensor, weight: torch.Tensor, bias32: Optional[torch.Tensor], out: torch.Tensor) -> None:
    """``out [R, V] fp32 <- h [R, d] @ weightᵀ (+ bias32)`` with fp32 accumulation and output."""
    if weight.dtype == torch.float32:
        torch.mm(h, weight.t(), out=out)
    elif h.device.type == "cuda":
        torch.mm(h, weight.t(), out_dtype=torch.float32, out=out)
    else:  # the CPU has no fp16/bf16 -> fp32 GEMM: upcast W a block of vocabulary rows at a time
        h32, step = h.float(), _upcast_rows(weight)
        for v0 in range(0, weight.shape[0], step):
            out[:, v0:v0 + step] = h32 @ weight[v0:v0 + step].float().t()
    if bias32 is not None:
        out.add_(bias32)


def _chunk_grad(dlogits: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``dL/dh [R, d] = dlogits [R, V] (fp32) @ weight [V, d]``; fp32 result, or ``weight``'s dtype on CUDA."""
    if weight.dtype == torch.float32:
        return dlogits @ weight
    if dlogits.device.type == "cuda":  # tensor cores: dL/dz rounded to fp16/bf16, fp32 accumulation
        return dlogits.to(weight.dtype) @ weight
    acc, step = dlogits.new_zeros(dlogits.shape[0], weight.shape[1]), _upcast_rows(weight)
    for v0 in range(0, weight.shape[0], step):
        acc.addmm_(dlogits[:, v0:v0 + step], weight[v0:v0 + step].float())
    return acc


# --------------------------------------------------------------------------------------- per-chunk softmax: torch


def _torch_rows(logits: torch.Tensor, targets: torch.Tensor, softcap: Optional[float], compute_grad: bool
                ) -> torch.Tensor:
    """Per-row NLL of ``logits [R, V]`` (fp32, contiguous, every target in ``[0, V)``); when ``compute_grad``,
    ``logits`` is overwritten with dL/dz (softmax − onehot, times 1 − tanh² with soft-capping). Returns fp32 [R].

    Works through blocks of about ``_ROW_BLOCK_BYTES`` of rows, so that the several passes over a block (max,
    exp, sum, scale) hit the cache; soft-capping needs one temporary of a block's size (exp of the capped logits).
    """
    vocab = logits.shape[1]
    loss = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
    step = max(1, _ROW_BLOCK_BYTES // (4 * vocab))
    for r0 in range(0, logits.shape[0], step):
        z, col = logits[r0:r0 + step], targets[r0:r0 + step, None]
        if softcap is None:
            z_target = z.gather(1, col)
            m = z.amax(dim=1, keepdim=True)
            s = z.sub_(m).exp_().sum(dim=1, keepdim=True)  # z now holds exp(z - m)
            loss[r0:r0 + step] = (m + s.log() - z_target).squeeze(1)
            if compute_grad:
                z.div_(s).scatter_add_(1, col, torch.full_like(z_target, -1.0))
            continue
        c = float(softcap)
        t = z.div_(c).tanh_()  # z now holds t = tanh(z / c); the capped logit is c * t
        t_target = t.gather(1, col)
        m = t.amax(dim=1, keepdim=True).mul_(c)
        e = torch.exp(t * c - m)
        s = e.sum(dim=1, keepdim=True)
        loss[r0:r0 + step] = (m + s.log() - c * t_target).squeeze(1)
        if compute_grad:  # softmax * (1 - t^2), then the target's -1 * (1 - t^2)
            t.mul_(t).neg_().add_(1.0).mul_(e).div_(s).scatter_add_(1, col, t_target * t_target - 1.0)
    return loss


# -------------------------------------------------------------------------------------- per-chunk softmax: triton


@functools.cache
def _row_kernel():
    """Build the Triton kernel on first use (importing this module does not import triton)."""
    import triton
    import triton.language as tl

    @triton.jit
    def linear_ce_rows_kernel(logits_ptr, targets_ptr, loss_ptr, V, stride_row, softcap,
                              HAS_SOFTCAP: tl.constexpr, COMPUTE_GRAD: tl.constexpr, BLOCK_V: tl.constexpr):
        # One program per token row of the chunk's fp32 logits; the vocabulary in blocks of BLOCK_V.
        row = tl.program_id(0).to(tl.int64)
        base = logits_ptr + row * stride_row
        target = tl.load(targets_ptr + row).to(tl.int32)

        # Pass 1: online log-sum-exp (running max m, sum s of exp(z - m) rescaled when m grows).
        m = float("-inf")
        s = 0.0
        for v0 in range(0, V, BLOCK_V):
            offs = v0 + tl.arange(0, BLOCK_V)
            ok = offs < V
            z = tl.load(base + offs, mask=ok, other=0.0)
            if HAS_SOFTCAP:  # c * tanh(z / c), tanh(x) = 2 sigmoid(2x) - 1
                z = softcap * (2.0 * tl.sigmoid(2.0 * z / softcap) - 1.0)
            z = tl.where(ok, z, float("-inf"))
            m_new = tl.maximum(m, tl.max(z, axis=0))
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
            m = m_new
        lse = m + tl.log(s)

        z_t = tl.load(base + target)
        if HAS_SOFTCAP:
            z_t = softcap * (2.0 * tl.sigmoid(2.0 * z_t / softcap) - 1.0)
        tl.store(loss_ptr + row, lse - z_t)

        # Pass 2: overwrite the logits with dL/dz = (softmax - onehot) * (1 - tanh^2).
        if COMPUTE_GRAD:
            for v0 in range(0, V, BLOCK_V):
                offs = v0 + tl.arange(0, BLOCK_V)
                ok = offs < V
                z = tl.load(base + offs, mask=ok, other=0.0)
                if HAS_SOFTCAP:
                    t = 2.0 * tl.sigmoid(2.0 * z / softcap) - 1.0
                    p = tl.exp(softcap * t - lse)
                    g = tl.where(offs == target, p - 1.0, p) * (1.0 - t * t)
                else:
                    p = tl.exp(z - lse)
                    g = tl.where(offs == target, p - 1.0, p)
                tl.store(base + offs, g, mask=ok)

    return linear_ce_rows_kernel


def _triton_rows(logits: torch.Tensor, targets: torch.Tensor, softcap: Optional[float], compute_grad: bool
                 ) -> torch.Tensor:
    """Same contract as :func:`_torch_rows`, computed by the Triton kernel (one program per row)."""
    kernel = _row_kernel()
    rows, vocab = logits.shape
    loss = torch.empty(rows, dtype=torch.float32, device=logits.device)
    if rows == 0:
        return loss
    args = (logits, targets, loss, vocab, logits.stride(0), float(softcap) if softcap is not None else 1.0)
    flags = dict(HAS_SOFTCAP=softcap is not None, COMPUTE_GRAD=compute_grad)
    if type(kernel).__name__ == "InterpretedFunction":
        kernel[(rows,)](*args, **flags, BLOCK_V=_INTERPRETER_BLOCK_V)
    else:
        with torch.cuda.device(logits.device):
            kernel[(rows,)](*args, **flags, BLOCK_V=_CUDA_BLOCK_V, num_warps=_CUDA_NUM_WARPS)
    return loss


# ------------------------------------------------------------------------------------------------- chunked driver


def _fused_forward(hidden, weight, targets, bias, softcap, ignore_index, chunk_size, backend, compute_grad):
    """Loss (fp32 scalar) and, if ``compute_grad``, dL/dh [N, d] in ``hidden``'s dtype (else an empty [0, d])."""
    n, d = hidden.shape
    vocab = weight.shape[0]
    targets = targets.long()
    valid = targets != ignore_index
    bad = valid & ((targets < 0) | (targets >= vocab))
    if bool(bad.any()):
        raise ValueError(f"linear_cross_entropy: targets must lie in [0, {vocab}) or equal ignore_index="
                         f"{ignore_index}; got {int(targets[bad][0])}")
    chosen = resolve_backend(backend, hidden.device)
    rows_fn = _triton_rows if chosen == "triton" else _torch_rows
    grad = hidden.new_zeros((n, d) if compute_grad else (0, d))
    idx = valid.nonzero().squeeze(1)
    total = idx.numel()
    if total == 0:
        return hidden.new_zeros((), dtype=torch.float32), grad
    if chunk_size is None or chunk_size <= 0:
        chunk_size = default_chunk_size(vocab, total, device=hidden.device, dtype=hidden.dtype,
                                        compute_grad=compute_grad)
    chunk = min(chunk_size, total)
    bias32 = bias.float() if bias is not None else None
    buffer = torch.empty(chunk, vocab, dtype=torch.float32, device=hidden.device)
    losses = torch.empty(total, dtype=torch.float32, device=hidden.device)
    for r0 in range(0, total, chunk):
        rows = idx[r0:r0 + chunk]
        logits = buffer[:rows.numel()]
        _chunk_logits(hidden.index_select(0, rows), weight, bias32, logits)
        tgt = targets.index_select(0, rows)
        losses[r0:r0 + rows.numel()] = rows_fn(logits, tgt, softcap, compute_grad)
        if compute_grad:
            grad.index_copy_(0, rows, _chunk_grad(logits, weight).to(hidden.dtype))
    return losses.sum(dtype=torch.float64).float(), grad


# ------------------------------------------------------------------------------------------------------ custom op


@torch.library.custom_op("gradmap::linear_cross_entropy_fwd", mutates_args=())
def _linear_cross_entropy_fwd(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                              bias: Optional[torch.Tensor], softcap: Optional[float], ignore_index: int,
                              chunk_size: int, backend: str, compute_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    _check_inputs("linear_cross_entropy", hidden, weight, targets, bias, softcap, ignore_index,
                  chunk_size if chunk_size > 0 else None, backend)
    return _fused_forward(hidden, weight, targets, bias, softcap, ignore_index, chunk_size, backend, compute_grad)


@_linear_cross_entropy_fwd.register_fake
def _(hidden, weight, targets, bias, softcap, ignore_index, chunk_size, backend, compute_grad):
    torch._check(hidden.dim() == 2 and weight.dim() == 2 and weight.shape[1] == hidden.shape[1],
                 lambda: "linear_cross_entropy: hidden [N, d] and weight [V, d] do not match")
    loss = hidden.new_empty((), dtype=torch.float32)
    grad = hidden.new_empty((hidden.shape[0], hidden.shape[1]) if compute_grad else (0, hidden.shape[1]))
    return loss, grad


def _setup_context(ctx, inputs, output):
    ctx.compute_grad = inputs[8]
    ctx.save_for_backward(output[1])


def _backward(ctx, grad_loss, _grad_of_grad):
    (grad_hidden,) = ctx.saved_tensors
    if not ctx.compute_grad:
        raise RuntimeError("gradmap::linear_cross_entropy_fwd was called with compute_grad=False; it has no gradient "
                           "for hidden (call linear_cross_entropy, which sets it when hidden requires grad)")
    return grad_loss * grad_hidden, None, None, None, None, None, None, None, None


torch.library.register_autograd("gradmap::linear_cross_entropy_fwd", _backward, setup_context=_setup_context)


# ------------------------------------------------------------------------------------------------------ public API


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                         bias: Optional[torch.Tensor] = None, softcap: Optional[float] = None,
                         ignore_index: int = -100, chunk_size: Optional[int] = None,
                         backend: str = "auto") -> torch.Tensor:
    """Summed next-token NLL of ``logits = hidden @ weightᵀ (+ bias)`` without materializing the logits.

    Formula: softmax cross-entropy ``Σ_i logsumexp(z_i) − z_i[y_i]`` over the non-ignored rows, with optional
    final-logit soft-capping ``z ← c·tanh(z/c)`` before the softmax (Gemma 2, arXiv 2408.00118, Sec. 2). See the
    module docstring for the chunking, the backends and the default chunk size.

    The gradient with respect to ``hidden`` is computed chunk by chunk during this call when ``hidden`` requires
    grad (and grad mode is on) and stored (``[N, d]``, ``hidden``'s dtype); ``backward`` scales it by the upstream
    gradient. No gradient reaches ``weight`` or ``bias``. At most one chunk of fp32 logits
    (``chunk_size x V x 4`` bytes) is alive at a time.

    Args:
        hidden: ``[N, d]`` float32/float16/bfloat16: the final-norm hidden states of N tokens (flattened).
        weight: ``[V, d]``, same dtype and device as ``hidden``: the LM head (may be the tied input embedding).
        targets: ``[N]`` int64 (or int32): the next-token ids; rows equal to ``ignore_index`` contribute nothing.
        bias: optional ``[V]`` float bias of the head.
        softcap: optional float ``c > 0``: soft-cap the logits to ``(-c, c)``.
        ignore_index: target value of rows to skip (padding, the last position of each sequence).
        chunk_size: token rows per chunk (None: :func:`default_chunk_size`, 256 MiB of fp32 logits).
        backend: ``"auto"`` (``triton`` on CUDA, ``torch`` elsewhere), ``"torch"`` or ``"triton"``.

    Returns:
        fp32 scalar tensor: the summed NLL in nats over the non-ignored rows (0 if every row is ignored).

    Raises:
        ValueError: a bad shape, dtype or device of an argument (named), a bad ``softcap``/``chunk_size``/
            ``backend``/``ignore_index``, a target outside ``[0, V)`` that is not ``ignore_index``, or ``weight``/
            ``bias`` requiring grad while grad mode is on (head gradients are not produced).
        RuntimeError: ``backend="triton"`` where the kernel cannot run (see :func:`resolve_backend`).
    """
    _check_inputs("linear_cross_entropy", hidden, weight, targets, bias, softcap, ignore_index, chunk_size, backend)
    grad_mode = torch.is_grad_enabled()
    for arg, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.requires_grad and grad_mode:
            raise ValueError(f"linear_cross_entropy: {arg} requires grad, but head gradients are not produced "
                             f"(only dL/dhidden); call {arg}.requires_grad_(False) or pass {arg}.detach()")
    compute_grad = bool(hidden.requires_grad and grad_mode)
    loss, _ = torch.ops.gradmap.linear_cross_entropy_fwd(hidden, weight, targets, bias,
                                                         None if softcap is None else float(softcap), ignore_index,
                                                         chunk_size or 0, backend, compute_grad)
    return loss


def reference_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                                   bias: Optional[torch.Tensor] = None, softcap: Optional[float] = None,
                                   ignore_index: int = -100, chunk_size: Optional[int] = None,
                                   backend: str = "auto", compute_dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The plain reference: full logits ``[N, V]`` in ``compute_dtype`` and ``F.cross_entropy(reduction="sum")``.

    Same formula and arguments as :func:`linear_cross_entropy` (``chunk_size`` and ``backend`` are accepted and
    ignored); differentiable by autograd with respect to every input (including ``weight``). Holds the whole
    ``N x V`` logits plus autograd's copies: for tests and benchmarks only.

    Args:
        compute_dtype: dtype of the logits and the softmax (fp64 for test oracles, fp32 for the benchmark baseline).

    Returns:
        fp32 scalar tensor: the summed NLL in nats over the non-ignored rows.

    Raises:
        ValueError: as :func:`linear_cross_entropy` for shapes, dtypes and devices.
    """
    _check_inputs("reference_linear_cross_entropy", hidden, weight, targets, bias, softcap, ignore_index,
                  chunk_size, backend)
    logits = hidden.to(compute_dtype) @ weight.to(compute_dtype).t()
    if bias is not None:
        logits = logits + bias.to(compute_dtype)
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return F.cross_entropy(logits, targets.long(), ignore_index=ignore_index, reduction="sum").float()
