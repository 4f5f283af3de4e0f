"""Resuming stage 1 after an interruption: the pruning decisions are recorded after every step to a small JSON file.

Each stage-1 decision costs a full forward + backward over the calibration set, so a long run that is interrupted
(Ctrl-C, a killed job) should not start over. :func:`gradmap.api.prune` with ``resume=PATH`` writes ``PATH``
atomically after every decision: the removed layer (original index), every layer's score and the seconds it took,
together with a fingerprint of what the decisions depend on. Given the same ``PATH`` again, the recorded decisions are
replayed (the layers are removed without scoring) and scoring continues from the next step. Because each decision is
a deterministic function of the model, the calibration set and the settings, the resumed run removes exactly the
layers an uninterrupted run would.

The fingerprint holds SHA-256 digests of the model's parameters and buffers (names, dtypes, shapes, bytes) and of the
calibration windows (ids and attention mask), and the settings that change decisions (target, metric, protected
layers, micro-batch, backend, seed); a state file whose fingerprint differs is refused, naming what differs.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch

from .data import Calibration
from .engine import ModelWeights
from .methods.base import Step

STATE_VERSION = 2  # 2: steps counted from 1, streamed checkpoints fingerprinted


def _digest_tensors(named) -> str:
    h = hashlib.sha256()
    for name, t in named:
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _digest_checkpoint(weights: ModelWeights) -> str:
    """SHA-256 over a streamed checkpoint's tensor names, dtypes and shapes, its shard files' sizes, and the first
    and last MiB of every shard (reading the whole of a 140 GB checkpoint to resume would defeat the purpose)."""
    h = hashlib.sha256()
    source = weights.source
    for name in sorted(weights.key_of):
        key = weights.key_of[name]
        h.update(f"{name}|{source.dtype(key)}|".encode())
    for file in sorted(set(source.files.values())):
        size = file.stat().st_size
        h.update(f"{file.name}|{size}|".encode())
        with open(file, "rb") as fh:
            h.update(fh.read(1 << 20))
            fh.seek(max(size - (1 << 20), 0))
            h.update(fh.read(1 << 20))
    return h.hexdigest()


def fingerprint(weights: ModelWeights, calibration: Calibration, settings: dict) -> dict:
    """What stage-1 decisions depend on: ``{"model": sha256, "calibration": sha256, "settings": {...}}``.

    The model digest covers every parameter and buffer of a resident model (names, dtypes, shapes, bytes), or a
    streamed checkpoint's tensor list, shard sizes and the first and last MiB of each shard.

    Args:
        weights: the dense model's weights, before any layer is removed.
        settings: JSON-serialisable decision settings (target, metric, protected, micro_batch, backend, seed).
    """
    model = (_digest_tensors(weights.model.state_dict().items()) if weights.source is None
             else _digest_checkpoint(weights))
    return {"model": model,
            "calibration": _digest_tensors([("input_ids", calibration.input_ids),
                                            ("attention_mask", calibration.attention_mask)]),
            "settings": json.loads(json.dumps(settings))}


def check_state_file(path: str | os.PathLike) -> dict:
    """The parsed state file ``path`` (before any weight is read; the fingerprint is compared later).

    Raises:
        ValueError: not a gradmap state file of this version (named ``--resume``).
    """
    try:
        state = json.loads(Path(path).read_text(encoding="utf-8"))
        state["fingerprint"], state["steps"]  # noqa: B018 (both must be there)
        if state.get("version") != STATE_VERSION:
            raise KeyError("version")
    except (OSError, ValueError, KeyError, TypeError):
        raise ValueError(f"--resume: {str(path)!r} is not a gradmap state file (version {STATE_VERSION}); pass "
                         "--restart to discard it") from None
    return state


def load_state(path: str | os.PathLike, expected: dict) -> list[Step]:
    """Recorded steps of ``path`` (empty if the file does not exist).

    Raises:
        ValueError: the file is not a gradmap state file, or its fingerprint differs from ``expected`` (the message
            names the differing parts: model, calibration, or each differing setting).
    """
    path = Path(path)
    if not path.exists():
        return []
    state = check_state_file(path)
    recorded, steps = state["fingerprint"], state["steps"]
    diffs = [k for k in ("model", "calibration") if recorded.get(k) != expected[k]]
    rec_settings = recorded.get("settings", {})
    diffs += [f"setting {k} ({rec_settings.get(k)!r} recorded, {v!r} now)" for k, v in expected["settings"].items()
              if rec_settings.get(k) != v]
    if diffs:
        raise ValueError(f"--resume: {str(path)!r} was recorded for a different run; differs in: {', '.join(diffs)}. "
                         "Pass --restart to discard it (or resume with the original model, calibration and settings)")
    return [Step(int(s["step"]), {int(k): float(v) for k, v in s["scores"].items()}, int(s["removed"]),
                 float(s["seconds"])) for s in steps]


def write_state(path: str | os.PathLike, expected: dict, steps: list[Step]) -> None:
    """Atomically (temporary file + rename) record ``steps`` with the fingerprint ``expected`` to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {"version": STATE_VERSION, "fingerprint": expected,
            "steps": [{"step": s.step, "removed": s.removed, "seconds": s.seconds,
                       "scores": {str(k): v for k, v in s.scores.items()}} for s in steps]}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(data, fh)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
