"""The memory planner: how many bytes a run needs where, and whether the weights stay resident or stream.

Everything here is arithmetic on the model's config and the run's settings; nothing is loaded. :func:`plan_run`
estimates, per device (the compute device, and the host):

* **weights**: the bytes of every unit (decoder layer, and the embeddings/final norm/LM head "outer" unit) in the
  compute dtype, counted exactly from a meta-device skeleton of the model; the units that fit the budget are
  resident, the others stream (read from the checkpoint while in use; at most two streamed layers in memory: the one
  in use and the next);
* **activations** of one micro-batch through one decoder layer: the forward transients (``(4·hidden + 3·ffn)`` per
  token, ``2·ffn`` without a gate), and the recomputed forward with grad plus its backward in the reverse sweep: the
  saved tensors (:func:`saved_tensor_floats`, measured) plus the backward's transients (``3·hidden + 2·ffn``); a
  resident run keeps one micro-batch's graph through every layer instead (``L`` layers' saved tensors, no
  recomputation) when the budget allows it. A micro-batch never straddles two cross-validation groups, so with stage
  2 on it holds at most ``ceil(windows / folds)`` windows (:func:`effective_micro_batch`);
* **boundary states**: ``(L + 1)`` hidden states of every calibration token of this rank (``tokens·hidden·itemsize``
  each), twice when stage 2 keeps the dense trajectory; on the device while they fit, the rest in pinned host memory,
  and when the host cannot hold them either, only every ``stride``-th boundary (checkpointing);
* **hidden-state gradients**: two sets of ``tokens·hidden·itemsize`` during the backward;
* **LM head**: one chunk of fp32 logits and their gradient (``chunk·vocab·4·2``) plus the rows' gradient;
* **stage 2**: ``2·folds + 6`` fp64 ``hidden × hidden`` matrices (every group's Gram matrix and cross term, their
  totals, the solve's temporaries), one folded ``down_proj`` and a forward's transients; stage 2 runs after the
  selection, so the working set is the larger of the two phases, not their sum;
* **score buffers**: one fp32 per layer (negligible, listed for completeness).

The weight bytes moved per decision are the streamed units' bytes times the sweeps a decision makes over them (a
forward, a backward, and a segment recompute when boundaries are checkpointed).

``max_memory`` uses accelerate's notation (``"20GiB"``, ``"1.5GB"``, bytes as an int; in the API also a per-device
dict ``{0: "70GiB", "cpu": "200GiB"}``, parsed with ``accelerate.utils.convert_file_size_to_int``). On CUDA the
device budget covers weights AND working set; the host budget (``"cpu"``) bounds units kept in host memory. On CPU
the budget bounds the host memory that WEIGHTS may hold (the working set comes on top and is reported).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
from accelerate.utils import convert_file_size_to_int

from ..adapters import get_adapter
from ..kernels.linear_cross_entropy import default_chunk_size

GiB = 1 << 30
#: Streamed layers resident at once: the one in use and the next one being read.
STREAM_SLOTS = 2


def parse_max_memory(value, device: torch.device) -> dict[str, int]:
    """``max_memory`` → ``{"device": bytes | absent, "cpu": bytes | absent}`` for a run on ``device``.

    A single size applies to the compute device (the host when computing on CPU). A dict uses accelerate's keys:
    a GPU index (or ``"cuda:N"``) and ``"cpu"``; keys for other GPUs are ignored (each rank computes on one). On the
    command line the dict is written ``cuda=70GiB,cpu=400GiB`` (``cuda`` = this rank's GPU).

    Raises:
        ValueError: an unreadable size (named ``--max-memory``) or a non-positive one.
    """
    def size(v) -> int:
        if isinstance(v, str) and v.strip().isdigit():  # plain bytes on the command line
            v = int(v.strip())
        try:
            n = convert_file_size_to_int(v)
        except (ValueError, TypeError, AttributeError):
            raise ValueError(f"--max-memory: {v!r} is not a size like 20GiB, 1.5GB or 800MB") from None
        if n <= 0:
            raise ValueError(f"--max-memory: must be positive, got {v!r}")
        return n

    device = torch.device(device)
    if value is None:
        return {}
    if isinstance(value, str) and "=" in value:  # the command line's dict: "cuda=70GiB,cpu=400GiB" or "0=70GiB,..."
        pairs = [item.partition("=") for item in value.split(",")]
        if any(not k.strip() or not v.strip() for k, _, v in pairs):
            raise ValueError(f"--max-memory: {value!r}: expected SIZE or DEVICE=SIZE pairs like cuda=70GiB,cpu=400GiB")
        value = {("0" if k.strip() == "cuda" else k.strip()): v.strip() for k, _, v in pairs}
    if not isinstance(value, dict):
        return {"device" if device.type != "cpu" else "cpu": size(value)}
    out = {}
    for key, v in value.items():
        k = str(key)
        if k == "cpu":
            out["cpu"] = size(v)
        elif device.type == "cuda" and (k == str(device.index or 0) or k == f"cuda:{device.index or 0}"):
            out["device"] = size(v)
        elif device.type == "cpu" and k not in ("cpu",):
            continue
    return out


@dataclass
class ModelShape:
    """The sizes the planner needs, read from a config and a meta skeleton.

    ``layer_params`` per decoder layer and ``outer_params`` (embeddings, final norm, LM head once if tied) are
    element counts; ``gated`` says the MLP has gate and up projections.
    """

    num_layers: int
    hidden: int
    ffn: int
    heads: int
    vocab: int
    layer_params: list[int]
    outer_params: int
    gated: bool = True
    eager_attention: bool = False
    head_dim: int = 0  # 0: hidden // heads

    @classmethod
    def from_model(cls, model) -> "ModelShape":
        """Read the shape of a ``*ForCausalLM`` (a meta skeleton is enough: no parameter data is touched)."""
        adapter = get_adapter(model)
        layers = adapter.layers(model)
        cfg = model.config
        text = getattr(cfg, "get_text_config", lambda: cfg)()
        layer_ids = {id(p) for layer in layers for p in layer.parameters()}
        outer = sum(p.numel() for p in model.parameters() if id(p) not in layer_ids)
        names = {n for n, _ in layers[0].named_modules()} if len(layers) else set()
        ffn = (getattr(text, "intermediate_size", None) or getattr(text, "ffn_dim", None)
               or getattr(text, "n_inner", None) or 4 * text.hidden_size)
        return cls(num_layers=len(layers), hidden=text.hidden_size, ffn=int(ffn),
                   heads=int(getattr(text, "num_attention_heads", None) or getattr(text, "n_head", 1)),
                   vocab=int(text.vocab_size), layer_params=[sum(p.numel() for p in layer.parameters())
                                                               for layer in layers],
                   outer_params=outer, gated=any(n.endswith("gate_proj") or n.endswith("gate_up_proj") for n in names),
                   eager_attention=getattr(cfg, "_attn_implementation", None) == "eager",
                   head_dim=int(getattr(text, "head_dim", None) or text.hidden_size
                                // int(getattr(text, "num_attention_heads", None) or getattr(text, "n_head", 1))))


@dataclass
class RunSettings:
    """What the planner needs to know about a run (tokens are per window; sizes in tokens)."""

    nsamples: int
    seqlen: int
    micro_batch: int = 8
    world_size: int = 1
    compensate: bool = True
    folds: int = 4
    stride: int = 1
    candidates: int = 1  # resumed streams alive at once (leave-one-out searches hold more)
    candidate_windows: int | None = None  # windows each extra resumed stream carries (the loss check's subset); None: all
    eval_seqlen: int | None = None
    logits_chunk: int | None = None  # LM-head rows per chunk (None: the fused loss's own default for the vocabulary)


@dataclass
class MemoryPlan:
    """The estimate of :func:`plan_run` (bytes unless said otherwise)."""

    device: str
    dtype: str
    mode: str  # "resident" | "streamed"
    weights_total: int
    resident_weights: int
    streamed_slots: int
    largest_layer: int
    activations_forward: int
    activations_backward: int
    boundary_states: int
    gradients: int
    lm_head: int
    gram: int
    scores: int
    peak_device: int
    peak_host: int
    moved_per_decision: int
    resident_layers: int
    streamed_layers: int
    placement: dict = field(default_factory=dict)
    budget: dict = field(default_factory=dict)
    fits: bool = True
    advice: str = ""
    stride: int = 1
    device_states: int = 0
    host_states: int = 0
    state_budget: int | None = None
    keep_graph: bool = False

    def as_dict(self) -> dict:
        """JSON-ready (placement keys as strings)."""
        d = asdict(self)
        d["placement"] = {str(k): v for k, v in self.placement.items()}
        return d


def effective_micro_batch(settings: RunSettings) -> int:
    """Windows per micro-batch as the engine really forms them: at most ``micro_batch``, and no micro-batch straddles
    two cross-validation groups (:class:`gradmap.engine.Windows`), so with stage 2 on it is at most
    ``ceil(windows of this rank / folds)``."""
    per_rank = math.ceil(settings.nsamples / settings.world_size)
    groups = settings.folds if settings.compensate else 1
    return max(1, min(settings.micro_batch, math.ceil(per_rank / max(groups, 1))))


def saved_tensor_floats(shape: ModelShape, seqlen: int) -> int:
    """Elements autograd saves per token for one decoder layer's backward (parameters excluded), measured with
    ``torch.autograd.graph.saved_tensors_hooks`` on Llama-shaped layers (SDPA attention, CPU):
    ``9·hidden + 4·ffn + 2·head_dim + heads`` for a gated MLP (``2·ffn`` without a gate), plus ``heads·seqlen`` for
    eager attention's probabilities."""
    head_dim = shape.head_dim or shape.hidden // max(shape.heads, 1)
    floats = 9 * shape.hidden + (4 if shape.gated else 2) * shape.ffn + 2 * head_dim + shape.heads
    return floats + (shape.heads * seqlen if shape.eager_attention else 0)


def _activation_bytes(shape: ModelShape, settings: RunSettings, itemsize: int) -> tuple[int, int]:
    """(forward transient, one layer's backward: saved tensors + the backward's transients) for one micro-batch."""
    bt = effective_micro_batch(settings) * settings.seqlen
    attn = shape.heads * settings.seqlen * 4 * bt if shape.eager_attention else 0  # fp32 scores, one copy in flight
    forward = bt * (4 * shape.hidden + (3 if shape.gated else 2) * shape.ffn) * itemsize + attn
    transient = bt * (3 * shape.hidden + 2 * shape.ffn) * itemsize + attn
    return forward, bt * saved_tensor_floats(shape, settings.seqlen) * itemsize + transient


def plan_run(shape: ModelShape, settings: RunSettings, *, device: torch.device, dtype: torch.dtype,
             max_memory=None, device_capacity: int | None = None, host_capacity: int | None = None) -> MemoryPlan:
    """Estimate a run's memory per device and decide resident vs streamed, where the hidden states live and how
    densely boundaries are stored (module docstring).

    Order of decisions: (1) the working set that must be on the compute device (one micro-batch's activations, the
    logits chunk, the Gram matrices, the hidden-state gradients, two streamed layers); (2) the weights: resident units
    first (embeddings/head, then layers in order) up to what the budget leaves; (3) the boundary hidden states: on the
    device up to what is left, the rest spilled to host memory; (4) when even the host cannot hold them (``"cpu"``
    budget, or ``host_capacity``), only every ``stride``-th boundary is stored, the smallest stride that fits.

    Args:
        shape: :meth:`ModelShape.from_model` of the model.
        settings: calibration and run sizes.
        device, dtype: compute device and dtype.
        max_memory: accelerate-notation budget (:func:`parse_max_memory`); ``None``: the device's capacity
            (``device_capacity`` for CUDA; unlimited host memory on CPU).
        device_capacity: bytes of the CUDA device (total memory), when known.
        host_capacity: bytes of host memory available for spilled states (default: unlimited, or the ``"cpu"``
            budget).

    Returns:
        :class:`MemoryPlan`: ``fits`` is False (with ``advice``) when not even streaming and checkpointing fit.
    """
    device = torch.device(device)
    item = dtype.itemsize
    budget = parse_max_memory(max_memory, device)
    if device.type == "cuda" and "device" not in budget and device_capacity:
        budget["device"] = int(device_capacity * 0.92)  # leave the CUDA context and allocator slack
    layer_bytes = [p * item for p in shape.layer_params]
    outer_bytes = shape.outer_params * item
    total = sum(layer_bytes) + outer_bytes
    largest = max(layer_bytes, default=0)
    tokens = math.ceil(settings.nsamples / settings.world_size) * settings.seqlen
    state = tokens * shape.hidden * item
    candidate_state = state if settings.candidate_windows is None else (
        math.ceil(min(settings.candidate_windows, settings.nsamples) / settings.world_size) * settings.seqlen
        * shape.hidden * item)
    n = shape.num_layers
    gradients = 2 * state
    fwd, bwd = _activation_bytes(shape, settings, item)
    rows = settings.logits_chunk or default_chunk_size(shape.vocab, tokens, device=device, dtype=dtype)
    per_logit = 4 + (2 if device.type == "cuda" and dtype != torch.float32 else 0)
    head = rows * shape.vocab * per_logit + rows * shape.hidden * 4 * 2  # the chunk's logits (gradient in place)
    # stage 2: every group's G and C (one fp64 buffer), their totals, and the solve's temporaries (G − G_g, C − C_g,
    # the Cholesky factor, T); then one folded down_proj at a time (compensation.cross_validation)
    gram = (2 * settings.folds + 6) * shape.hidden ** 2 * 8 if settings.compensate else 0
    scores = n * 4
    selection_set = gradients + bwd + head + scores
    stage2_set = gram + shape.hidden * shape.ffn * item + fwd + head if settings.compensate else 0
    fixed = max(selection_set, stage2_set)

    def boundary_bytes(stride: int) -> int:
        live = (math.ceil(n / stride) + 1) * state  # positions 0, stride, 2·stride, ... and the final one
        dense = live if settings.compensate else 0  # the dense trajectory kept for stage 2
        segment = (stride - 1) * state if stride > 1 else 0  # a recomputed segment in flight
        return live + dense + segment + max(settings.candidates - 1, 0) * candidate_state

    # (2) weights: fill what the budget leaves after the fixed working set (on CPU the budget is for weights only)
    if device.type == "cuda":
        weight_budget = budget["device"] - fixed - STREAM_SLOTS * largest if "device" in budget else None
        host_units_budget = budget.get("cpu")
    else:
        weight_budget = budget["cpu"] - STREAM_SLOTS * largest if "cpu" in budget else None
        host_units_budget = None
    # (the outer unit competes for the same budget: placed first, it streams when it does not fit)
    placement: dict = {}
    used = host_used = 0
    units = [("outer", outer_bytes)] + list(enumerate(layer_bytes))
    if weight_budget is None or total <= (weight_budget + STREAM_SLOTS * largest):
        placement = {u: "device" for u, _ in units}
        used = total
    else:
        room = weight_budget
        if outer_bytes > room:  # the outer unit streams too: what is in flight is the larger of it and two layers
            room = weight_budget + STREAM_SLOTS * largest - max(outer_bytes, STREAM_SLOTS * largest)
        for u, b in units:
            if used + b <= room:
                placement[u] = "device"
                used += b
            elif device.type == "cuda" and host_units_budget is not None and host_used + b <= host_units_budget:
                placement[u] = "host"
                host_used += b
            else:
                placement[u] = "stream"
    streamed = [u for u, p in placement.items() if p != "device"]
    # in flight: two streamed layers (the one in use and the next), or the outer unit alone (it is never onloaded
    # together with a layer: embeddings before the first layer, the LM head after the last)
    slots = min(STREAM_SLOTS, len([u for u in streamed if u != "outer"])) * largest
    if "outer" in streamed:
        slots = max(slots, outer_bytes)
    # (3) states: on the device up to what is left, then the host; (4) a stride when the host cannot hold them
    if device.type == "cuda":
        state_room = max(budget["device"] - used - slots - fixed, 0) if "device" in budget else None
        host_room = (budget["cpu"] - host_used) if "cpu" in budget else host_capacity
    else:
        state_room, host_room = None, host_capacity  # on CPU the device is the host
    stride = 1
    while True:
        need = boundary_bytes(stride)
        device_states = need if state_room is None else min(need, state_room)
        host_states = need - device_states
        if host_room is None or host_states <= host_room or stride >= n:
            break
        stride += 1
    mode = "resident" if not streamed else "streamed"
    # Resident runs keep one micro-batch's autograd graph through every layer in the backward (no recomputation,
    # Trajectory.backward's fast path) when the budget allows it; otherwise layer by layer.
    graph = (n - 1) * effective_micro_batch(settings) * settings.seqlen * saved_tensor_floats(shape, settings.seqlen) \
        * item  # the other layers' saved tensors
    with_graph = max(selection_set + graph, stage2_set)
    keep_graph = mode == "resident" and (device.type == "cpu" or "device" not in budget
                                         or used + with_graph + device_states <= budget["device"])
    working = with_graph if keep_graph else fixed
    if keep_graph:
        bwd += graph
    sweeps = 2 + (1 if stride > 1 else 0)  # forward + backward (+ segment recompute)
    moved = sum(b for u, b in units if placement[u] != "device") * sweeps
    peak_device = used + slots + working + device_states
    peak_host = host_used + host_states if device.type == "cuda" else peak_device
    fits, advice = True, ""
    least = max(outer_bytes, STREAM_SLOTS * largest)  # the weights a fully streamed run holds at once
    if device.type == "cuda" and "device" in budget and fixed + least > budget["device"]:
        fits = False
        advice = (f"the working set ({fixed / GiB:.1f} GiB: activations {max(fwd, bwd) / GiB:.1f} GiB, logits chunk "
                  f"{head / GiB:.1f} GiB, Gram {gram / GiB:.1f} GiB, gradients {gradients / GiB:.1f} GiB) plus the "
                  f"embeddings/head and two layers does not fit {budget['device'] / GiB:.1f} GiB on {device}: lower "
                  "--micro-batch/--seqlen, run on more GPUs (torchrun), or raise --max-memory")
    elif device.type == "cpu" and "cpu" in budget and least > budget["cpu"]:
        fits = False
        advice = (f"--max-memory {budget['cpu'] / GiB:.2f} GiB is below the weights a fully streamed run holds at once "
                  f"(two decoder layers, or the embeddings/LM head: {least / GiB:.2f} GiB); raise it")
    elif host_room is not None and host_states > host_room:
        fits = False
        advice = (f"the boundary hidden states need {host_states / GiB:.1f} GiB of host memory even storing every "
                  f"{stride}-th; {host_room / GiB:.1f} GiB is available: lower --nsamples/--seqlen or add processes")
    return MemoryPlan(device=str(device), dtype=str(dtype).replace("torch.", ""), mode=mode, weights_total=total,
                      resident_weights=used, streamed_slots=slots, largest_layer=largest, activations_forward=fwd,
                      activations_backward=bwd, boundary_states=need, gradients=gradients, lm_head=head,
                      gram=gram, scores=scores, peak_device=peak_device, peak_host=peak_host,
                      moved_per_decision=moved, resident_layers=sum(1 for u in placement if u != "outer" and
                                                                    placement[u] == "device"),
                      streamed_layers=sum(1 for u in streamed if u != "outer"), placement=placement,
                      budget={k: v for k, v in budget.items()}, fits=fits, advice=advice, stride=stride,
                      device_states=device_states, host_states=host_states,
                      state_budget=state_room if device.type == "cuda" else None, keep_graph=keep_graph)
