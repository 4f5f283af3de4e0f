"""The layer engine: every forward, backward and resumed forward of gradmap, one decoder layer at a time.

Loop order (llm-compressor's "sequential onloading"): ``for layer in layers: for micro_batch in data: h = layer(h)``,
so only one decoder layer's weights must be on the device at a time (:mod:`gradmap.engine.weights`), and the hidden
states between layers (the *boundaries*) are kept for every micro-batch (:mod:`gradmap.engine.store`).

Vocabulary (positions are indices into the CURRENT list of kept layers; original indices name layers in the dense
model):

* :class:`View`: which decoder layers run, in order (``kept``, original indices), and what is changed in them:
  parameter *overrides* (stage 2's folded ``down_proj``) and submodule *patches* (BlockPruner's removed sub-blocks).
  The dense model is never modified: the pruned model is a view of it.
* :class:`Trajectory`: one set of token windows (the calibration set, or perplexity windows) run through one view:
  per micro-batch, the captured layer inputs (:mod:`gradmap.engine.context`) and the boundary hidden states
  ``h_p`` (entering position ``p``; ``h_n`` leaves the last layer). Boundaries are valid up to ``valid``; a change at
  position ``p`` (a layer removed, a fold) keeps ``h_0..h_p`` and every later forward RESUMES from ``h_p``
  (generalising the prefix cache of the leave-one-out searches).

Sweeps:

* :meth:`Trajectory.forward`: forward from the last valid boundary to the end.
* :meth:`Trajectory.loss`: summed next-token NLL of the view (the LM head runs on ``h_n``).
* :meth:`Trajectory.backward`: the reverse sweep. The head's backward gives ``g_n = ∂L/∂h_n``; then for
  ``p = n-1 … 0`` layer ``p`` is onloaded, its forward recomputed from the stored ``h_p`` with grad, and
  ``g_n`` back-propagated to ``∂L/∂h_p``; a caller's reducer sees ``(h_p, h_{p+1}, ∂L/∂h_{p+1})`` per micro-batch
  (GradMAP's hidden-state metrics) and a caller's layer scope can hook the layer's weight gradients (the weight
  metrics). No step needs more than one layer's weights, one layer's activations and the boundaries.
  With ``stride`` > 1 only every ``stride``-th boundary is stored and each segment's boundaries are recomputed before
  its backward (checkpointing: one more forward, ``stride`` times less boundary memory).
* :meth:`Trajectory.candidate_losses`: many resumed forwards at once (leave-one-out searches, stage-2
  cross-validation): each :class:`Candidate` changes the view at one position; all candidates advance through each
  onloaded layer together, so a layer is onloaded once per group of candidates that fit the state budget.

Data parallel: a trajectory holds only this rank's micro-batches (:class:`~gradmap.engine.distributed.DataParallel`);
:meth:`Trajectory.loss` and :meth:`Trajectory.candidate_losses` return all-reduced sums, the backward's reducers
accumulate per rank and the caller all-reduces (:meth:`Engine.all_reduce_`).

Cost: every layer call adds ``params × tokens`` to :attr:`Engine.work` (the LM head its own params), a backward twice
its forward; :meth:`Engine.passes` turns that into forward-equivalent passes of the current model over the
calibration set, the unit the method comparison reports.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from ..adapters import Adapter, get_adapter
from .context import LayerInputs, capture_layer_inputs
from .distributed import DataParallel
from .loss import IGNORE, head_nll, next_token_targets
from .store import DeviceBudget, StateStore
from .weights import OUTER, ModelWeights


@dataclass
class View:
    """The model the engine runs: ``kept`` original layer indices in order, plus per-layer changes.

    Attributes:
        kept: original indices of the decoder layers that run, in order.
        overrides: original index → {parameter name relative to the layer: tensor} used instead of the layer's own
            (source dtype, any device; converted on use).
        patches: original index → {dotted submodule path relative to the layer: replacement module}.
    """

    kept: list[int]
    overrides: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)
    patches: dict[int, dict[str, nn.Module]] = field(default_factory=dict)

    def copy(self) -> "View":
        """A snapshot (the tensors and modules are shared, the containers are not)."""
        return View(list(self.kept), {k: dict(v) for k, v in self.overrides.items()},
                    {k: dict(v) for k, v in self.patches.items()})


@dataclass
class Candidate:
    """One resumed forward: the trajectory's view changed at ``position`` (a position of the trajectory's view).

    Attributes:
        position: the first position that differs.
        skip: the layer at ``position`` does not run (leave-one-out).
        overrides, patches: parameter overrides / submodule patches of the layer at ``position`` (added to the view's).
            ``overrides`` may also be a zero-argument callable returning them: it is called when the forward reaches
            ``position`` and its result dropped after the layer ran (so candidates do not all hold their tensors at
            once); an exception it raises propagates out of :meth:`Trajectory.candidate_losses`.
        batches: global micro-batch indices the loss is computed on (``None``: all).
        rows: the windows (rows) of each of those micro-batches that run (``None``: all of them), e.g.
            ``slice(0, 4)``: the first four windows of each; their layer inputs are captured for just those rows, so
            the result is that of a micro-batch holding only them.
    """

    position: int
    skip: bool = False
    overrides: dict[str, torch.Tensor] | Callable[[], dict[str, torch.Tensor]] | None = None
    patches: dict[str, nn.Module] | None = None
    batches: frozenset[int] | None = None
    rows: slice | None = None


@dataclass
class Windows:
    """Token windows to run, cut into micro-batches.

    Attributes:
        input_ids, attention_mask: LongTensor ``[n, seqlen]``.
        targets: LongTensor ``[n, seqlen]``, next-token targets (``IGNORE`` where nothing is predicted).
        micro_batch: windows per micro-batch (at most).
        groups: the windows form ``groups`` contiguous groups (sizes differ by at most one, the first ``n % groups``
            one larger, as :meth:`gradmap.data.Calibration.folds`); no micro-batch straddles two groups, so stage 2's
            k-fold cross-validation can select whole micro-batches.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    targets: torch.Tensor
    micro_batch: int
    groups: int = 1

    def __post_init__(self):
        if self.micro_batch < 1:
            raise ValueError(f"micro_batch: must be >= 1, got {self.micro_batch}")
        if not 1 <= self.groups <= self.input_ids.shape[0]:
            raise ValueError(f"folds: need 1 <= folds <= windows={self.input_ids.shape[0]}, got {self.groups}")

    @classmethod
    def from_calibration(cls, calibration, micro_batch: int, groups: int = 1) -> "Windows":
        """The calibration windows with next-token targets on every real pair of positions."""
        return cls(calibration.input_ids, calibration.attention_mask,
                   next_token_targets(calibration.input_ids, calibration.attention_mask), micro_batch, groups)

    def group_bounds(self) -> list[tuple[int, int]]:
        """``(first window, end)`` of every group."""
        n = self.input_ids.shape[0]
        size, extra = divmod(n, self.groups)
        bounds, start = [], 0
        for g in range(self.groups):
            stop = start + size + (1 if g < extra else 0)
            bounds.append((start, stop))
            start = stop
        return bounds

    def batches(self) -> list[tuple[int, slice]]:
        """``(global micro-batch index, row slice)`` for every micro-batch, in order, groups respected."""
        out = []
        for start, stop in self.group_bounds():
            for s in range(start, stop, self.micro_batch):
                out.append((len(out), slice(s, min(s + self.micro_batch, stop))))
        return out

    def group_batches(self) -> list[frozenset[int]]:
        """The global micro-batch indices of each group."""
        bounds = self.group_bounds()
        out: list[set] = [set() for _ in bounds]
        for k, sl in self.batches():
            out[next(g for g, (a, b) in enumerate(bounds) if a <= sl.start < b)].add(k)
        return [frozenset(x) for x in out]

    @property
    def num_targets(self) -> int:
        """Predicted tokens in all windows (all ranks)."""
        return int((self.targets != IGNORE).sum())

    def targets_in(self, batches: frozenset[int]) -> int:
        """Predicted tokens in the given micro-batches."""
        return sum(int((self.targets[sl] != IGNORE).sum()) for k, sl in self.batches() if k in batches)


def _params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@contextlib.contextmanager
def _patched(layer: nn.Module, patches: dict[str, nn.Module]) -> Iterator[None]:
    """Replace submodules of ``layer`` (dotted paths) for the duration; restore the originals after."""
    saved = []
    try:
        for path, module in patches.items():
            parent_path, _, name = path.rpartition(".")
            parent = layer.get_submodule(parent_path) if parent_path else layer
            saved.append((parent, name, getattr(parent, name)))
            setattr(parent, name, module)
        yield
    finally:
        for parent, name, module in reversed(saved):
            setattr(parent, name, module)


class Engine:
    """Runs one causal LM layer by layer over token windows (module docstring).

    Args:
        weights: the model's weights and their placement (:class:`~gradmap.engine.weights.ModelWeights`).
        parallel: this process's place in the process group (default: a single process).
        state_budget: bytes of boundary hidden states allowed on a CUDA device before they spill to pinned host
            memory (``None``: unlimited). On CPU every state is in host memory.
        stride: store every ``stride``-th boundary only (checkpointing; 1 stores all).
        progress: show progress bars (rank 0 only).
        keep_graph: when every unit is resident, let the backward keep one micro-batch's autograd graph through the
            layers it runs forward (:meth:`Trajectory.backward`'s fast path: no recomputation after a change);
            ``False`` always recomputes layer by layer (least memory).

    Attributes:
        view: the live view (starts dense: every layer, nothing changed).
        work: compute spent so far, in parameter-tokens (module docstring).
    """

    def __init__(self, weights: ModelWeights, *, parallel: DataParallel | None = None,
                 state_budget: int | None = None, stride: int = 1, progress: bool = False, keep_graph: bool = True):
        if stride < 1:
            raise ValueError(f"stride: must be >= 1, got {stride}")
        self.weights = weights
        self.model: nn.Module = weights.model
        self.adapter: Adapter = weights.adapter
        self.config = self.model.config
        self.device, self.dtype = weights.device, weights.dtype
        self.n_layers = weights.n_layers
        self.parallel = parallel or DataParallel()
        self.state_budget = DeviceBudget(state_budget)
        self.stride, self.keep_graph = stride, keep_graph
        self.progress = progress and self.parallel.is_main
        self.view = View(list(range(self.n_layers)))
        self.work = 0.0
        self._trajectories: list[Trajectory] = []
        self.layer_params = [_params(layer) for layer in self.adapter.layers(self.model)]
        head = self.model.get_output_embeddings()
        self.head_params = int(head.weight.numel()) if head is not None else 0
        # No parameter takes part in autograd unless a scope asks for it (weight metrics); restored by close().
        self._grad_flags = [(p, p.requires_grad) for p in self.model.parameters()]
        for p, _ in self._grad_flags:
            p.requires_grad_(False)
        self._was_training = self.model.training
        self.model.eval()

    def close(self) -> None:
        """Forget every trajectory and restore the model's ``requires_grad`` flags and training mode."""
        for traj in list(self._trajectories):
            self.release(traj)
        for p, flag in self._grad_flags:
            p.requires_grad_(flag)
        self.model.train(self._was_training)

    @classmethod
    def for_module(cls, model: nn.Module, **kwargs) -> "Engine":
        """An engine over a resident ``*ForCausalLM`` (computed on its own device in its own dtype); ``kwargs`` as
        the constructor's. Call :meth:`close` after (or use it as a context manager) to restore the model's flags."""
        param = next(model.parameters())
        return cls(ModelWeights(model, get_adapter(model), device=param.device, dtype=param.dtype), **kwargs)

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ the live view

    def position_of(self, orig: int) -> int:
        """Current position of original layer ``orig``.

        Raises:
            ValueError: ``orig`` was removed.
        """
        return self.view.kept.index(orig)

    def _changed_at(self, position: int) -> None:
        for traj in self._trajectories:
            if traj.view is self.view:
                traj.invalidate_from(position)

    def remove(self, orig: int) -> None:
        """Remove original layer ``orig`` from the live view (boundaries up to its old position stay valid)."""
        position = self.position_of(orig)
        self.view.kept.pop(position)
        self.view.overrides.pop(orig, None)
        self.view.patches.pop(orig, None)
        for traj in self._trajectories:
            if traj.view is self.view:
                traj.removed_at(position)

    def reset_view(self, view: View) -> None:
        """Make ``view`` the live view (trajectories of the previous live view keep theirs, frozen)."""
        self.view = view

    def set_overrides(self, orig: int, tensors: dict[str, torch.Tensor]) -> None:
        """Use ``tensors`` (names relative to the layer) instead of layer ``orig``'s own parameters from now on."""
        self.view.overrides.setdefault(orig, {}).update(tensors)
        self._changed_at(self.position_of(orig))

    def set_patches(self, orig: int, patches: dict[str, nn.Module]) -> None:
        """Replace submodules of layer ``orig`` (dotted paths relative to the layer) from now on."""
        self.view.patches.setdefault(orig, {}).update(patches)
        self._changed_at(self.position_of(orig))

    # ------------------------------------------------------------------ running one layer

    @contextlib.contextmanager
    def layer(self, orig: int, view: View, *, overrides: dict | None = None, patches: dict | None = None,
              scope: Callable | None = None) -> Iterator[Callable]:
        """Onload layer ``orig`` and yield ``run(hidden, inputs) -> hidden_out`` that calls it with the view's (and
        the extra) overrides and patches. ``scope(layer_module)``, if given, is a context manager entered while the
        layer is onloaded (e.g. weight-gradient hooks)."""
        ov = {**view.overrides.get(orig, {}), **(overrides or {})}
        pa = {**view.patches.get(orig, {}), **(patches or {})}
        with self.weights.use(orig) as module, _patched(module, pa), (scope(module) if scope else
                                                                        contextlib.nullcontext()):
            params = self.layer_params[orig]
            ov_dev = {k: v.to(device=self.device, dtype=self.dtype if v.is_floating_point() else v.dtype)
                      for k, v in ov.items()}

            def run(hidden: torch.Tensor, inputs: LayerInputs) -> torch.Tensor:
                self.work += params * hidden.shape[0] * hidden.shape[1]
                args, kwargs = inputs.args[orig], inputs.kwargs[orig]
                if ov_dev:
                    out = torch.func.functional_call(module, ov_dev, (hidden, *args), kwargs, strict=False)
                else:
                    out = module(hidden, *args, **kwargs)
                return self.adapter.layer_output(out)

            yield run

    def head_loss(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Summed NLL (fp32 scalar, nats) of ``hidden`` leaving the last layer (:func:`gradmap.engine.loss.head_nll`);
        the LM head must be onloaded (``with engine.weights.use(OUTER)``)."""
        self.work += self.head_params * int((targets != IGNORE).sum())
        return head_nll(self.model, self.adapter, hidden, targets)

    # ------------------------------------------------------------------ data

    def trajectory(self, windows: Windows, *, view: View | None = None, keep: bool = True) -> "Trajectory":
        """A :class:`Trajectory` of ``windows`` through ``view`` (default: the live view, kept up to date as it
        changes; pass ``engine.view.copy()`` for a frozen snapshot such as the dense model). ``keep=False`` stores
        only the current boundary (perplexity: a plain forward)."""
        traj = Trajectory(self, windows, view or self.view, keep=keep)
        self._trajectories.append(traj)
        return traj

    def release(self, traj: "Trajectory") -> None:
        """Forget ``traj``'s states (its memory is freed)."""
        traj.store.clear()
        if traj in self._trajectories:
            self._trajectories.remove(traj)

    def all_reduce_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over the ranks in place (scores, Gram matrices)."""
        return self.parallel.all_reduce_(tensor)



class Trajectory:
    """Token windows run through a view: captured layer inputs and boundary hidden states (module docstring)."""

    def __init__(self, engine: Engine, windows: Windows, view: View, keep: bool = True):
        self.engine, self.windows, self.view, self.keep = engine, windows, view, keep
        par = engine.parallel
        self.batches = [(k, sl) for k, sl in windows.batches() if par.owns(k)]
        self.num_targets = windows.num_targets  # all ranks
        self.store = StateStore(engine.device, engine.state_budget)  # the engine's shared DeviceBudget
        self._inputs: dict[int, LayerInputs] = {}
        self._row_inputs: dict[tuple, LayerInputs] = {}  # (k, rows) -> inputs of a row subset (Candidate.rows)
        self.valid = -1  # the last stored boundary that holds the view's states (-1: nothing computed yet)
        self._current: dict | None = None  # the states at position _current_at of the last forward (stored or not)
        self._current_at: int | None = None
        self.on_complete: Callable | None = None  # called once, the first time every boundary is valid

    # ------------------------------------------------------------------ bookkeeping

    @property
    def n(self) -> int:
        """Number of positions (decoder layers) of the view."""
        return len(self.view.kept)

    def _stored(self, position: int) -> bool:
        """Whether boundary ``position`` is kept (all with stride 1; else multiples of the stride, and the last)."""
        if not self.keep:
            return False
        return position % self.engine.stride == 0 or position == self.n

    def inputs(self, k: int) -> LayerInputs:
        """Captured layer inputs of micro-batch ``k`` (captured on first use; the embeddings are boundary 0)."""
        if k not in self._inputs:
            sl = dict(self.batches)[k]
            w, dev = self.windows, self.engine.device
            with self.engine.weights.use(OUTER) as model:
                self._inputs[k] = capture_layer_inputs(model, self.engine.adapter, w.input_ids[sl].to(dev),
                                                       w.attention_mask[sl].to(dev))
        return self._inputs[k]

    def row_inputs(self, k: int, rows: slice | None) -> LayerInputs:
        """Captured layer inputs of the windows ``rows`` of micro-batch ``k`` (all of them for ``None``), as if
        those windows formed a micro-batch of their own (captured on first use; attention masks and position
        embeddings are rebuilt for the rows, not cut out of the full micro-batch's)."""
        if rows is None:
            return self.inputs(k)
        key = (k, rows.start, rows.stop, rows.step)
        if key not in self._row_inputs:
            sl = dict(self.batches)[k]
            w, dev = self.windows, self.engine.device
            with self.engine.weights.use(OUTER) as model:
                self._row_inputs[key] = capture_layer_inputs(model, self.engine.adapter,
                                                             w.input_ids[sl][rows].to(dev),
                                                             w.attention_mask[sl][rows].to(dev))
        return self._row_inputs[key]

    def passes(self, work: float) -> float:
        """``work`` (parameter-tokens of this rank) in forward-equivalent passes of the view as it is NOW over this
        rank's windows (a full forward: every layer on every position, the LM head on every target)."""
        engine = self.engine
        positions = sum(self.windows.input_ids[sl].numel() for _, sl in self.batches)
        targets = sum(int((self.windows.targets[sl] != IGNORE).sum()) for _, sl in self.batches)
        full = sum(engine.layer_params[o] for o in self.view.kept) * positions + engine.head_params * targets
        return work / full if full else 0.0

    def targets(self, k: int) -> torch.Tensor:
        """Next-token targets ``[batch, seqlen]`` of micro-batch ``k`` on the device."""
        return self.windows.targets[dict(self.batches)[k]].to(self.engine.device)

    def mask(self, k: int) -> torch.Tensor:
        """Attention mask ``[batch, seqlen]`` (1 = real token) of micro-batch ``k`` on the device."""
        return self.windows.attention_mask[dict(self.batches)[k]].to(self.engine.device)

    def boundary(self, position: int, k: int) -> torch.Tensor:
        """Stored boundary ``h_position`` of micro-batch ``k`` (must be stored and valid)."""
        if position == 0 and (0, k) not in self.store:
            return self.inputs(k).embeddings
        return self.store.get((position, k))

    def state(self, position: int, k: int) -> torch.Tensor:
        """Hidden state entering ``position`` (``h_n`` for ``position == n``) of micro-batch ``k``, valid for the view:
        the stored boundary, or recomputed from the stored one at the start of its segment (checkpointed
        trajectories; one segment of all micro-batches is cached at a time)."""
        if self.valid < position:
            self.forward(upto=position)
        if position == 0 or (position, k) in self.store:
            return self.boundary(position, k)
        start = self._resume_point(position)
        cache = getattr(self, "_segment", None)
        if cache is None or cache[0] != start or position not in cache[1]:
            states = {start: {j: self.boundary(start, j) for j, _ in self.batches}}
            end = min(start + self.engine.stride, self.n)
            for p in range(start, end):
                with self.engine.layer(self.view.kept[p], self.view) as run, torch.no_grad():
                    states[p + 1] = {j: run(states[p][j], self.inputs(j)) for j, _ in self.batches}
            self._segment = cache = (start, states)
        return cache[1][position][k]

    def invalidate_from(self, position: int) -> None:
        """The view changed at ``position``: boundaries after it are stale (``h_0..h_position`` stay)."""
        for key in self.store.keys():
            if key[0] > position:
                self.store.pop(key)
        if self.valid >= 0:
            self.valid = self._resume_point(position)
        self._current, self._current_at = None, None
        self._segment = None

    def removed_at(self, position: int) -> None:
        """The layer at ``position`` was removed from the (live) view: boundaries up to it stay, later ones go."""
        self.invalidate_from(position)

    def snapshot(self) -> "Trajectory":
        """A frozen copy of this trajectory: the view copied, the captured inputs and stored boundaries SHARED (no
        tensor is copied). Taken before any layer is removed, it is the dense trajectory stage 2 compares with."""
        self.forward()
        snap = self.engine.trajectory(self.windows, view=self.view.copy(), keep=self.keep)
        snap._inputs = dict(self._inputs)
        snap.store.share(self.store)
        snap.valid = self.valid
        snap._current, snap._current_at = self._current, self._current_at
        return snap

    # ------------------------------------------------------------------ forward

    def forward(self, upto: int | None = None, observer: Callable | None = None, desc: str = "forward") -> None:
        """Make boundaries valid up to position ``upto`` (default: the end), resuming from the last valid one.

        ``observer(position, orig, k, h_in, h_out)``, if given, is called for every layer call made here.
        """
        upto = self.n if upto is None else upto
        if self.valid < 0:
            for k, _ in self.batches:
                self.inputs(k)
            self.valid = 0
        if self._current_at == upto or self.valid >= upto:
            return
        if self._current is not None and self.valid < self._current_at < upto:
            start, current = self._current_at, dict(self._current)
        else:
            start = self.valid
            current = {k: self.boundary(start, k) for k, _ in self.batches}
        for position in tqdm(range(start, upto), desc=desc, disable=not self.engine.progress, leave=False):
            orig = self.view.kept[position]
            with self.engine.layer(orig, self.view) as run, torch.no_grad():
                for k, _ in self.batches:
                    h_out = run(current[k], self.inputs(k))
                    if observer is not None:
                        observer(position, orig, k, current[k], h_out)
                    current[k] = h_out
                    if self._stored(position + 1):
                        self.store.put((position + 1, k), h_out)
            self.valid = position + 1 if self._stored(position + 1) else self.valid
        self._current = current  # the states at `upto` (also when not stored)
        self._current_at = upto
        self._completed()

    def _completed(self) -> None:
        if self.on_complete is not None and self.keep and self.valid == self.n:
            callback, self.on_complete = self.on_complete, None
            callback(self)

    def final_states(self) -> dict[int, torch.Tensor]:
        """``h_n`` per micro-batch (after a forward to the end)."""
        self.forward()
        if self._stored(self.n) and self.valid == self.n:
            return {k: self.store.get((self.n, k)) for k, _ in self.batches}
        return dict(self._current)

    def loss(self) -> tuple[float, int]:
        """``(summed NLL in nats, predicted tokens)`` of the view over ALL ranks' windows (all-reduced)."""
        states = self.final_states()
        total = 0.0
        count = 0
        with self.engine.weights.use(OUTER), torch.no_grad():
            for k, _ in self.batches:
                t = self.targets(k)
                total += float(self.engine.head_loss(states[k], t))
                count += int((t != IGNORE).sum())
        total, count = self.engine.parallel.sum_floats(total, count)
        return total, int(count)

    def walk(self, observer: Callable) -> None:
        """Call ``observer(position, orig, k, h_in, h_out)`` for every position of the view, from stored boundaries
        where they exist (recomputing the others)."""
        self.forward()
        if self.keep and self.engine.stride == 1:
            for position, orig in enumerate(self.view.kept):
                for k, _ in self.batches:
                    observer(position, orig, k, self.boundary(position, k), self.boundary(position + 1, k))
            return
        current = {k: self.boundary(0, k) for k, _ in self.batches}
        for position, orig in enumerate(self.view.kept):
            with self.engine.layer(orig, self.view) as run, torch.no_grad():
                for k, _ in self.batches:
                    h_out = run(current[k], self.inputs(k))
                    observer(position, orig, k, current[k], h_out)
                    current[k] = h_out

    # ------------------------------------------------------------------ backward

    def backward(self, reducer: Callable | None = None, *, scope: Callable | None = None,
                 first_layer: bool = False, desc: str = "backward") -> float:
        """Reverse sweep of the loss ``L = Σ NLL / (predicted tokens of all ranks)`` (module docstring).

        Args:
            reducer: ``reducer(position, orig, k, h_in, h_out, g_out)`` per layer and micro-batch, with ``g_out =
                ∂L/∂h_out`` (all detached, on the device).
            scope: ``scope(position, orig, layer_module)`` → context manager entered while the layer's backward
                runs (weight-gradient hooks of the weight metrics).
            first_layer: also back-propagate through position 0 (needed only for weight gradients of the first
                layer; the hidden-state metrics read ``h_1 − h_0`` and ``∂L/∂h_1``, known without it).

        Returns:
            The summed NLL (nats) over all ranks' windows (the forward's loss, for free).
        """
        if self._keeps_graph():
            return self._backward_resident(reducer, scope=scope, first_layer=first_layer, desc=desc)
        engine = self.engine
        states = self.final_states()
        norm = float(self.num_targets)
        grads: dict[int, torch.Tensor] = {}
        total = 0.0
        with engine.weights.use(OUTER):
            for k, _ in self.batches:
                leaf = states[k].detach().requires_grad_(True)
                with torch.enable_grad():
                    nll = engine.head_loss(leaf, self.targets(k))
                    (nll / norm).backward()
                engine.work += 2 * engine.head_params * int((self.targets(k) != IGNORE).sum())
                total += float(nll.detach())
                grads[k] = leaf.grad
        segment: dict = {}
        for position in tqdm(range(self.n - 1, -1, -1), desc=desc, disable=not engine.progress, leave=False):
            orig = self.view.kept[position]
            if not self._stored(position) and position not in segment:
                segment = self._recompute_segment(position)
            runs_backward = position > 0 or first_layer
            layer_scope = (lambda m, p=position, o=orig: scope(p, o, m)) if (scope and runs_backward) else None
            with engine.layer(orig, self.view, scope=layer_scope) as run:
                for k, _ in self.batches:
                    h_in = segment[position][k] if position in segment else self.boundary(position, k)
                    if runs_backward:
                        leaf = h_in.detach().requires_grad_(True)
                        with torch.enable_grad():
                            out = run(leaf, self.inputs(k))
                        if reducer is not None:
                            reducer(position, orig, k, h_in, out.detach(), grads[k])
                        out.backward(grads[k])
                        engine.work += 2 * engine.layer_params[orig] * leaf.shape[0] * leaf.shape[1]
                        grads[k] = leaf.grad
                    elif reducer is not None:
                        h_out = (segment[position + 1][k] if position + 1 in segment
                                 else self.boundary(position + 1, k))
                        reducer(position, orig, k, h_in, h_out, grads[k])
        total = self.engine.parallel.sum_floats(total)[0]
        return total

    def _keeps_graph(self) -> bool:
        """Whether the backward may keep one micro-batch's autograd graph through every layer it runs forward: the
        resident fast path (every unit on the device, every boundary stored, allowed by the engine)."""
        engine = self.engine
        return (engine.keep_graph and self.keep and engine.stride == 1
                and all(engine.weights.is_live(u) for u in engine.weights.placement))

    def _backward_resident(self, reducer, *, scope, first_layer: bool, desc: str) -> float:
        """:meth:`backward` with the loops swapped (micro-batch outer) for resident models: each micro-batch runs the
        layers from the last valid boundary to the end WITH its autograd graph (storing the new boundaries), the LM
        head, one backward through them (tensor hooks hand each layer's output gradient to ``reducer``), then the
        layers before that boundary are recomputed and back-propagated one at a time. Same results as the layer-outer
        sweep; the layers after the change run forward once instead of twice. Memory: one micro-batch's graph."""
        engine, view = self.engine, self.view
        if self.valid < 0:
            for k, _ in self.batches:
                self.inputs(k)
            self.valid = 0
        start = self.valid
        norm = float(self.num_targets)
        total = 0.0
        with contextlib.ExitStack() as stack:
            runs = []
            for position, orig in enumerate(view.kept):
                runs_backward = position > 0 or first_layer
                layer_scope = (lambda m, p=position, o=orig: scope(p, o, m)) if (scope and runs_backward) else None
                runs.append(stack.enter_context(engine.layer(orig, view, scope=layer_scope)))
            stack.enter_context(engine.weights.use(OUTER))
            for k, _ in tqdm(self.batches, desc=desc, disable=not engine.progress, leave=False):
                inputs, targets = self.inputs(k), self.targets(k)
                leaf = self.boundary(start, k).detach().requires_grad_(True)
                with torch.enable_grad():
                    x = leaf
                    for position in range(start, self.n):
                        orig = view.kept[position]
                        y = runs[position](x, inputs)
                        engine.work += 2 * engine.layer_params[orig] * x.shape[0] * x.shape[1]  # its backward
                        self.store.put((position + 1, k), y)
                        if position == 0 and not first_layer:  # no gradient through layer 0 is needed
                            y = y.detach().requires_grad_(True)
                        if reducer is not None:
                            y.register_hook(lambda g, p=position, o=orig, h=x.detach(), out=y.detach():
                                            reducer(p, o, k, h, out, g.detach()))
                        x = y
                    nll = engine.head_loss(x, targets)
                    (nll / norm).backward()
                engine.work += 2 * engine.head_params * int((targets != IGNORE).sum())
                total += float(nll.detach())
                g = leaf.grad
                for position in range(start - 1, -1, -1):  # the unchanged layers: recompute, then backward
                    orig = view.kept[position]
                    h_in = self.boundary(position, k)
                    if position == 0 and not first_layer:
                        if reducer is not None:
                            reducer(position, orig, k, h_in, self.boundary(1, k), g)
                        break
                    inner = h_in.detach().requires_grad_(True)
                    with torch.enable_grad():
                        out = runs[position](inner, inputs)
                    if reducer is not None:
                        reducer(position, orig, k, h_in, out.detach(), g)
                    out.backward(g)
                    engine.work += 2 * engine.layer_params[orig] * inner.shape[0] * inner.shape[1]
                    g = inner.grad
        self.valid = self.n
        self._current, self._current_at = None, None
        self._completed()
        return self.engine.parallel.sum_floats(total)[0]

    def _recompute_segment(self, position: int) -> dict[int, dict[int, torch.Tensor]]:
        """Boundaries of the checkpoint segment holding ``position`` (from the stored boundary at its start)."""
        start = position - position % self.engine.stride
        states = {start: {k: self.boundary(start, k) for k, _ in self.batches}}
        for p in range(start, position):
            with self.engine.layer(self.view.kept[p], self.view) as run, torch.no_grad():
                states[p + 1] = {k: run(states[p][k], self.inputs(k)) for k, _ in self.batches}
        return states

    # ------------------------------------------------------------------ many resumed forwards

    def candidate_losses(self, candidates: list[Candidate], *, state_budget: int | None = None,
                         desc: str = "candidates") -> list[tuple[float, int]]:
        """``(summed NLL, predicted tokens)`` over all ranks of each candidate's resumed forward (module docstring).

        Each candidate starts from the stored boundary at (or before) its position, so the view's layers before it
        never run again. ``state_budget`` (bytes, default: unlimited) bounds the hidden states of candidates in flight:
        candidates are processed in groups that fit, each group onloading the layers it needs once.
        """
        for c in candidates:
            if not 0 <= c.position < self.n:
                raise ValueError(f"candidate position {c.position} outside [0, {self.n - 1}]")
        self.forward(upto=self.n if self.keep else None)
        results: list[tuple[float, int]] = [(0.0, 0)] * len(candidates)
        width = self.engine.config.hidden_size * self.engine.dtype.itemsize
        order = sorted(range(len(candidates)), key=lambda i: candidates[i].position)
        groups, group, used = [], [], 0
        for i in order:
            c = candidates[i]
            need = sum(self.windows.input_ids[sl][c.rows if c.rows is not None else slice(None)].numel() * width
                       for k, sl in self.batches if c.batches is None or k in c.batches)
            if group and state_budget is not None and used + need > state_budget:
                groups.append(group)
                group, used = [], 0
            group.append(i)
            used += need
        if group:
            groups.append(group)
        local = []
        for g in groups:
            local.extend(self._run_group([(i, candidates[i]) for i in g], desc))
        flat = torch.tensor([v for _, pair in sorted(local) for v in pair], dtype=torch.float64)
        self.engine.parallel.all_reduce_(flat)
        for j, i in enumerate(sorted(i for i, _ in local)):
            results[i] = (float(flat[2 * j]), int(flat[2 * j + 1]))
        return results

    def _run_group(self, group: list[tuple[int, Candidate]], desc: str) -> list[tuple[int, tuple[float, int]]]:
        engine = self.engine
        start = min(self._resume_point(c.position) for _, c in group)
        streams: dict[int, dict[int, torch.Tensor]] = {}
        mine = {i: [k for k, _ in self.batches if c.batches is None or k in c.batches] for i, c in group}
        for position in tqdm(range(start, self.n), desc=desc, disable=not engine.progress, leave=False):
            orig = self.view.kept[position]
            for i, c in group:  # a candidate joins at the stored boundary at or before its position
                if i not in streams and self._resume_point(c.position) == position:
                    streams[i] = {k: self._rows(self.boundary(position, k), c.rows) for k in mine[i]}
            active = [(i, c) for i, c in group if i in streams]
            plain = [(i, c) for i, c in active if c.position != position]
            changed = [(i, c) for i, c in active if c.position == position and not c.skip]
            if plain:
                with engine.layer(orig, self.view) as run, torch.no_grad():
                    for i, c in plain:
                        for k in mine[i]:
                            streams[i][k] = run(streams[i][k], self.row_inputs(k, c.rows))
            for i, c in changed:
                overrides = c.overrides() if callable(c.overrides) else c.overrides
                with engine.layer(orig, self.view, overrides=overrides, patches=c.patches) as run, torch.no_grad():
                    for k in mine[i]:
                        streams[i][k] = run(streams[i][k], self.row_inputs(k, c.rows))
                del overrides
        out = []
        with engine.weights.use(OUTER), torch.no_grad():
            for i, c in group:
                total, count = 0.0, 0
                for k in mine[i]:
                    t = self._rows(self.targets(k), c.rows)
                    total += float(engine.head_loss(streams[i][k], t))
                    count += int((t != IGNORE).sum())
                out.append((i, (total, count)))
        return out

    @staticmethod
    def _rows(tensor: torch.Tensor, rows: slice | None) -> torch.Tensor:
        """``tensor[rows]`` along the window dimension (``tensor`` itself for ``None``)."""
        return tensor if rows is None else tensor[rows]

    def _resume_point(self, position: int) -> int:
        """The last stored valid boundary at or before ``position`` (0, the embeddings, at worst)."""
        p = min(position, max(self.valid, 0))
        while p > 0 and not self._stored(p):
            p -= 1
        return p
