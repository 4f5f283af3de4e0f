"""Architecture adapters: where each model family keeps its decoder layers.

This module is the one documented place to add a model family. An adapter answers four questions for one
``transformers`` architecture:

* where the list of decoder layers lives (``model.model.layers`` for Llama-like models),
* which modules of a decoder layer carry a ``layer_idx`` that indexes the KV cache,
* which linear module is the MLP down projection (``down_proj``) that stage 2 folds its projection into,
* which config fields hold one entry per decoder layer and must be trimmed when layers are removed.

To add a family, append an :class:`Adapter` to ``_ADAPTERS`` with the ``model_type`` strings it serves and the
attribute paths above, then add its tiny config to ``tests/conftest.py`` so every test runs on it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass(frozen=True)
class Adapter:
    """How to reach the parts of one decoder-only architecture that layer removal touches.

    Attributes:
        model_types: ``config.model_type`` values this adapter serves.
        layers_path: dotted attribute path from the ``*ForCausalLM`` module to the ``nn.ModuleList`` of decoder layers.
        down_proj_path: dotted path inside one decoder layer to the MLP down projection (``nn.Linear``, weight of
            shape ``[hidden_size, intermediate_size]``).
        layer_idx_paths: dotted paths inside one decoder layer to modules whose ``layer_idx`` attribute indexes the
            KV cache ("" means the decoder layer itself).
        per_layer_config_fields: config attributes that are lists with one entry per decoder layer.
    """

    model_types: tuple[str, ...]
    layers_path: str = "model.layers"
    down_proj_path: str = "mlp.down_proj"
    layer_idx_paths: tuple[str, ...] = ("self_attn",)
    per_layer_config_fields: tuple[str, ...] = field(default=("layer_types",))

    def layers(self, model: nn.Module) -> nn.ModuleList:
        """Return the decoder-layer ``nn.ModuleList`` of ``model`` (a ``*ForCausalLM``)."""
        return _get(model, self.layers_path)

    def set_layers(self, model: nn.Module, layers: nn.ModuleList) -> None:
        """Replace the decoder-layer list of ``model`` by ``layers``."""
        parent_path, _, name = self.layers_path.rpartition(".")
        parent = _get(model, parent_path) if parent_path else model
        setattr(parent, name, layers)

    def down_proj(self, layer: nn.Module) -> nn.Linear:
        """Return the MLP down projection of one decoder layer (``y = x Wᵀ``, ``W: [hidden, intermediate]``)."""
        return _get(layer, self.down_proj_path)

    def set_layer_idx(self, layer: nn.Module, idx: int) -> None:
        """Renumber every KV-cache ``layer_idx`` inside ``layer`` to ``idx`` (its new position)."""
        for path in self.layer_idx_paths:
            module = _get(layer, path) if path else layer
            if hasattr(module, "layer_idx"):
                module.layer_idx = idx
        if hasattr(layer, "layer_idx"):
            layer.layer_idx = idx


def _get(obj, path: str):
    for name in path.split(".") if path else []:
        obj = getattr(obj, name)
    return obj


_ADAPTERS: tuple[Adapter, ...] = (
    Adapter(model_types=("llama",)),
    Adapter(model_types=("mistral",)),
    Adapter(model_types=("qwen2",)),
    Adapter(model_types=("qwen3",)),
)

SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(t for a in _ADAPTERS for t in a.model_types)


def get_adapter(model: nn.Module) -> Adapter:
    """Return the :class:`Adapter` for ``model`` (a ``transformers`` ``*ForCausalLM``).

    Raises:
        ValueError: if ``model.config.model_type`` has no adapter; the message lists the supported types and names
            this module as the place to add one.
    """
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    for adapter in _ADAPTERS:
        if model_type in adapter.model_types:
            layers = adapter.layers(model)
            if not isinstance(layers, nn.ModuleList):
                raise ValueError(f"model of type {model_type!r}: {adapter.layers_path} is not an nn.ModuleList")
            return adapter
    raise ValueError(
        f"unsupported architecture model_type={model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}. "
        "Add an Adapter to gradmap/adapters.py (_ADAPTERS) to support it."
    )


def decoder_param_count(model: nn.Module) -> int:
    """Number of parameters (elements) held by the decoder layers of ``model``."""
    return sum(p.numel() for p in get_adapter(model).layers(model).parameters())


def model_device(model: nn.Module) -> torch.device:
    """Device of the first parameter of ``model``."""
    return next(model.parameters()).device
