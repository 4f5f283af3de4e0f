"""Building blocks shared by the baseline selection methods: the calibration loss of a model with some decoder layers
left out, the hidden states entering every decoder layer, and turning one-shot scores into a :class:`Selection`.

Layers are named by ORIGINAL index (position in the dense model) in everything returned; ``kept`` maps the current
positions of a (partly pruned) working model to original indices.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable, Iterator

import torch
from torch import nn

from ..adapters import Adapter, get_adapter, model_device
from ..compensation import heldout_loss
from ..data import Calibration
from ..pruning import Selection, Step
from ..removal import remove_layers


def calibration_loss(model: nn.Module, calibration: Calibration, micro_batch: int = 8) -> float:
    """Mean next-token cross-entropy of ``model`` over the real tokens of ``calibration``, nats/token (no grad).

    One forward pass over the calibration set. ``exp`` of it is the calibration perplexity.
    """
    return heldout_loss(model, calibration, micro_batch)


@contextlib.contextmanager
def layers_left_out(model: nn.Module, positions: Iterable[int], adapter: Adapter | None = None) -> Iterator[None]:
    """Run ``model`` without the decoder layers at ``positions`` (current indices) for the duration of the block.

    The layers are really removed (:func:`gradmap.removal.remove_layers`: no compute is spent on them), then put back
    with the layer list, KV-cache ``layer_idx`` values and per-layer config fields exactly as before, also when the
    block raises.
    """
    adapter = adapter or get_adapter(model)
    layers = adapter.layers(model)
    config = model.config
    saved = {name: getattr(config, name) for name in adapter.per_layer_config_fields if hasattr(config, name)}
    saved_n = config.num_hidden_layers
    text_config = getattr(config, "text_config", None)
    saved_text_n = getattr(text_config, "num_hidden_layers", None) if text_config is not None else None
    remove_layers(model, positions, adapter)
    try:
        yield
    finally:
        adapter.set_layers(model, layers)
        for i, layer in enumerate(layers):
            adapter.set_layer_idx(layer, i)
        for name, value in saved.items():
            setattr(config, name, value)
        config.num_hidden_layers = saved_n
        if saved_text_n is not None:
            text_config.num_hidden_layers = saved_text_n


def hidden_states_per_layer(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor,
                            adapter: Adapter | None = None) -> list[torch.Tensor]:
    """Hidden states ``[h_0, ..., h_L]`` of one batch: ``h_l`` enters decoder layer ``l``, ``h_L`` leaves the last.

    One forward of the decoder stack (no LM head, no grad), read with forward hooks so that no family-specific
    ``output_hidden_states`` convention (final norm applied or not) is involved.

    Args:
        ids, mask: LongTensor ``[batch, seqlen]``.

    Returns:
        ``L + 1`` tensors ``[batch, seqlen, hidden]`` in the model dtype, on the model's device.
    """
    adapter = adapter or get_adapter(model)
    layers = adapter.layers(model)
    device = model_device(model)
    states: list[torch.Tensor | None] = [None] * (len(layers) + 1)

    def make_hook(i):
        def hook(module, args, kwargs, output):
            states[i] = (args[0] if args else kwargs["hidden_states"]).detach()
            if i == len(layers) - 1:
                states[i + 1] = (output[0] if isinstance(output, tuple) else output).detach()
        return hook

    handles = [layer.register_forward_hook(make_hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        with torch.no_grad():
            body = getattr(model, model.base_model_prefix, None) or model.model
            body(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return states


def one_shot_selection(method: str, scores: dict[int, float], target: int, protected: Iterable[int],
                       seconds: float, passes: float) -> tuple[Selection, list[int]]:
    """Turn one-shot layer scores into a :class:`Selection`: the ``target`` lowest-scoring unprotected layers.

    Ties are broken by the lower original index. Every step carries the same scores (the one-shot decision); the
    scoring time is booked on step 0.

    Returns:
        ``(selection, victims)``: victims in removal order (lowest score first).

    Raises:
        ValueError: fewer unprotected layers than ``target``.
    """
    protected = {int(p) for p in protected}
    candidates = sorted((s, i) for i, s in scores.items() if i not in protected)
    if len(candidates) < target:
        raise ValueError(f"protected: only {len(candidates)} layers may be removed, fewer than the target {target}")
    victims = [i for _, i in candidates[:target]]
    selection = Selection(method=method, passes=passes)
    for k, victim in enumerate(victims):
        selection.removed.append(victim)
        selection.steps.append(Step(k, dict(scores), victim, seconds if k == 0 else 0.0))
    return selection, victims


def remove_by_original(model: nn.Module, victims: Iterable[int], kept: list[int]) -> list[int]:
    """Remove the layers with original indices ``victims`` from ``model`` in place; return the new ``kept`` list."""
    victims = set(int(v) for v in victims)
    remove_layers(model, [p for p, orig in enumerate(kept) if orig in victims])
    return [orig for orig in kept if orig not in victims]


class Timer:
    """``with Timer() as t: ...`` then ``t.seconds`` (wall time, seconds, ``time.perf_counter``)."""

    def __enter__(self):
        self.start = time.perf_counter()
        self.seconds = 0.0
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start
