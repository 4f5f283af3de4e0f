"""Measured inference speed of a causal LM on a device: prefill and greedy decode throughput.

Two measurements per repeat, on the same deterministic input (``batch_size x prompt_tokens`` token ids drawn uniformly
from ``[0, vocab)`` by a ``torch.Generator`` seeded with ``seed``, all attended):

* prefill: one forward over the whole batch with ``use_cache=False`` (no KV cache kept), timed from the call to the
  logits being ready (``torch.cuda.synchronize`` on CUDA). Throughput = ``batch_size * prompt_tokens / seconds``.
* decode: ``model.generate`` greedy (``do_sample=False``, one beam) with the KV cache on and
  ``min_new_tokens = max_new_tokens = new_tokens``, so end-of-sequence never stops a row early. A streamer records the
  wall time at which each new token reaches it (``transformers`` calls ``streamer.put`` once per step, after the
  token is chosen, with a host copy that waits for the device). The first new token marks the end of generate's own
  prefill (``time_to_first_token_s``); the remaining ``new_tokens - 1`` steps are pure decode steps:
  throughput = ``batch_size * (new_tokens - 1) / (t_last - t_first)``. The number of tokens each row really got is
  counted from the output and checked.

Each reported time is the median over ``repeats`` runs after one warm-up run (which is not reported). Speeds are in
tokens per second, times in seconds, memory in bytes. :func:`compare_speed` interleaves the two models' repeats
(dense, pruned, dense, ...) so that load from other processes falls on both alike.

Side effects: the model is moved to ``device`` and put in eval mode for the measurement; its previous device and
training mode are restored afterwards. Global RNGs are not touched (inputs come from a private generator; greedy
decoding draws no random numbers).
"""

from __future__ import annotations

import platform
import statistics
import time
from dataclasses import dataclass, field

import torch
from transformers import GenerationConfig
from torch import nn


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device: torch.device) -> str:
    """Human-readable name of ``device``: the GPU's name on CUDA, the CPU model (or architecture) otherwise."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return name


class _StepClock:
    """A ``generate`` streamer that keeps the wall time of every call (the first call carries the prompt)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.times: list[float] = []

    def put(self, value: torch.Tensor) -> None:
        _sync(self.device)
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def _vocab_size(model: nn.Module, tokenizer_or_vocab) -> int:
    model_vocab = getattr(model.config, "vocab_size", None)
    if isinstance(tokenizer_or_vocab, bool):
        raise TypeError("tokenizer_or_vocab: expected a tokenizer or an int vocabulary size, got a bool")
    if isinstance(tokenizer_or_vocab, int):
        vocab = tokenizer_or_vocab
    elif hasattr(tokenizer_or_vocab, "__len__"):
        vocab = len(tokenizer_or_vocab)
    else:
        raise TypeError(f"tokenizer_or_vocab: expected a tokenizer or an int vocabulary size, "
                        f"got {type(tokenizer_or_vocab).__name__}")
    if vocab < 1:
        raise ValueError(f"tokenizer_or_vocab: vocabulary size must be >= 1, got {vocab}")
    return min(vocab, model_vocab) if model_vocab else vocab


def _check(batch_size: int, prompt_tokens: int, new_tokens: int, repeats: int) -> None:
    for name, value, low in (("batch_size", batch_size, 1), ("prompt_tokens", prompt_tokens, 1),
                             ("new_tokens", new_tokens, 2), ("repeats", repeats, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name}: must be an integer >= {low}, got {value!r}")


def make_inputs(vocab: int, batch_size: int, prompt_tokens: int, seed: int) -> torch.Tensor:
    """LongTensor ``[batch_size, prompt_tokens]`` of ids uniform in ``[0, vocab)``, from a generator seeded ``seed``."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch_size, prompt_tokens), generator=g)


@dataclass
class _Runner:
    """One model's measurement state: inputs on the device, generation settings, collected timings."""

    model: nn.Module
    ids: torch.Tensor
    new_tokens: int
    device: torch.device
    prefill: list[float] = field(default_factory=list)
    ttft: list[float] = field(default_factory=list)
    decode: list[float] = field(default_factory=list)
    generated: list[int] = field(default_factory=list)

    def once(self, record: bool = True) -> None:

        model, ids = self.model, self.ids
        mask = torch.ones_like(ids)
        with torch.inference_mode():
            _sync(self.device)
            t0 = time.perf_counter()
            model(input_ids=ids, attention_mask=mask, use_cache=False)
            _sync(self.device)
            prefill = time.perf_counter() - t0
            eos = model.generation_config.eos_token_id if model.generation_config is not None else None
            eos = eos if eos is not None else model.config.eos_token_id
            pad = model.config.pad_token_id
            if pad is None:
                pad = eos[0] if isinstance(eos, list) else (eos if eos is not None else 0)
            config = GenerationConfig(max_new_tokens=self.new_tokens, min_new_tokens=self.new_tokens,
                                      do_sample=False, num_beams=1, use_cache=True, eos_token_id=eos,
                                      pad_token_id=pad)
            clock = _StepClock(self.device)
            _sync(self.device)
            t0 = time.perf_counter()
            out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config, streamer=clock)
            _sync(self.device)
        new = out.shape[1] - ids.shape[1]
        # clock.times[0]: the prompt handed to the streamer; then one entry per generated token
        steps = clock.times[1:]
        if new != self.new_tokens or len(steps) != self.new_tokens:
            raise RuntimeError(f"generate produced {new} new tokens per row ({len(steps)} steps), "
                               f"expected {self.new_tokens}")
        if record:
            self.prefill.append(prefill)
            self.ttft.append(steps[0] - t0)
            self.decode.append(steps[-1] - steps[0])
            self.generated.append(new)

    def result(self, batch_size: int, prompt_tokens: int, repeats: int, seed: int) -> dict:
        prefill = statistics.median(self.prefill)
        decode = statistics.median(self.decode)
        param = next(self.model.parameters())
        return {
            "device": str(self.device), "device_name": device_name(self.device),
            "torch_threads": torch.get_num_threads(), "dtype": str(param.dtype).replace("torch.", ""),
            "batch_size": batch_size, "prompt_tokens": prompt_tokens, "new_tokens": self.new_tokens,
            "repeats": repeats, "seed": seed,
            "num_layers": getattr(self.model.config, "num_hidden_layers", None),
            "num_parameters": sum(p.numel() for p in self.model.parameters()),
            "prefill_seconds": prefill,
            "prefill_tokens_per_s": batch_size * prompt_tokens / prefill,
            "time_to_first_token_s": statistics.median(self.ttft),
            "decode_seconds": decode,
            "decode_tokens_per_s": batch_size * (self.new_tokens - 1) / decode,
            "generated_tokens_per_row": self.generated[-1],
            "prefill_seconds_all": list(self.prefill), "decode_seconds_all": list(self.decode),
        }


class _OnDevice:
    """Move a model to ``device`` in eval mode for the duration; restore its device and training mode after."""

    def __init__(self, model: nn.Module, device: torch.device):
        self.model, self.device = model, device
        p = next(model.parameters(), None)
        if p is None:
            raise ValueError("model: has no parameters")
        self.home, self.training = p.device, model.training

    def __enter__(self):
        self.model.to(self.device).eval()
        return self.model

    def __exit__(self, *exc):
        self.model.to(self.home).train(self.training)


def _peak(device: torch.device) -> int | None:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def measure_speed(model: nn.Module, tokenizer_or_vocab, *, device: str | torch.device, batch_size: int = 1,
                  prompt_tokens: int = 128, new_tokens: int = 32, repeats: int = 3, seed: int = 0) -> dict:
    """Prefill and decode throughput of ``model`` on ``device`` (see the module docstring for the method).

    Args:
        model: a ``transformers`` ``*ForCausalLM``.
        tokenizer_or_vocab: its tokenizer (ids are drawn below ``len(tokenizer)``) or an int vocabulary size; capped
            at ``model.config.vocab_size``.
        device: where to run (``"cpu"``, ``"cuda"``, ``"cuda:1"``, a ``torch.device``).
        batch_size: rows per forward / generate.
        prompt_tokens: tokens per row of the prompt (prefill length); prompt + new tokens must fit the context.
        new_tokens: tokens generated per row (>= 2: the first one closes generate's prefill).
        repeats: timed runs (the median is reported), after one untimed warm-up run.
        seed: seed of the input ids.

    Returns:
        dict: ``device``, ``device_name``, ``torch_threads``, ``dtype``, ``batch_size``, ``prompt_tokens``,
        ``new_tokens``, ``repeats``, ``seed``, ``num_layers``, ``num_parameters``, ``prefill_seconds`` and
        ``prefill_tokens_per_s`` (forward without cache), ``time_to_first_token_s`` (generate's prefill + first
        token, seconds), ``decode_seconds`` (the ``new_tokens - 1`` cached decode steps) and ``decode_tokens_per_s``,
        ``generated_tokens_per_row`` (counted from the output), ``peak_memory_bytes`` (CUDA: peak allocated by torch
        during the measurement; None on CPU), and every repeat's ``prefill_seconds_all`` / ``decode_seconds_all``.

    Raises:
        ValueError: a count below its minimum (naming the argument), ``prompt_tokens + new_tokens`` above the model's
            ``max_position_embeddings``, or a model without parameters.
        TypeError: ``tokenizer_or_vocab`` is neither a tokenizer nor an int.
        RuntimeError: generate produced a different number of tokens than asked.
    """
    return _measure([model], tokenizer_or_vocab, device=device, batch_size=batch_size, prompt_tokens=prompt_tokens,
                    new_tokens=new_tokens, repeats=repeats, seed=seed)[0]


def _measure(models: list[nn.Module], tokenizer_or_vocab, *, device, batch_size, prompt_tokens, new_tokens, repeats,
             seed) -> list[dict]:
    _check(batch_size, prompt_tokens, new_tokens, repeats)
    dev = torch.device(device)
    vocab = min(_vocab_size(m, tokenizer_or_vocab) for m in models)
    for m in models:
        limit = getattr(m.config, "max_position_embeddings", None) or getattr(m.config, "n_positions", None)
        if limit is not None and prompt_tokens + new_tokens > limit:
            raise ValueError(f"prompt_tokens: {prompt_tokens} + new_tokens {new_tokens} exceeds the model's maximum "
                             f"sequence length {limit}")
    ids = make_inputs(vocab, batch_size, prompt_tokens, seed).to(dev)
    runners = [_Runner(m, ids, new_tokens, dev) for m in models]
    peaks: list[int | None] = [None] * len(models)
    guards = [_OnDevice(m, dev) for m in models]
    for g in guards:
        g.__enter__()
    try:
        for r in runners:
            r.once(record=False)  # warm-up
        for _ in range(repeats):
            for i, r in enumerate(runners):
                if dev.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(dev)
                r.once()
                peak = _peak(dev)
                if peak is not None:
                    peaks[i] = max(peaks[i] or 0, peak)
    finally:
        for g in guards:
            g.__exit__(None, None, None)
    results = []
    for r, peak in zip(runners, peaks):
        res = r.result(batch_size, prompt_tokens, repeats, seed)
        res["peak_memory_bytes"] = peak
        results.append(res)
    return results


def compare_speed(dense: nn.Module, pruned: nn.Module, tokenizer_or_vocab, *, device: str | torch.device,
                  batch_size: int = 1, prompt_tokens: int = 128, new_tokens: int = 32, repeats: int = 3,
                  seed: int = 0) -> dict:
    """Speed of a dense model and its pruned version on the same inputs, repeats interleaved.

    Arguments as :func:`measure_speed` (``tokenizer_or_vocab`` is shared; ids are drawn below the smaller of the two
    models' vocabularies).

    Returns:
        ``{"dense": measure_speed-dict, "pruned": measure_speed-dict, "speedup": {"prefill": ratio, "decode": ratio,
        "time_to_first_token": ratio}}``: each ratio is pruned throughput / dense throughput (for time to first token:
        dense seconds / pruned seconds), so > 1 means the pruned model is faster.

    Raises:
        as :func:`measure_speed`.
    """
    d, p = _measure([dense, pruned], tokenizer_or_vocab, device=device, batch_size=batch_size,
                    prompt_tokens=prompt_tokens, new_tokens=new_tokens, repeats=repeats, seed=seed)
    return {"dense": d, "pruned": p,
            "speedup": {"prefill": p["prefill_tokens_per_s"] / d["prefill_tokens_per_s"],
                        "decode": p["decode_tokens_per_s"] / d["decode_tokens_per_s"],
                        "time_to_first_token": d["time_to_first_token_s"] / p["time_to_first_token_s"]}}
