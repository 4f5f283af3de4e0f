"""Turning the engine's view of a pruned model into a plain, consistent ``transformers`` model (or config).

:func:`materialize_pruned` builds the pruned model sharing the dense model's tensors; :func:`prune_inplace` and
:func:`remove_layers` change a model in place; :func:`trim_config` and :func:`pruned_names` describe the pruned model
for the checkpoint writer (:mod:`gradmap.checkpoint`), which never assembles a streamed model in memory.

After removal: the decoder-layer list holds only the kept layers, in order; every KV-cache ``layer_idx`` equals the
layer's new position (a stale index makes ``generate`` with a cache index the wrong cache slot);
``config.num_hidden_layers`` matches the weights; per-layer config lists (e.g. ``layer_types``) are trimmed in step.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable

import torch
from accelerate.utils import set_module_tensor_to_device
from torch import nn

from .adapters import Adapter, get_adapter
from .engine import OUTER, ModelWeights, View, build_skeleton
from .engine.weights import unit_of


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
    _trim_config_(model.config, keep, n, adapter)


def _trim_config_(config, kept: list[int], n: int, adapter: Adapter) -> None:
    """In place: per-layer lists of length ``n`` (``layer_types``, ...) keep the entries ``kept``;
    ``num_hidden_layers`` (and a text config's) becomes ``len(kept)``."""
    for name in adapter.per_layer_config_fields:
        value = getattr(config, name, None)
        if isinstance(value, (list, tuple)) and len(value) == n:
            setattr(config, name, type(value)(value[i] for i in kept))
    config.num_hidden_layers = len(kept)
    text_config = getattr(config, "text_config", None)
    if text_config is not None and text_config is not config and hasattr(text_config, "num_hidden_layers"):
        text_config.num_hidden_layers = len(kept)


def trim_config(config, kept: list[int], adapter: Adapter):
    """A copy of ``config`` for the model that keeps the dense layers ``kept`` (original indices, in order):
    ``num_hidden_layers`` (and a text config's) set, per-layer lists (``layer_types``, ...) trimmed in step."""
    new = copy.deepcopy(config)
    _trim_config_(new, kept, config.num_hidden_layers, adapter)
    return new


def pruned_names(weights: ModelWeights, view: View) -> dict[str, tuple[str, str | None]]:
    """The pruned model's state-dict names → ``(dense name, override key or None)``: kept layers renumbered in
    order, removed layers absent, everything outside the decoder layers unchanged (a tied LM head listed once, under
    the embedding's name)."""
    adapter = weights.adapter
    out: dict[str, tuple[str, str | None]] = {}
    for name in weights.names[OUTER]:
        out[name] = (name, None)
    for new_index, orig in enumerate(view.kept):
        old_prefix, new_prefix = adapter.layer_prefix(orig), adapter.layer_prefix(new_index)
        overrides = view.overrides.get(orig, {})
        for name in weights.names[orig]:
            rel = name[len(old_prefix):]
            out[new_prefix + rel] = (name, rel if rel in overrides else None)
    return out


def materialize_pruned(weights: ModelWeights, view: View) -> nn.Module:
    """The pruned model as a new ``nn.Module`` that SHARES every tensor with the resident dense model except the
    removed layers (absent) and the overridden ones (stage 2's folded ``down_proj``, BlockPruner's zeroed
    projections: new tensors). Nothing is copied.

    Raises:
        ValueError: a model that is not resident (streamed layers have no tensors to share: save it instead).
    """
    if not all(weights.is_live(u) for u in weights.placement):
        raise ValueError("model: the pruned model of a streamed run is not materialised in memory; save it "
                         "(PruneResult.save) and load the checkpoint")
    dense = weights.model
    config = trim_config(dense.config, view.kept, weights.adapter)
    model = build_skeleton(config)
    params = dict(dense.named_parameters())
    for new_name, (old_name, rel) in pruned_names(weights, view).items():
        orig = unit_of(old_name, weights.adapter)
        value = view.overrides[orig][rel] if rel is not None else params[old_name].detach()
        set_module_tensor_to_device(model, new_name, value.device, value=value)
    for name, buf in dense.named_buffers():
        orig = unit_of(name, weights.adapter)
        if orig == OUTER:
            set_module_tensor_to_device(model, name, buf.device, value=buf)
        elif orig in view.kept:
            new_name = weights.adapter.layer_prefix(view.kept.index(orig)) + name[len(weights.adapter.layer_prefix(orig)):]
            set_module_tensor_to_device(model, new_name, buf.device, value=buf)
    if weights.tied:
        model.get_output_embeddings().weight = model.get_input_embeddings().weight
    if getattr(dense, "generation_config", None) is not None:
        model.generation_config = copy.deepcopy(dense.generation_config)
    for i, layer in enumerate(weights.adapter.layers(model)):
        weights.adapter.set_layer_idx(layer, i)
    return model.eval()


def prune_inplace(model: nn.Module, view: View, adapter: Adapter | None = None) -> None:
    """Turn the resident dense ``model`` itself into the pruned model: overridden parameters are overwritten in
    place (``copy_``), then the removed layers are dropped (:func:`remove_layers`)."""
    adapter = adapter or get_adapter(model)
    layers = adapter.layers(model)
    with torch.no_grad():
        for orig, overrides in view.overrides.items():
            params = dict(layers[orig].named_parameters())
            for rel, value in overrides.items():
                params[rel].copy_(value.to(device=params[rel].device, dtype=params[rel].dtype))
    remove_layers(model, [i for i in range(len(layers)) if i not in set(view.kept)], adapter)
