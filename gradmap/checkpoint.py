"""Writing the pruned checkpoint shard by shard and atomically: a temporary directory beside the target, renamed
into place.

Shard by shard: the checkpoint is a list of named tensors, each read from where it lives only when its shard is
written (:func:`write_checkpoint`): a kept layer's tensor from the dense model (resident) or the dense checkpoint's
safetensors (streamed), renamed to its new position; a folded ``down_proj`` from the engine's overrides; removed
layers not at all. The shards are planned with ``huggingface_hub.split_torch_state_dict_into_shards`` (on meta
stand-ins: no data) and written with ``safetensors`` (``model.safetensors`` or ``model-0000k-of-0000n.safetensors``
plus ``model.safetensors.index.json``), so at most one shard's tensors are in memory: the pruned model is never
assembled. The config is the dense config with ``num_hidden_layers`` and per-layer lists trimmed
(:func:`gradmap.removal.trim_config`); a tied LM head is saved once, as the embedding.

An exception or a kill at any point leaves either the previous state of ``output_dir`` or the complete new one, never
a half-written checkpoint. After a hard kill (SIGKILL, power loss) a hidden ``.<name>.tmp-*`` (or ``.<name>.old-*``)
directory may remain; it is never read, and the next save to the same ``output_dir`` removes it. Only directories
that gradmap created are removed: each holds a ``.gradmap-partial`` marker naming the host and process that wrote it,
and one is removed only if that process is no longer running on this host. The output directory gets the usual
permissions of a new directory (``0777`` minus the umask), not ``mkdtemp``'s private ``0700``.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import socket
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from huggingface_hub import split_torch_state_dict_into_shards
from safetensors.torch import save_file
from torch import nn

from .engine import ModelWeights, View
from .engine.weights import unit_of
from .removal import pruned_names, trim_config

#: Largest shard written (bytes or a size string), also the most tensor memory a save holds at once.
MAX_SHARD_SIZE = "2GB"


def check_output_dir(output_dir: str | os.PathLike, overwrite: bool = False) -> Path:
    """Validate ``output_dir`` before any work is done.

    Raises:
        FileExistsError: if it exists and ``overwrite`` is false.
        NotADirectoryError: if it exists as a file.
        PermissionError: if its parent cannot be created or written.
        ValueError: if ``output_dir`` is empty.
    """
    if not str(output_dir).strip():
        raise ValueError("output_dir: empty path; give the directory to write the pruned checkpoint to")
    path = Path(output_dir).expanduser().absolute()
    if path.exists():
        if not path.is_dir():
            raise NotADirectoryError(f"output_dir: {str(path)!r} exists and is not a directory")
        if not overwrite:
            raise FileExistsError(f"output_dir: {str(path)!r} already exists; pass overwrite=True (--overwrite) "
                                  "to replace it")
        if any(path.iterdir()) and not (path / "gradmap_report.json").is_file():
            raise FileExistsError(f"output_dir: {str(path)!r} is a non-empty directory that is not a gradmap "
                                  "checkpoint (no gradmap_report.json); --overwrite only replaces gradmap output")
    parent = path.parent
    while not parent.exists():  # the nearest existing ancestor must be writable; nothing is created here
        parent = parent.parent
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(f"output_dir: parent directory {str(parent)!r} is not writable")
    return path


MARKER = ".gradmap-partial"


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def _normal_permissions(root: Path) -> None:
    """Give every file under ``root`` the permissions of a newly created file (``0666`` minus the umask).

    Some writers (the safetensors/HF save path) create their files through ``mkstemp``, which makes them ``0600``: a
    checkpoint other users or containers could not read.
    """
    mode = 0o666 & ~_umask()
    for file in root.rglob("*"):
        if file.is_file():
            os.chmod(file, mode)


def _make_partial_dir(parent: Path, prefix: str) -> Path:
    """``mkdtemp`` beside the output, with normal umask permissions and a marker identifying this process."""
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    os.chmod(tmp, 0o777 & ~_umask())
    (tmp / MARKER).write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid()}), encoding="utf-8")
    return tmp


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale_partials(path: Path) -> list[Path]:
    """Remove leftover ``.<name>.tmp-*`` / ``.<name>.old-*`` directories of earlier, killed saves to ``path``.

    A directory is removed only if it holds gradmap's marker and the process named there is not running on this
    host (a save in progress elsewhere, or anything gradmap did not create, is left alone).

    Returns:
        The removed directories.
    """
    removed = []
    for prefix in (f".{path.name}.tmp-", f".{path.name}.old-"):
        for candidate in path.parent.glob(prefix + "*"):
            marker = candidate / MARKER
            if not candidate.is_dir() or not marker.is_file():
                continue
            try:
                owner = json.loads(marker.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            if owner.get("host") == socket.gethostname() and not _alive(int(owner.get("pid", -1))):
                shutil.rmtree(candidate, ignore_errors=True)
                removed.append(candidate)
    return removed


@dataclass
class TensorEntry:
    """One tensor of a checkpoint to write: its name, shape and dtype (to plan the shards) and how to read it."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    load: Callable[[], torch.Tensor]


def module_entries(model: nn.Module) -> list[TensorEntry]:
    """The tensors ``save_pretrained`` would write for a materialised ``model``: its state dict (persistent buffers
    included), a tied LM head once (under the embedding's name)."""
    entries, seen = [], set()
    for name, t in model.state_dict(keep_vars=True).items():
        key = (t.data_ptr(), t.dtype, tuple(t.shape)) if t.device.type != "meta" else None
        if key is not None and key in seen:
            continue
        if key is not None:
            seen.add(key)
        entries.append(TensorEntry(name, tuple(t.shape), t.dtype, lambda t=t: t.detach()))
    return entries


def view_entries(weights: ModelWeights, view: View) -> list[TensorEntry]:
    """The tensors of the pruned model ``view`` of ``weights`` (:func:`gradmap.removal.pruned_names`), in their
    SOURCE dtype: read from the checkpoint (streamed) or the resident model when their shard is written; overrides
    (folded ``down_proj``) from the view."""
    entries = []
    params = dict(weights.model.named_parameters())
    for new_name, (old_name, rel) in pruned_names(weights, view).items():
        if rel is not None:
            value = view.overrides[unit_of(old_name, weights.adapter)][rel]
            entries.append(TensorEntry(new_name, tuple(value.shape), value.dtype, lambda v=value: v.detach()))
        else:
            entries.append(TensorEntry(new_name, tuple(params[old_name].shape), weights.source_dtype(old_name),
                                       lambda n=old_name: weights.read(n)))
    return entries


def _write_shards(entries: list[TensorEntry], directory: Path, max_shard_size) -> None:
    meta = {e.name: torch.empty(e.shape, dtype=e.dtype, device="meta") for e in entries}
    split = split_torch_state_dict_into_shards(meta, max_shard_size=max_shard_size)
    by_name = {e.name: e for e in entries}
    for filename, names in split.filename_to_tensors.items():
        tensors = {n: by_name[n].load().to("cpu").contiguous() for n in names}
        save_file(tensors, str(directory / filename), metadata={"format": "pt"})
        del tensors
    if split.is_sharded:
        index = {"metadata": {"total_size": sum(math.prod(e.shape) * e.dtype.itemsize for e in entries)},
                 "weight_map": split.tensor_to_filename}
        (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2), encoding="utf-8")


def write_checkpoint(entries: list[TensorEntry], config, output_dir: str | os.PathLike, *, tokenizer=None,
                     generation_config=None, overwrite: bool = False,
                     extra: dict[str, Callable[[Path], None]] | None = None, max_shard_size=MAX_SHARD_SIZE) -> Path:
    """Write a Hugging Face checkpoint directory (safetensors shards, ``config.json``, tokenizer, generation config,
    ``extra`` files) to ``output_dir`` atomically, one shard in memory at a time (module docstring).

    Args:
        entries: the tensors (:func:`module_entries`, :func:`view_entries`).
        config: the model config to save (``architectures`` and ``dtype`` are set from the tensors).
        extra: file name → writer called with the full path inside the temporary directory (report JSON, plots).
        max_shard_size: largest shard, bytes or a size string (``"2GB"``).

    Returns:
        The absolute output path.

    Raises:
        FileExistsError / NotADirectoryError / PermissionError: see :func:`check_output_dir`. Any error while
        writing is re-raised after the temporary directory is removed; an existing ``output_dir`` is then untouched.
    """
    path = check_output_dir(output_dir, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_partials(path)
    tmp = _make_partial_dir(path.parent, f".{path.name}.tmp-")
    backup = None
    try:
        _write_shards(entries, tmp, max_shard_size)
        floats = [e.dtype for e in entries if e.dtype.is_floating_point]
        if floats:
            config.dtype = max(set(floats), key=floats.count)
        config.save_pretrained(tmp)
        if generation_config is not None:
            generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for name, writer in (extra or {}).items():
            writer(tmp / name)
        (tmp / MARKER).unlink()
        _normal_permissions(tmp)
        if path.exists():
            backup = _make_partial_dir(path.parent, f".{path.name}.old-")
            os.replace(path, backup / "old")
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if backup is not None and (backup / "old").exists() and not path.exists():
            os.replace(backup / "old", path)
        if backup is not None:
            shutil.rmtree(backup, ignore_errors=True)
        raise
    if backup is not None:
        shutil.rmtree(backup, ignore_errors=True)
    return path


def save_checkpoint(model: nn.Module, tokenizer, output_dir: str | os.PathLike, *, overwrite: bool = False,
                    extra: dict[str, Callable[[Path], None]] | None = None, max_shard_size=MAX_SHARD_SIZE) -> Path:
    """Save a materialised ``model`` and ``tokenizer`` to ``output_dir`` atomically (:func:`write_checkpoint`); it
    loads with plain ``transformers`` (``AutoModelForCausalLM.from_pretrained``).

    Raises:
        See :func:`write_checkpoint`.
    """
    config = copy.deepcopy(model.config)
    config.architectures = [type(model).__name__]
    return write_checkpoint(module_entries(model), config, output_dir, tokenizer=tokenizer,
                            generation_config=getattr(model, "generation_config", None), overwrite=overwrite,
                            extra=extra, max_shard_size=max_shard_size)


def save_view(weights: ModelWeights, view: View, tokenizer, output_dir: str | os.PathLike, *,
              overwrite: bool = False, extra: dict[str, Callable[[Path], None]] | None = None,
              max_shard_size=MAX_SHARD_SIZE) -> Path:
    """Save the pruned model ``view`` of ``weights`` without assembling it (streamed or resident): kept layers
    renumbered, overrides applied, config trimmed (:func:`write_checkpoint`)."""
    config = trim_config(weights.model.config, view.kept, weights.adapter)
    config.architectures = [type(weights.model).__name__]
    return write_checkpoint(view_entries(weights, view), config, output_dir, tokenizer=tokenizer,
                            generation_config=getattr(weights.model, "generation_config", None),
                            overwrite=overwrite, extra=extra, max_shard_size=max_shard_size)


def json_writer(data: dict) -> Callable[[Path], None]:
    """Writer for :func:`save_checkpoint` ``extra`` that dumps ``data`` as indented JSON."""

    def write(target: Path) -> None:
        target.write_text(json.dumps(data, indent=2, default=str), encoding="utf-8")

    return write
