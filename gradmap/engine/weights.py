"""Where a model's weights live while the engine runs, and onloading a decoder layer only while it is needed.

Units. The engine moves weights one *unit* at a time: each decoder layer (by ORIGINAL index) is a unit, and
everything else (embeddings, rotary tables, final norm, LM head: :data:`OUTER`) is one more.

Sources. :class:`ModuleSource` serves a model that is already materialised (the caller's ``nn.Module``): nothing
moves, every unit is resident. :class:`CheckpointSource` serves a Hugging Face safetensors checkpoint (one file or a
sharded ``model.safetensors.index.json``) read through ``safetensors.safe_open``: tensors come from memory-mapped
files, so reading a unit allocates nothing until it is used, and a unit that is not resident costs no process
memory once released.

Placement (:class:`ModelWeights`): each unit is

* ``"device"``: materialised once on the compute device and kept (the resident case, today's speed);
* ``"host"``: kept in host memory (pinned) and copied to the compute device while in use (CUDA only);
* ``"stream"``: read from the checkpoint while in use and released after (the model skeleton holds meta tensors).

Materialising and releasing use ``accelerate.utils.set_module_tensor_to_device`` on the model skeleton built by
``transformers`` under ``accelerate.init_empty_weights`` (buffers stay real). Tied input/output embeddings are one
tensor and are re-tied after materialising. This is the same split of concerns as llm-compressor's sequential
onloading and accelerate's offload (weights on CPU or disk, brought to the GPU module by module), with the schedule
decided by :mod:`gradmap.engine.executor`.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

import torch
from accelerate import init_empty_weights
from accelerate.utils import set_module_tensor_to_device
from safetensors import safe_open
from torch import nn
from transformers import AutoModelForCausalLM

from ..adapters import Adapter

OUTER = "outer"
PLACEMENTS = ("device", "host", "stream")


def unit_of(name: str, adapter: Adapter) -> str | int:
    """The unit a state-dict name belongs to: the original decoder-layer index, or :data:`OUTER`."""
    prefix = adapter.layers_path + "."
    if name.startswith(prefix):
        return int(name[len(prefix):].split(".", 1)[0])
    return OUTER


class CheckpointSource:
    """Tensors of a safetensors checkpoint directory, read lazily through memory maps.

    Args:
        path: directory holding ``model.safetensors`` or ``model.safetensors.index.json`` and its shards.

    Raises:
        FileNotFoundError: no safetensors weights in ``path``.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            self.files = {k: self.path / f for k, f in weight_map.items()}
        elif (self.path / "model.safetensors").is_file():
            single = self.path / "model.safetensors"
            with safe_open(str(single), framework="pt") as fh:
                self.files = {k: single for k in fh.keys()}
        else:
            raise FileNotFoundError(f"model: {str(self.path)!r} holds no safetensors weights (model.safetensors or "
                                    "model.safetensors.index.json); layer streaming reads safetensors only")
        self._handles: dict[Path, object] = {}

    def keys(self) -> list[str]:
        """Every tensor name in the checkpoint."""
        return list(self.files)

    def _handle(self, file: Path):
        if file not in self._handles:
            self._handles[file] = safe_open(str(file), framework="pt", device="cpu")
        return self._handles[file]

    def read(self, key: str) -> torch.Tensor:
        """Tensor ``key`` as stored (its checkpoint dtype, CPU, memory-mapped: no copy is made until it is changed
        or converted)."""
        return self._handle(self.files[key]).get_tensor(key)

    def dtype(self, key: str) -> torch.dtype:
        """Stored dtype of tensor ``key`` (read from the file header, no data)."""
        sl = self._handle(self.files[key]).get_slice(key)
        return _SAFETENSORS_DTYPES[sl.get_dtype()]

    def nbytes(self) -> int:
        """Total bytes of the checkpoint's shard files."""
        return sum(f.stat().st_size for f in set(self.files.values()))

    def close(self) -> None:
        """Drop the open file handles (memory maps)."""
        self._handles.clear()


_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                       "BOOL": torch.bool}


def build_skeleton(config) -> nn.Module:
    """The ``*ForCausalLM`` of ``config`` with every parameter on the meta device (buffers real, on CPU), tied
    embeddings tied: the frame :class:`ModelWeights` materialises units into. Costs no parameter memory."""
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config)
    if getattr(getattr(config, "get_text_config", lambda: config)(), "tie_word_embeddings", False):
        model.tie_weights()
    return model.eval()


def _tied(model: nn.Module) -> bool:
    inp, out = model.get_input_embeddings(), model.get_output_embeddings()
    return out is not None and inp is not None and out.weight is inp.weight


class ModelWeights:
    """The weights of one causal LM for the engine: where each unit lives and onloading it while in use.

    Args:
        model: the ``*ForCausalLM``: real (resident, ``source=None``) or a skeleton whose parameters are on the meta
            device (``source`` given).
        adapter: its family adapter.
        device: the compute device.
        dtype: the compute dtype of floating-point parameters (materialised units are converted to it).
        source: the checkpoint to read from; ``None`` means every tensor already lives in ``model``.
        placement: unit → ``"device"`` | ``"host"`` | ``"stream"`` (default: everything ``"device"``).

    Raises:
        ValueError: a checkpoint without some of the model's tensors, or a ``"host"`` placement on a CPU device.
    """

    def __init__(self, model: nn.Module, adapter: Adapter, *, device: torch.device, dtype: torch.dtype,
                 source: CheckpointSource | None = None, placement: dict | None = None):
        self.model, self.adapter, self.source = model, adapter, source
        self.device, self.dtype = torch.device(device), dtype
        self.n_layers = len(adapter.layers(model))
        self.tied = _tied(model)
        self.placement = {u: "device" for u in [OUTER, *range(self.n_layers)]}
        self.placement.update(placement or {})
        bad = {u: p for u, p in self.placement.items() if p not in PLACEMENTS}
        if bad:
            raise ValueError(f"placement: {bad} not one of {', '.join(PLACEMENTS)}")
        if self.device.type == "cpu" and "host" in self.placement.values():
            raise ValueError("placement: 'host' needs a CUDA compute device (on CPU, host memory is the device)")
        if source is None and set(self.placement.values()) != {"device"}:
            raise ValueError("placement: a model without a checkpoint source is resident; every unit must be 'device'")
        # parameter names per unit (a tied LM head is the embedding: listed once, under the embedding's name)
        self.names: dict = {u: [] for u in self.placement}
        for name, _ in model.named_parameters():
            self.names[unit_of(name, adapter)].append(name)
        self.names_all = {n for names in self.names.values() for n in names}
        self.key_of: dict[str, str] = {}
        if source is not None:
            self._map_keys()
            self._buffers_to_device()
        self._held: dict = {}  # "host" units: name -> pinned CPU tensor
        self._live: set = set(self.placement) if source is None else set()
        self.bytes_read = 0  # bytes read from the checkpoint / copied host -> device while onloading (a counter)
        if source is not None:
            for unit, where in self.placement.items():
                if where == "device":
                    self._materialize(unit)
                    self._live.add(unit)
                elif where == "host":
                    self._held.update(self._read_unit(unit, torch.device("cpu"), pin=True))

    def _map_keys(self) -> None:
        keys = set(self.source.keys())
        prefix = getattr(self.model, "base_model_prefix", "") or ""
        missing = []
        for names in self.names.values():
            for name in names:
                candidates = [name]
                if prefix and name.startswith(prefix + "."):
                    candidates.append(name[len(prefix) + 1:])
                elif prefix:
                    candidates.append(f"{prefix}.{name}")
                found = next((c for c in candidates if c in keys), None)
                if found is None:
                    missing.append(name)
                else:
                    self.key_of[name] = found
        if missing:
            raise ValueError(f"model: the checkpoint {str(self.source.path)!r} lacks {len(missing)} tensors the model "
                             f"needs (e.g. {missing[:3]}); it cannot be streamed. Load it resident (enough --max-memory) "
                             "or re-save it with save_pretrained")

    def _buffers_to_device(self) -> None:
        """Buffers (rotary tables, embedding scales) are small and real in the skeleton: put them on the device once,
        taking stored values from the checkpoint where it has them."""
        keys = set(self.source.keys())
        for name, buf in list(self.model.named_buffers()):
            value = self.source.read(name) if name in keys else buf
            set_module_tensor_to_device(self.model, name, self.device, value=value.to(buf.dtype))

    def unit_bytes(self, unit) -> int:
        """Bytes of ``unit``'s parameters in the compute dtype."""
        params = dict(self.model.named_parameters())
        return sum(params[n].numel() * (self.dtype.itemsize if params[n].is_floating_point() else
                                        params[n].element_size()) for n in self.names[unit])

    def _read_unit(self, unit, device: torch.device, pin: bool = False) -> dict[str, torch.Tensor]:
        out = {}
        params = dict(self.model.named_parameters())
        for name in self.names[unit]:
            t = self.source.read(self.key_of[name])
            if params[name].is_floating_point() or t.is_floating_point():
                t = t.to(self.dtype)
            if pin and torch.cuda.is_available():
                t = t.pin_memory()
            out[name] = t.to(device, non_blocking=True) if t.device != device else t
            self.bytes_read += t.numel() * t.element_size()
        return out

    def _materialize(self, unit) -> None:
        if self.placement[unit] == "host":
            values = {n: self._held[n] for n in self.names[unit]}
            for t in values.values():
                self.bytes_read += t.numel() * t.element_size()
        else:
            values = self._read_unit(unit, torch.device("cpu"))
        for name, value in values.items():
            set_module_tensor_to_device(self.model, name, self.device, value=value, dtype=self.dtype
                                        if value.is_floating_point() else None, non_blocking=True)
        if unit == OUTER and self.tied:
            self.model.get_output_embeddings().weight = self.model.get_input_embeddings().weight

    def _release(self, unit) -> None:
        for name in self.names[unit]:
            set_module_tensor_to_device(self.model, name, "meta")
        if unit == OUTER and self.tied:
            self.model.get_output_embeddings().weight = self.model.get_input_embeddings().weight

    def is_live(self, unit) -> bool:
        """Whether ``unit``'s weights are materialised on the compute device right now."""
        return unit in self._live

    @contextlib.contextmanager
    def use(self, unit) -> Iterator[nn.Module]:
        """Have ``unit``'s weights on the compute device for the duration of the block.

        Yields the decoder layer (``unit`` an int) or the whole model (:data:`OUTER`). Resident units are used in
        place; others are materialised on entry and released on exit (nested uses of one unit materialise once).
        """
        module = self.model if unit == OUTER else self.adapter.layers(self.model)[unit]
        if unit in self._live:
            yield module
            return
        self._materialize(unit)
        self._live.add(unit)
        try:
            yield module
        finally:
            self._live.discard(unit)
            self._release(unit)

    def read(self, name: str) -> torch.Tensor:
        """Tensor ``name`` (a state-dict name of the model) in its SOURCE dtype: the checkpoint's stored tensor
        (CPU, memory-mapped) or the resident model's own tensor. Used to fold projections and to save."""
        if self.source is None:
            return dict(self.model.state_dict(keep_vars=True))[name].detach()
        return self.source.read(self.key_of.get(name, name))

    def source_dtype(self, name: str) -> torch.dtype:
        """The dtype tensor ``name`` has in its source (checkpoint or resident model)."""
        if self.source is None:
            return dict(self.model.named_parameters())[name].dtype
        return self.source.dtype(self.key_of.get(name, name))
