"""Removing decoder layers from a model in place, keeping it a plain, consistent ``transformers`` model.

After removal: the decoder-layer list holds only the kept layers, in order; every KV-cache ``layer_idx`` equals the
layer's new position (a stale index makes ``generate`` with a cache index the wrong cache slot);
``config.num_hidden_layers`` matches the weights; per-layer config lists (e.g. ``layer_types``) are trimmed in step.
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from .adapters import Adapter, get_adapter


def remove_layers(model: nn.Module, positions: Iterable[int], adapter: Adapter | None = None) -> None:
    """Remove the decoder layers at ``positions`` (indices into the model's CURRENT layer list) in place.

    Args:
        model: a ``transformers`` ``*ForCausalLM`` supported by :mod:`gradmap.adapters`.
        positions: current indices of the layers to drop (duplicates ignored).

    Raises:
        ValueError: if a position is out of range or every layer would be removed.
    """
    adapter = adapter or get_adapter(model)
    layers = adapter.layers(model)
    drop = sorted(set(int(p) for p in positions))
    n = len(layers)
    bad = [p for p in drop if not 0 <= p < n]
    if bad:
        raise ValueError(f"positions: {bad} out of range for a model with {n} decoder layers")
    if len(drop) >= n:
        raise ValueError(f"positions: removing {len(drop)} of {n} decoder layers would leave none")
    keep = [i for i in range(n) if i not in set(drop)]
    new_layers = nn.ModuleList([layers[i] for i in keep])
    for new_idx, layer in enumerate(new_layers):
        adapter.set_layer_idx(layer, new_idx)
    adapter.set_layers(model, new_layers)
    config = model.config
    for name in adapter.per_layer_config_fields:
        value = getattr(config, name, None)
        if isinstance(value, (list, tuple)) and len(value) == n:
            setattr(config, name, type(value)(value[i] for i in keep))
    config.num_hidden_layers = len(keep)
    text_config = getattr(config, "text_config", None)
    if text_config is not None and text_config is not config and hasattr(text_config, "num_hidden_layers"):
        text_config.num_hidden_layers = len(keep)
