"""Baseline layer-importance scores from the layer-pruning literature (used for comparison with GradMAP's metric).

* Block Influence (ShortGPT, Men et al., arXiv 2403.03853, Sec. 3.2, Eq. 1):
  :math:`BI_l = 1 - \\mathbb{E}_t \\frac{h_{l,t}^\\top h_{l+1,t}}{\\|h_{l,t}\\|\\,\\|h_{l+1,t}\\|}`, with :math:`h_l` the
  hidden state entering layer *l* and :math:`h_{l+1}` the one leaving it, averaged over real (unpadded) tokens.
  Lower = less important. One forward over the calibration set.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from .adapters import get_adapter, model_device
from .data import Calibration


def block_influence(model: nn.Module, calibration: Calibration, *, micro_batch: int = 8) -> tuple[torch.Tensor, float]:
    """ShortGPT Block Influence of every decoder layer (formula in the module docstring).

    Returns:
        ``(scores, seconds)``: fp32 ``[num_layers]`` on CPU (current positions) and the wall time in seconds.
    """
    adapter = get_adapter(model)
    layers = adapter.layers(model)
    device = model_device(model)
    sums = torch.zeros(len(layers), dtype=torch.float64)
    tokens = 0
    start = time.perf_counter()
    for ids, mask in calibration.batches(micro_batch):
        real = mask.bool().flatten().to(device)
        cos = {}

        def make_hook(i):
            def hook(module, args, kwargs, output):
                h_in = (args[0] if args else kwargs["hidden_states"]).flatten(0, 1)[real].float()
                h_out = (output[0] if isinstance(output, tuple) else output).flatten(0, 1)[real].float()
                cos[i] = torch.nn.functional.cosine_similarity(h_in, h_out, dim=-1).double().sum().cpu()
            return hook

        handles = [layer.register_forward_hook(make_hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
        try:
            with torch.no_grad():
                model.model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
        finally:
            for h in handles:
                h.remove()
        for i in range(len(layers)):
            sums[i] += cos[i]
        tokens += int(real.sum())
    return (1.0 - sums / tokens).float(), time.perf_counter() - start
