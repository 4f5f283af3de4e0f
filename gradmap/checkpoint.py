"""Writing the pruned checkpoint atomically: a temporary directory beside the target, renamed into place.

An exception or a kill at any point leaves either the previous state of ``output_dir`` or the complete new one, never
a half-written checkpoint. After a hard kill (SIGKILL, power loss) a hidden ``.<name>.tmp-*`` (or ``.<name>.old-*``)
directory may remain; it is never read, and the next save to the same ``output_dir`` removes it. Only directories
that gradmap created are removed: each holds a ``.gradmap-partial`` marker naming the host and process that wrote it,
and one is removed only if that process is no longer running on this host. The output directory gets the usual
permissions of a new directory (``0777`` minus the umask), not ``mkdtemp``'s private ``0700``.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path

from torch import nn


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


def save_checkpoint(model: nn.Module, tokenizer, output_dir: str | os.PathLike, *, overwrite: bool = False,
                    extra: dict[str, Callable[[Path], None]] | None = None) -> Path:
    """Save ``model`` (``save_pretrained``, safetensors) and ``tokenizer`` to ``output_dir`` atomically.

    Args:
        extra: file name → writer called with the full path inside the temporary directory (report JSON, plots).

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
        model.save_pretrained(tmp)
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


def json_writer(data: dict) -> Callable[[Path], None]:
    """Writer for :func:`save_checkpoint` ``extra`` that dumps ``data`` as indented JSON."""

    def write(target: Path) -> None:
        target.write_text(json.dumps(data, indent=2, default=str), encoding="utf-8")

    return write
