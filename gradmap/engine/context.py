"""What a decoder layer receives besides its hidden states, captured once per micro-batch without running a layer.

A ``transformers`` causal LM computes, before its decoder loop, the embeddings, the attention masks (causal, sliding
window, padding, ALiBi bias), the position ids and the rotary position embeddings, and hands each decoder layer
``layer(hidden_states, *args, **kwargs)``; which mask and which rotary table a layer gets depends on its type
(Gemma-2/3 ``layer_types``). :func:`capture_layer_inputs` runs the model's own forward with every decoder layer's
``forward`` replaced by a recorder that stores its arguments and returns its input unchanged, and stops after the
last layer (no final norm, no logits). So the engine can then call any decoder layer on any hidden states with
exactly the arguments the model itself would give it, for every family, without re-implementing masks or positions.

The arguments are keyed by the layer's ORIGINAL index (its position in the dense model): after layers are removed,
a kept layer still gets the mask and rotary table of its own type, exactly as the pruned model (with ``layer_types``
trimmed in step) would give it. No layer weights are touched: the model may be a skeleton on the meta device, only
the embeddings (and the rotary buffers) must be real.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..adapters import Adapter


class StopForward(Exception):
    """Raised inside a forward to end it early once everything needed has been recorded."""


@dataclass
class LayerInputs:
    """The inputs of every decoder layer for one micro-batch.

    Attributes:
        embeddings: ``[batch, seqlen, hidden]`` hidden states entering decoder layer 0 (model dtype, on the device).
        args: per original layer index, the positional arguments after the hidden states.
        kwargs: per original layer index, the keyword arguments (attention mask, position embeddings, ...).
    """

    embeddings: torch.Tensor
    args: list[tuple]
    kwargs: list[dict]


def capture_layer_inputs(model: nn.Module, adapter: Adapter, input_ids: torch.Tensor,
                         attention_mask: torch.Tensor) -> LayerInputs:
    """Record the inputs of every decoder layer of ``model`` for one batch (module docstring).

    Args:
        model: the dense ``*ForCausalLM`` (layer weights may be on the meta device; embeddings must be real).
        input_ids, attention_mask: LongTensor ``[batch, seqlen]`` on the model's compute device.

    Returns:
        :class:`LayerInputs` (one entry per decoder layer of ``model``).
    """
    layers = adapter.layers(model)
    n = len(layers)
    args: list = [None] * n
    kwargs: list = [None] * n
    first: list = [None]

    def recorder(i):
        def forward(*a, **kw):
            hidden = a[0] if a else kw.pop("hidden_states")
            if i == 0:
                first[0] = hidden.detach()
            args[i] = tuple(a[1:])
            kwargs[i] = dict(kw)
            if i == n - 1:
                raise StopForward
            return (hidden,) if adapter.layer_returns_tuple else hidden
        return forward

    for i, layer in enumerate(layers):
        layer.forward = recorder(i)
    try:
        with torch.no_grad():
            model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    except StopForward:
        pass
    finally:
        for layer in layers:
            layer.__dict__.pop("forward", None)
    if first[0] is None or any(k is None for k in kwargs):
        raise RuntimeError(f"{type(model).__name__}: the forward did not call every decoder layer once; "
                           "gradmap cannot run this model layer by layer")
    return LayerInputs(first[0], args, kwargs)
