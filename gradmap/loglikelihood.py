"""Log-likelihood of (context, continuation) pairs, each distinct context computed once, many per forward pass.

Multiple-choice scoring (lm-evaluation-harness ``multiple_choice``) asks, for each item, the log-likelihood of every
answer choice as a continuation of the same prompt. lm-eval's ``HFLM`` scores each pair as its own sequence (except
one-token continuations): the shared prompt runs once per choice, and the LM head (``vocab × hidden`` multiply-adds
per token: 28 M on SmolLM2-135M against 106 M for its 30 decoder layers; 168 M on Gemma-3-270M against 100 M) runs on
every prompt position, where only continuation positions are scored.

:func:`score_requests` groups the pairs by context and packs groups into batches. Per batch, two forward passes:

1. the distinct contexts, left-padded to one length (``attention_mask`` zero on the pads, ``position_ids`` counted
   from each context's first real token), ``use_cache=True``, ``logits_to_keep=1``: the last position of each row
   predicts the first token of each of its continuations;
2. the continuations without their last token, one row each, right-padded, on the KV cache of their context
   (``Cache.batch_select_indices`` repeats each context's cache rows once per continuation), positions continuing
   each context's: the logits predict the remaining continuation tokens. A right pad changes no earlier position
   (causal attention) and is never scored.

The result is ``sum_t log softmax(logits_{c+t-1})[y_t]`` (``c`` context tokens, ``y`` the continuation) as the plain
full-sequence forward computes it, up to float rounding of the different matmul shapes (``tests/test_loglikelihood.py``
checks it against that forward on every supported family). A pair longer than ``max_length + 1`` tokens is scored on
its own, truncated from the left (``HFLM``'s rule).

Why batches matter on CPU: a forward pass streams every weight once (≈ 0.5 GB for SmolLM2-135M in fp32), ≈ 0.1 s
here however few tokens it carries, so per-pair passes of a few tokens are dominated by that cost.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

MAX_CONTEXT_TOKENS = 2048
"""Padded context tokens per batch (rows × longest context): bounds the activation memory of pass 1."""
MAX_LOGIT_BYTES = 1 << 28
"""Bytes of fp32 logits per batch (continuation rows × longest continuation × vocabulary): 256 MiB, e.g. 256
continuation tokens on Gemma-3's 262k vocabulary, 1365 on SmolLM2's 49k."""
PAD_FRACTION = 0.15
PAD_TOKENS_PER_BATCH = 64
"""A group that would bring a batch's padding above ``PAD_FRACTION`` × its real tokens + ``PAD_TOKENS_PER_BATCH``
starts a new batch: 64 tokens is about the cost of the two forward passes a batch takes (each streams every weight
once: ≈ 0.1 s on this CPU, ≈ 25–40 tokens of SmolLM2-135M compute)."""


def _scores(logprobs: torch.Tensor, targets: torch.Tensor) -> tuple[float, bool]:
    """``logprobs`` [k, V] (fp32 log-softmax), ``targets`` [k]: (sum of the targets' log-probabilities, all argmax)."""
    picked = logprobs.gather(1, targets[:, None]).squeeze(1)
    return float(picked.sum()), bool((logprobs.argmax(dim=-1) == targets).all())


def _single(model: nn.Module, context: Sequence[int], continuation: Sequence[int], max_length: int,
            device: torch.device) -> tuple[float, bool]:
    """One pair as one sequence, left-truncated to ``max_length`` input tokens (lm-eval ``HFLM``)."""
    tokens = (list(context) + list(continuation))[-(max_length + 1):][:-1]
    ids = torch.tensor([tokens], dtype=torch.long, device=device)
    logits = model(input_ids=ids, use_cache=False, logits_to_keep=len(continuation)).logits[0]
    targets = torch.tensor(list(continuation), dtype=torch.long, device=device)
    return _scores(torch.log_softmax(logits.float(), dim=-1), targets)


def _batches(groups: list[tuple[tuple[int, ...], list[int]]], lengths: dict[int, int], vocab: int
             ) -> list[list[tuple[tuple[int, ...], list[int]]]]:
    """Pack context groups into batches under :data:`MAX_CONTEXT_TOKENS` and :data:`MAX_LOGIT_BYTES`, padding
    included; a group that alone exceeds a bound gets a batch of its own. Groups go longest continuation first, then
    longest context (lm-eval sorts by length for the same reason), and a group that would pad the batch beyond
    :data:`PAD_FRACTION` / :data:`PAD_TOKENS_PER_BATCH` starts a new batch instead."""
    logit_tokens = max(1, MAX_LOGIT_BYTES // (4 * vocab))
    out, batch, ctx_len, cont_len, rows, real = [], [], 0, 0, 0, 0
    for context, members in sorted(groups, key=lambda g: (-max(lengths[i] for i in g[1]), -len(g[0]))):
        conts = [lengths[i] - 1 for i in members if lengths[i] > 1]
        c, k, r = max(ctx_len, len(context)), max([cont_len] + conts), rows + len(conts)
        t = real + len(context) + sum(conts)
        padded = c * (len(batch) + 1) + k * r
        if batch and (c * (len(batch) + 1) > MAX_CONTEXT_TOKENS or r * k > logit_tokens
                      or padded - t > PAD_FRACTION * t + PAD_TOKENS_PER_BATCH):
            out.append(batch)
            batch, c, k, r, t = [], len(context), max([0] + conts), len(conts), len(context) + sum(conts)
        batch.append((context, members))
        ctx_len, cont_len, rows, real = c, k, r, t
    if batch:
        out.append(batch)
    return out


@torch.inference_mode()
def score_requests(model: nn.Module, requests: Sequence[tuple[Sequence[int], Sequence[int]]], *, max_length: int,
                   pad_token_id: int = 0, progress: Callable[[int], None] | None = None) -> list[tuple[float, bool]]:
    """Log-likelihood of each continuation after its context; each distinct context is computed once.

    Args:
        model: a Hugging Face causal LM (``*ForCausalLM``) whose forward accepts ``attention_mask``, ``position_ids``,
            ``cache``, ``cache_position``, ``use_cache`` and ``logits_to_keep``; run as is (eval mode is the caller's),
            any device/dtype. Not modified.
        requests: ``(context token ids, continuation token ids)`` pairs, each part at least one token (lm-eval puts
            its prefix token in an empty context).
        max_length: the model's context length in tokens; a pair longer than ``max_length + 1`` tokens is scored
            alone, truncated from the left (lm-eval ``HFLM``'s rule).
        pad_token_id: token id written into padding positions (masked or never scored).
        progress: called with the number of requests finished after each batch.

    Returns:
        One ``(log-likelihood in nats, is_greedy)`` per request, in order: the sum over continuation tokens of
        ``log p(y_t | context, y_<t)`` (log-softmax in fp32), and whether every ``y_t`` is the argmax.

    Raises:
        ValueError: an empty context or continuation.
    """
    if any(len(c) == 0 or len(y) == 0 for c, y in requests):
        raise ValueError("requests: every context and continuation needs at least one token (lm-eval puts the "
                         "prefix token in an empty context)")
    device = next(model.parameters()).device
    out: list[tuple[float, bool] | None] = [None] * len(requests)
    lengths = {i: len(y) for i, (_, y) in enumerate(requests)}
    by_context: dict[tuple[int, ...], list[int]] = {}
    for i, (context, continuation) in enumerate(requests):
        if len(context) + len(continuation) > max_length + 1:
            out[i] = _single(model, context, continuation, max_length, device)
            if progress:
                progress(1)
        else:
            by_context.setdefault(tuple(int(t) for t in context), []).append(i)
    vocab = model.get_output_embeddings().weight.shape[0]
    for batch in _batches(list(by_context.items()), lengths, vocab):
        width = max(len(c) for c, _ in batch)
        ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
        mask = torch.zeros(len(batch), width, dtype=torch.long)
        for g, (context, _) in enumerate(batch):
            ids[g, width - len(context):] = torch.tensor(context)
            mask[g, width - len(context):] = 1
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        ids, mask, positions = ids.to(device), mask.to(device), positions.to(device)
        first = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1)
        first_logprobs = torch.log_softmax(first.logits[:, -1].float(), dim=-1)  # [G, V]: predicts each y_0
        rows = [(g, i) for g, (_, members) in enumerate(batch) for i in members if lengths[i] > 1]
        rest: dict[int, torch.Tensor] = {}
        if rows:
            k = max(lengths[i] for _, i in rows) - 1
            src = torch.tensor([g for g, _ in rows], device=device)
            cont = torch.full((len(rows), k), pad_token_id, dtype=torch.long)
            for r, (_, i) in enumerate(rows):
                cont[r, :lengths[i] - 1] = torch.tensor(list(requests[i][1][:-1]))
            cache = first.cache
            cache.batch_select_indices(src)
            cont_mask = torch.cat([mask[src], torch.ones(len(rows), k, dtype=torch.long, device=device)], dim=1)
            cont_positions = mask.sum(1)[src][:, None] + torch.arange(k, device=device)
            logits = model(input_ids=cont.to(device), attention_mask=cont_mask, position_ids=cont_positions,
                           cache=cache, use_cache=True, cache_position=torch.arange(width, width + k, device=device),
                           logits_to_keep=0).logits
            for r, (_, i) in enumerate(rows):
                rest[i] = torch.log_softmax(logits[r, :lengths[i] - 1].float(), dim=-1)
        for g, (_, members) in enumerate(batch):
            for i in members:
                targets = torch.tensor(list(requests[i][1]), dtype=torch.long, device=device)
                logprobs = first_logprobs[g:g + 1] if i not in rest else torch.cat([first_logprobs[g:g + 1], rest[i]])
                out[i] = _scores(logprobs, targets)
        if progress:
            progress(sum(len(m) for _, m in batch))
    return out  # type: ignore[return-value]
