"""Architecture adapters: where each model family keeps its decoder layers.

This module is the one documented place to add a model family. An adapter answers, for one ``transformers``
architecture:

* where the list of decoder layers lives (``model.model.layers`` for Llama-like models, ``transformer.h`` for GPT-2
  and Falcon, ``model.decoder.layers`` for OPT),
* which module is the MLP output projection that stage 2 folds its projection into (``mlp.down_proj`` for
  Llama-like models, ``mlp.c_proj`` for GPT-2, ``fc2`` for OPT, ``mlp.dense_4h_to_h`` for Falcon) and whether it is
  an ``nn.Linear`` (``y = x Wᵀ + b``, ``W: [hidden, intermediate]``) or a GPT-2 ``Conv1D`` (``y = x W + b``,
  ``W: [intermediate, hidden]``),
* whether a normalisation sits between that projection and the residual stream (Gemma2/Gemma3 "sandwich" norm
  ``post_feedforward_layernorm``), which changes the stage-2 target (:func:`gradmap.compensation.fit_projection`),
* which config fields hold one entry per decoder layer and must be trimmed when layers are removed.

Every KV-cache ``layer_idx`` attribute inside a decoder layer is renumbered generically (any submodule that has an
integer ``layer_idx``), so no per-family path is needed for it.

To add a family, append an :class:`Adapter` to ``_ADAPTERS`` with the ``model_type`` strings it serves and the
attribute paths above, then add its tiny config to ``tests/conftest.py`` (``CONFIGS``) so every test runs on it.

Stage 2 on sandwich-norm families (Gemma2, Gemma3). There the layer output is ``X = R + N(M)`` with
``N(M)_t = g ⊙ M_t / rms(M_t)`` (RMSNorm with gain ``g``), so a matrix ``T`` folded into ``down_proj`` changes the
output to ``R + N(M T)``: not linear in ``T``. The fit therefore targets the pre-norm direction: with the aligned dense
state ``Y``, the wanted norm output is ``Y − R = Y − X + N(M)``; dividing by ``g`` and rescaling each token by
``rms(M_t)`` gives a pre-norm target ``Z_t = rms(M_t) · (Y_t − X_t + N(M)_t) ⊘ g`` (``Z = M`` exactly when there is
no shift, so ``T = I`` is the zero-shift solution), and ``T`` minimises ``‖M T − Z‖² + α‖T − I‖²`` (stage 2's
identity prior). RMSNorm removes any per-token scale, so only the direction of ``M T`` matters and the approximation
is that ``rms`` of the fitted output stays near ``rms(M)``. The cross-validation guard
(:func:`gradmap.compensation.compensate`) then keeps the fold only if it lowers the cross-validated loss; otherwise the
layer is left unchanged and the report says so.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .projection import fold_projection_

MLP_OUT_KINDS = ("linear", "conv1d")


@dataclass(frozen=True)
class Adapter:
    """How to reach the parts of one decoder-only architecture that layer removal and compensation touch.

    Attributes:
        model_types: ``config.model_type`` values this adapter serves.
        layers_path: dotted attribute path from the ``*ForCausalLM`` module to the ``nn.ModuleList`` of decoder layers.
        mlp_out_path: dotted path inside one decoder layer to the MLP output projection (``down_proj``).
        mlp_out_kind: ``"linear"`` (``nn.Linear``, weight ``[hidden, intermediate]``) or ``"conv1d"`` (GPT-2
            ``Conv1D``, weight ``[intermediate, hidden]``).
        post_mlp_norm_path: dotted path to a normalisation applied to the MLP output before the residual add
            (Gemma2/3 ``post_feedforward_layernorm``), or ``None``.
        per_layer_config_fields: config attributes that are lists with one entry per decoder layer.
        final_norm_path: dotted path from the ``*ForCausalLM`` to the normalisation applied after the last decoder
            layer (``model.norm``, ``transformer.ln_f``, ``model.decoder.final_layer_norm``).
        head_proj_path: dotted path to a projection applied after the final norm and before the LM head (OPT's
            ``project_out`` when ``word_embed_proj_dim != hidden_size``; the module may be ``None``), or ``None``.
        layer_returns_tuple: the decoder layer's ``forward`` returns a tuple whose first item is the hidden states
            (Falcon) instead of the hidden-states tensor itself (every other family in transformers 5).
    """

    model_types: tuple[str, ...]
    layers_path: str = "model.layers"
    mlp_out_path: str = "mlp.down_proj"
    mlp_out_kind: str = "linear"
    post_mlp_norm_path: str | None = None
    per_layer_config_fields: tuple[str, ...] = ("layer_types",)
    final_norm_path: str = "model.norm"
    head_proj_path: str | None = None
    layer_returns_tuple: bool = False

    def layers(self, model: nn.Module) -> nn.ModuleList:
        """Return the decoder-layer ``nn.ModuleList`` of ``model`` (a ``*ForCausalLM``)."""
        return _get(model, self.layers_path)

    def set_layers(self, model: nn.Module, layers: nn.ModuleList) -> None:
        """Replace the decoder-layer list of ``model`` by ``layers``."""
        parent_path, _, name = self.layers_path.rpartition(".")
        parent = _get(model, parent_path) if parent_path else model
        setattr(parent, name, layers)

    def down_proj(self, layer: nn.Module) -> nn.Module:
        """Return the MLP output projection (``down_proj``) of one decoder layer (``nn.Linear`` or ``Conv1D``)."""
        return _get(layer, self.mlp_out_path)

    def post_mlp_norm(self, layer: nn.Module) -> nn.Module | None:
        """Return the normalisation between the MLP output and the residual add, or ``None`` (most families)."""
        return _get(layer, self.post_mlp_norm_path) if self.post_mlp_norm_path else None

    def mlp_out_features(self, layer: nn.Module) -> int:
        """Output width (hidden size) of the MLP output projection of ``layer``."""
        weight = self.down_proj(layer).weight
        return weight.shape[0] if self.mlp_out_kind == "linear" else weight.shape[1]

    def fold_into_mlp_out_(self, layer: nn.Module, T: torch.Tensor) -> None:
        """Fold ``T`` (``[hidden, hidden]``) into the MLP output projection of ``layer`` in place, bias included.

        The projection's output ``y`` becomes ``y T``. ``nn.Linear`` (``y = x Wᵀ + b``): ``W ← Tᵀ W``, ``b ← Tᵀ b``.
        ``Conv1D`` (``y = x W + b``, ``W: [in, out]``): ``W ← W T``, ``b ← Tᵀ b``, done by folding into the explicit
        transpose ``Wᵀ`` (an ``nn.Linear``-shaped copy) and writing it back into the module's own storage.
        Computed by :func:`gradmap.projection.fold_projection_` (fp64 accumulation).

        Raises:
            ValueError: if ``T`` does not match the hidden size.
        """
        module = self.down_proj(layer)
        if self.mlp_out_kind == "linear":
            fold_projection_(module.weight, T, module.bias)
            return
        with torch.no_grad():
            linear_weight = module.weight.detach().T.contiguous()
            fold_projection_(linear_weight, T, module.bias)
            module.weight.copy_(linear_weight.T)

    def mlp_out_names(self, with_bias: bool = True) -> list[str]:
        """Names of the MLP output projection's weight (and bias) relative to the decoder layer
        (``["mlp.down_proj.weight", "mlp.down_proj.bias"]``)."""
        return [f"{self.mlp_out_path}.weight"] + ([f"{self.mlp_out_path}.bias"] if with_bias else [])

    def folded_mlp_out(self, weight: torch.Tensor, bias: torch.Tensor | None, T: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The MLP output projection's weight (and bias) with ``T`` folded in, as NEW tensors (inputs unchanged).

        Same fold as :meth:`fold_into_mlp_out_` (output ``y → y T``) on copies, in the inputs' dtype and device:
        ``nn.Linear`` ``W ← Tᵀ W``; GPT-2 ``Conv1D`` (``W: [in, out]``) ``W ← W T``; ``b ← Tᵀ b``. Stage 2 gives the
        result to the engine as parameter overrides (the dense weights are never modified).
        """
        with torch.no_grad():
            new_bias = None if bias is None else bias.detach().clone()
            if self.mlp_out_kind == "linear":
                new_weight = weight.detach().clone()
                fold_projection_(new_weight, T, new_bias)
                return new_weight, new_bias
            linear_weight = weight.detach().T.contiguous()
            fold_projection_(linear_weight, T, new_bias)
            return linear_weight.T.contiguous(), new_bias

    def final_norm(self, model: nn.Module) -> nn.Module | None:
        """The normalisation after the last decoder layer (``model.norm`` for Llama-like models; ``None`` for an OPT
        built without ``do_layer_norm_before``)."""
        return _get(model, self.final_norm_path)

    def final_hidden(self, model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """What the LM head reads: ``hidden`` (the last decoder layer's output, ``[..., hidden]``) through the final
        norm and, for OPT with ``word_embed_proj_dim != hidden_size``, ``project_out``."""
        norm = self.final_norm(model)
        out = norm(hidden) if norm is not None else hidden  # OPT without do_layer_norm_before has none
        proj = _get(model, self.head_proj_path) if self.head_proj_path else None
        return proj(out) if proj is not None else out

    @staticmethod
    def logit_softcap(config) -> float | None:
        """Final-logit soft-capping constant ``c`` (logits ``z → c·tanh(z/c)``; Gemma 2, arXiv 2408.00118 Sec. 2), or
        ``None`` when the family has none (``config.final_logit_softcapping``)."""
        value = getattr(config, "final_logit_softcapping", None)
        return float(value) if value else None

    def layer_output(self, output) -> torch.Tensor:
        """The hidden-states tensor of a decoder layer's ``forward`` output (first item for tuple-returning
        families, see ``layer_returns_tuple``)."""
        return output[0] if isinstance(output, tuple) else output

    def layer_prefix(self, index: int) -> str:
        """State-dict key prefix of decoder layer ``index`` (``"model.layers.3."``)."""
        return f"{self.layers_path}.{index}."

    def set_layer_idx(self, layer: nn.Module, idx: int) -> None:
        """Renumber every KV-cache ``layer_idx`` inside ``layer`` (any submodule with an int ``layer_idx``) to ``idx``."""
        for module in layer.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = idx


def _get(obj, path: str):
    for name in path.split(".") if path else []:
        obj = getattr(obj, name)
    return obj


_ADAPTERS: tuple[Adapter, ...] = (
    Adapter(model_types=("llama",)),
    Adapter(model_types=("mistral",)),
    Adapter(model_types=("qwen2",)),
    Adapter(model_types=("qwen3",)),
    Adapter(model_types=("phi3",)),  # fused gate_up_proj; down_proj is a plain nn.Linear
    Adapter(model_types=("gemma2",), post_mlp_norm_path="post_feedforward_layernorm"),
    Adapter(model_types=("gemma3_text",), post_mlp_norm_path="post_feedforward_layernorm"),
    Adapter(model_types=("gpt2",), layers_path="transformer.h", mlp_out_path="mlp.c_proj", mlp_out_kind="conv1d",
            final_norm_path="transformer.ln_f"),
    Adapter(model_types=("opt",), layers_path="model.decoder.layers", mlp_out_path="fc2",
            final_norm_path="model.decoder.final_layer_norm", head_proj_path="model.decoder.project_out"),
    Adapter(model_types=("falcon",), layers_path="transformer.h", mlp_out_path="mlp.dense_4h_to_h",
            final_norm_path="transformer.ln_f", layer_returns_tuple=True),
)

SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(t for a in _ADAPTERS for t in a.model_types)


def adapter_for_type(model_type: str | None) -> Adapter:
    """Return the :class:`Adapter` serving ``config.model_type == model_type`` (no model needed: used to validate a
    model directory from its ``config.json`` before loading any weights).

    Raises:
        ValueError: if there is none; the message lists the supported types and names this module as the place to
            add one.
    """
    for adapter in _ADAPTERS:
        if model_type in adapter.model_types:
            return adapter
    raise ValueError(
        f"unsupported architecture model_type={model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}. "
        "Add an Adapter to gradmap/adapters.py (_ADAPTERS) to support it."
    )


def get_adapter(model: nn.Module) -> Adapter:
    """Return the :class:`Adapter` for ``model`` (a ``transformers`` ``*ForCausalLM``).

    Raises:
        ValueError: if ``model.config.model_type`` has no adapter (see :func:`adapter_for_type`), or the decoder
            layers are not where the adapter expects them (e.g. a base model without the LM head).
    """
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    adapter = adapter_for_type(model_type)
    try:
        layers = adapter.layers(model)
    except AttributeError:
        layers = None
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(f"model of type {model_type!r} ({type(model).__name__}): no decoder-layer list at "
                         f"{adapter.layers_path}; pass the *ForCausalLM model")
    if adapter.mlp_out_kind not in MLP_OUT_KINDS:
        raise ValueError(f"adapter for {model_type!r}: mlp_out_kind {adapter.mlp_out_kind!r} is not one of "
                         f"{', '.join(MLP_OUT_KINDS)}")
    return adapter


def decoder_param_count(model: nn.Module) -> int:
    """Number of parameters (elements) held by the decoder layers of ``model``."""
    return sum(p.numel() for p in get_adapter(model).layers(model).parameters())


def model_device(model: nn.Module) -> torch.device:
    """Device of the first parameter of ``model``."""
    return next(model.parameters()).device
