"""BlockPruner (Zhong et al., arXiv 2406.10594, Sec. 3, Algorithm 1): iterative greedy removal of attention and MLP
sub-blocks by calibration perplexity.

Every decoder layer holds two residual sub-blocks, ``h ← h + Attn(norm(h))`` and ``h ← h + MLP(norm(h))``. Each
decision removes, from the CURRENT model, the sub-block whose removal gives the lowest calibration perplexity
(:math:`\\exp` of the mean next-token NLL), one forward per remaining candidate. It stops once the removed sub-block parameters
reach those of ``n`` average decoder layers (the parameter budget of the layer-pruning methods it is compared with;
the last decision may overshoot by at most one sub-block).

Representation in a plain ``transformers`` checkpoint. While searching, a removed sub-block is replaced by a module
that returns zeros (the residual stream passes unchanged and no compute is spent on it). At the end:

* a layer whose two sub-blocks are both removed is an identity and is dropped (:func:`gradmap.removal.remove_layers`);
  its parameters are really gone;
* a layer with one removed sub-block keeps it, with its output projection (``self_attn.o_proj`` for attention,
  ``mlp.down_proj`` for the MLP, weight and bias) set to zero, so it adds exactly 0 to the residual stream. Those
  parameters are still stored (and computed): the report gives them as ``zeroed_params`` apart from the
  ``removed_params`` that really left the checkpoint.

GradMAP's stage 2 on top (:mod:`gradmap.compensation`) aligns kept layers with the dense model by whole layers, so
it fits projections at the gaps left by dropped layers only; the drift caused by a half-removed layer is not a gap
and is not targeted (``max-shift`` may still pick that layer if its shift is the largest).

Only families with Llama-style sub-block names (``self_attn.o_proj``, ``mlp.down_proj``, attention returning
``(output, weights)``) are supported.
"""

from __future__ import annotations

import logging
import math

import torch
from torch import nn
from tqdm.auto import tqdm

from ..adapters import get_adapter
from ..data import Calibration
from ..pruning import Selection, Step
from ..removal import remove_layers
from .common import Timer
from ..prefix import DEFAULT_CACHE_BYTES, PrefixCache, resumed_loss

logger = logging.getLogger(__name__)

SUB_BLOCKS = ("attn", "mlp")
#: sub-block → (module attribute on the decoder layer, output projection inside it)
_PATHS = {"attn": ("self_attn", "o_proj"), "mlp": ("mlp", "down_proj")}


class RemovedSubBlock(nn.Module):
    """Stand-in for a removed attention or MLP sub-block: returns zeros shaped like its input.

    Attention modules return ``(output, attention_weights)``; MLPs return the output tensor.
    """

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind

    def forward(self, hidden_states=None, *args, **kwargs):
        x = hidden_states if hidden_states is not None else args[0]
        zeros = torch.zeros_like(x)
        return (zeros, None) if self.kind == "attn" else zeros


def _label(layer: int, kind: str) -> str:
    return f"{layer}.{kind}"


def _check_family(layer: nn.Module) -> None:
    for kind, (attr, proj) in _PATHS.items():
        if not isinstance(getattr(getattr(layer, attr, None), proj, None), nn.Linear):
            raise ValueError(f"method: blockpruner needs decoder layers with {attr}.{proj} (Llama-style sub-blocks); "
                             f"{type(layer).__name__} has none")


def sub_block_params(layer: nn.Module, kind: str) -> int:
    """Parameters (elements) of one sub-block of a decoder layer (its norm excluded)."""
    return sum(p.numel() for p in getattr(layer, _PATHS[kind][0]).parameters())


def zero_sub_block_(layer: nn.Module, kind: str) -> None:
    """Set the output projection of ``kind`` (weight and bias) to zero in place, so the sub-block adds 0."""
    proj = getattr(getattr(layer, _PATHS[kind][0]), _PATHS[kind][1])
    with torch.no_grad():
        proj.weight.zero_()
        if proj.bias is not None:
            proj.bias.zero_()


def select_blockpruner(model: nn.Module, calibration: Calibration, target: int, *, protected=(),
                       micro_batch: int = 8, progress: bool = False,
                       cache_bytes: int = DEFAULT_CACHE_BYTES) -> Selection:
    """Run BlockPruner on the dense ``model`` IN PLACE until the parameters of ``target`` layers are removed.

    Each candidate's calibration PPL is computed by a forward resumed from the cached hidden state entering its layer
    (:mod:`gradmap.prefix`, one cache pass per decision; ``cache_bytes=0``: plain full forwards).

    Returns:
        :class:`Selection`: ``removed`` = the wholly dropped layers (original indices, in the order their second
        sub-block went); step scores = calibration PPL per candidate sub-block (``"<layer>.attn"|"<layer>.mlp"``);
        ``layer_scores`` = per layer, the lower first-step PPL of its two sub-blocks; ``extra`` = the sub-block
        removal order, the zeroed sub-blocks and ``removed_params`` / ``zeroed_params`` / ``target_params``.

    Raises:
        ValueError: a family without Llama-style sub-blocks, or protected layers leaving too little to remove.
    """
    adapter = get_adapter(model)
    layers = adapter.layers(model)
    n = len(layers)
    for layer in layers:
        _check_family(layer)
    protected = {int(p) for p in protected}
    sizes = {(i, k): sub_block_params(layers[i], k) for i in range(n) for k in SUB_BLOCKS}
    layer_size = {i: sum(p.numel() for p in layers[i].parameters()) for i in range(n)}
    # Budget: the sub-block parameters of `target` average layers (norm weights are not part of a sub-block).
    target_params = round(target * sum(sizes.values()) / n)
    if sum(v for (i, _), v in sizes.items() if i not in protected) < target_params:
        raise ValueError(f"protected: the unprotected sub-blocks hold fewer parameters than {target} layers")
    originals: dict[tuple[int, str], nn.Module] = {}
    order: list[str] = []
    dropped: list[int] = []
    selection = Selection(method="blockpruner")

    def effective() -> int:
        return sum(sizes[key] for key in originals)

    while effective() < target_params:
        with Timer() as t:
            candidates = [(i, k) for i in range(n) for k in SUB_BLOCKS if i not in protected and (i, k) not in originals]
            scores: dict[str, float] = {}
            cache = PrefixCache(model, calibration, micro_batch=micro_batch, max_bytes=cache_bytes,
                                last=max(i for i, _ in candidates), adapter=adapter)
            passes = cache.passes
            for i, k in tqdm(candidates, desc="blockpruner", disable=not progress, leave=False):
                attr = _PATHS[k][0]
                module = getattr(layers[i], attr)
                setattr(layers[i], attr, RemovedSubBlock(k))
                try:
                    nll, cost = resumed_loss(model, calibration, cache, start=i)
                    scores[_label(i, k)] = math.exp(nll)
                    passes += cost
                finally:
                    setattr(layers[i], attr, module)
            best = min(candidates, key=lambda c: (scores[_label(*c)], c))
            originals[best] = getattr(layers[best[0]], _PATHS[best[1]][0])
            setattr(layers[best[0]], _PATHS[best[1]][0], RemovedSubBlock(best[1]))
        selection.passes += passes
        order.append(_label(*best))
        if all((best[0], k) in originals for k in SUB_BLOCKS):
            dropped.append(best[0])
        selection.steps.append(Step(len(selection.steps), scores, _label(*best), t.seconds))
        logger.info("blockpruner step %d: removed %s (PPL %.3f) in %.1f s", len(order), _label(*best),
                    scores[_label(*best)], t.seconds)
    first = selection.steps[0].scores
    selection.layer_scores = {i: min(first[_label(i, k)] for k in SUB_BLOCKS) for i in range(n) if i not in protected}

    # Materialise: put the real modules back, zero the output projection of half-removed layers, drop whole ones.
    for (i, k), module in originals.items():
        setattr(layers[i], _PATHS[k][0], module)
    zeroed = sorted(_label(i, k) for (i, k) in originals if i not in dropped)
    for (i, k) in originals:
        if i not in dropped:
            zero_sub_block_(layers[i], k)
    remove_layers(model, dropped, adapter)
    selection.removed = list(dropped)
    removed_params = sum(layer_size[i] for i in dropped)
    zeroed_params = sum(sizes[key] for key in originals if key[0] not in dropped)
    selection.extra = {"sub_block_order": order, "zeroed_sub_blocks": zeroed, "removed_params": removed_params,
                       "zeroed_params": zeroed_params, "target_params": target_params}
    return selection
