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

from ..engine import Candidate, Trajectory
from .base import Selection, Step, Timer

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
            raise ValueError(f"--method blockpruner needs decoder layers with {attr}.{proj} (Llama-style sub-blocks); "
                             f"{type(layer).__name__} has none")


def sub_block_params(layer: nn.Module, kind: str) -> int:
    """Parameters (elements) of one sub-block of a decoder layer (its norm excluded)."""
    return sum(p.numel() for p in getattr(layer, _PATHS[kind][0]).parameters())


def zeroed_output(layer: nn.Module, kind: str) -> dict[str, torch.Tensor]:
    """Overrides that set the output projection of sub-block ``kind`` (weight and bias) to zero, so it adds 0: how a
    lone removed sub-block is represented in a plain checkpoint (names relative to the layer)."""
    attr, proj = _PATHS[kind]
    module = getattr(getattr(layer, attr), proj)
    out = {f"{attr}.{proj}.weight": torch.zeros(module.weight.shape, dtype=module.weight.dtype)}
    if module.bias is not None:
        out[f"{attr}.{proj}.bias"] = torch.zeros(module.bias.shape, dtype=module.bias.dtype)
    return out


def select_blockpruner(traj: Trajectory, target: int, *, protected=(), budget=None) -> Selection:
    """Run BlockPruner on the engine's (dense) live view until the parameters of ``target`` layers are removed.

    Each decision evaluates every remaining sub-block's removal with one resumed forward (all candidates in one
    engine sweep, each starting from the stored hidden states entering its layer).

    Returns:
        :class:`Selection`: ``removed`` = the wholly dropped layers (original indices, in the order their second
        sub-block went); step scores = calibration PPL per candidate sub-block (``"<layer>.attn"|"<layer>.mlp"``);
        ``layer_scores`` = per layer, the lower first-step PPL of its two sub-blocks; ``extra`` = the sub-block
        removal order, the zeroed sub-blocks and ``removed_params`` / ``zeroed_params`` / ``target_params``.
        Dropped layers leave the live view; a half-removed layer keeps the zeroed output projection as an override.

    Raises:
        ValueError: a family without Llama-style sub-blocks, or protected layers leaving too little to remove. A
            target spent entirely on sub-blocks of different layers (no whole layer dropped) is not an error: the
            selection's ``extra["note"]`` says so (and it is logged as a warning).
    """
    engine = traj.engine
    model_layers = engine.adapter.layers(engine.model)
    n = engine.n_layers
    for layer in model_layers:
        _check_family(layer)
    protected = {int(p) for p in protected}
    sizes = {(i, k): sub_block_params(model_layers[i], k) for i in range(n) for k in SUB_BLOCKS}
    layer_size = {i: engine.layer_params[i] for i in range(n)}
    # Budget: the sub-block parameters of `target` average layers (norm weights are not part of a sub-block).
    target_params = round(target * sum(sizes.values()) / n)
    if sum(v for (i, _), v in sizes.items() if i not in protected) < target_params:
        raise ValueError(f"protected: the unprotected sub-blocks hold fewer parameters than {target} layers")
    removed: dict[tuple[int, str], bool] = {}
    order: list[str] = []
    dropped: list[int] = []
    selection = Selection(method="blockpruner")

    while sum(sizes[key] for key in removed) < target_params:
        with Timer() as t:
            work0 = engine.work
            kept = list(engine.view.kept)
            candidates = [(i, k) for i in kept for k in SUB_BLOCKS if i not in protected and (i, k) not in removed]
            losses = traj.candidate_losses([Candidate(kept.index(i), patches={_PATHS[k][0]: RemovedSubBlock(k)})
                                            for i, k in candidates], desc="blockpruner")
            scores = {_label(i, k): math.exp(total / max(count, 1)) for (i, k), (total, count) in
                      zip(candidates, losses)}
            best = min(candidates, key=lambda c: (scores[_label(*c)], c))
            selection.passes += traj.passes(engine.work - work0)
            removed[best] = True
            if all((best[0], k) in removed for k in SUB_BLOCKS):
                dropped.append(best[0])
                engine.remove(best[0])
                if budget is not None:  # the curve only: BlockPruner's budget is in parameters (no stop rule)
                    budget.removed(best[0])
            else:
                engine.set_patches(best[0], {_PATHS[best[1]][0]: RemovedSubBlock(best[1])})
        order.append(_label(*best))
        selection.steps.append(Step(len(selection.steps) + 1, scores, _label(*best), t.seconds))
        logger.info("blockpruner step %d: removed %s (PPL %.3f) in %.1f s", len(order), _label(*best),
                    scores[_label(*best)], t.seconds)
    note = None
    if not dropped:
        note = (f"BlockPruner spent its budget of {target} layer(s) ({target_params} parameters) on {len(order)} "
                f"sub-blocks of different layers ({', '.join(order)}) and removed NO whole decoder layer: the "
                "checkpoint keeps every layer, with those sub-blocks' output projections zeroed (no parameters "
                "saved); raise --num-layers/--ratio to drop whole layers")
        logger.warning(note)
    first = selection.steps[0].scores
    selection.layer_scores = {i: min(first[_label(i, k)] for k in SUB_BLOCKS) for i in range(n) if i not in protected}
    # Materialise: a half-removed layer gets its sub-block's output projection zeroed (an override), no patch.
    zeroed = sorted((key for key in removed if key[0] not in dropped), key=lambda c: (c[0], c[1]))
    for i, k in zeroed:
        engine.view.patches.pop(i, None)
        engine.set_overrides(i, zeroed_output(model_layers[i], k))
    selection.removed = list(dropped)
    selection.extra = {"sub_block_order": order, "zeroed_sub_blocks": [_label(i, k) for i, k in zeroed],
                       "removed_params": sum(layer_size[i] for i in dropped),
                       "zeroed_params": sum(sizes[key] for key in zeroed), "target_params": target_params}
    if note:
        selection.extra["note"] = note
    return selection
