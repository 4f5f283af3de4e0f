"""A Hugging Face model card (``README.md``) for a pruned checkpoint, from its gradmap report.

The card has YAML front matter in the Hub's model-card metadata schema, built with ``huggingface_hub.ModelCardData``
(``base_model``, ``library_name: transformers``, ``tags: [pruned, gradmap]``, ``pipeline_tag: text-generation`` and
``license`` when the report or the checkpoint's ``config.json`` names one, or the base model is one whose licence is
known here; otherwise no licence is claimed), and a Markdown body: what was removed and how (method, metric, removed
decoder layers by original index, removal order, compensation, calibration set), the perplexity table, the zero-shot
table and the measured speed-up table when the report has them, and the removal-curve plot as a relative link.

Report fields read (all optional except that ``removed_layers`` or ``steps`` should be there for a useful card):
``method``, ``settings`` (``metric``, ``compensate``, ``ridge``, ``seed``, ``eval_seqlen``, ``license``),
``calibration`` (``source``, ``nsamples``, ``seqlen``, ``seed``, ``tokens``), ``num_layers_dense``,
``removed_layers``, ``removal_order``, ``kept_layers``, ``compensation`` (``mode``, ``notes``), ``perplexity``
(``{"dense"|"pruned"|"compensated": {"ppl", "tokens", "seqlen", ...}}``), ``zero_shot`` (one
:class:`gradmap.zeroshot.ZeroShotResult` dict, or ``{model name: that dict}``), ``speed`` (a
:func:`gradmap.speed.compare_speed` dict), ``timings``, ``environment``, ``license``.

The Hub's own validation (``ModelCard.validate``) posts the card to the Hub's API, so it needs the network; offline,
:func:`check_card` re-parses the written file with ``huggingface_hub.ModelCard`` and checks the metadata fields
(``base_model`` a valid repo id, the fixed tags/library/pipeline).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path, PurePosixPath

from huggingface_hub import ModelCard, ModelCardData
from huggingface_hub.utils import HFValidationError, validate_repo_id

CARD_FILE = "README.md"
TAGS = ["pruned", "gradmap"]

# Licences of base models known here (from their own model cards); any other base model: none claimed.
KNOWN_LICENSES = {"HuggingFaceTB/SmolLM2-135M-Instruct": "apache-2.0", "HuggingFaceTB/SmolLM2-135M": "apache-2.0",
                  "google/gemma-3-270m": "gemma", "google/gemma-3-270m-it": "gemma"}

METHODS = {
    "gradmap": "GradMAP stage 1 (arXiv 2602.14649, Sec. 3): iterative; every step scores all remaining layers with one "
               "forward + backward on the calibration set and removes the lowest-scored one",
    "shortgpt": "ShortGPT Block Influence (Men et al., arXiv 2403.03853), one-shot",
    "gromov": "angular distance of a contiguous block (Gromov et al., arXiv 2403.17887), one-shot",
    "taylor-plus": "Shortened LLaMA Taylor+ (Kim et al., arXiv 2402.02834), one-shot",
    "ppl": "Shortened LLaMA leave-one-layer-out calibration perplexity (Kim et al., arXiv 2402.02834), one-shot",
    "sleb": "SLEB (Song et al., arXiv 2402.09025): iterative leave-one-layer-out calibration loss",
    "blockpruner": "BlockPruner (Zhong et al., arXiv 2406.10594): iterative removal of attention / MLP sub-blocks",
}
COMPENSATIONS = {
    "none": "none (the remaining layers are unchanged)",
    "max-shift": "GradMAP stage 2 (arXiv 2602.14649, Sec. 3): a closed-form projection folded into the down_proj of "
                 "the kept layer whose hidden states drift most from the dense model",
    "every-gap": "GradMAP stage 2 (arXiv 2602.14649, Sec. 3), applied at every removed gap: a closed-form projection "
                 "folded into the down_proj of the kept layer before each gap (ridge chosen by cross-validation)",
    "trained": "GradMAP stage 2 as the paper describes it (arXiv 2602.14649, Sec. 3): a projection trained by Adam on "
               "the hidden-state MSE with a ridge, folded into the down_proj of the kept layer whose hidden states "
               "drift most from the dense model",
    "replaceme": "ReplaceMe's linear transform (Shopkhoev et al., arXiv 2505.02819, Eq. 4) folded into down_proj at "
                 "every removed gap",
}
_PPL_ORDER = ("dense", "pruned", "compensated")


def _fmt(x, digits: int = 3) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def _license(report: dict, output_dir: Path, base_model: str) -> str | None:
    for source in (report, report.get("settings") or {}):
        if isinstance(source.get("license"), str) and source["license"].strip():
            return source["license"].strip()
    config = output_dir / "config.json"
    if config.is_file():
        try:
            value = json.loads(config.read_text(encoding="utf-8")).get("license")
        except ValueError:
            value = None
        if isinstance(value, str) and value.strip():
            return value.strip()
    return KNOWN_LICENSES.get(base_model)


def _removal(report: dict) -> list[str]:
    settings = report.get("settings") or {}
    method = report.get("method") or settings.get("method")
    removed = report.get("removed_layers")
    if removed is None and report.get("steps"):
        removed = sorted(s["removed"] for s in report["steps"] if isinstance(s.get("removed"), int))
    order = report.get("removal_order")
    dense = report.get("num_layers_dense")
    kept = report.get("kept_layers")
    lines = ["## What was removed, and how", ""]
    if removed is not None:
        of = f" of {dense}" if dense else ""
        lines.append(f"- **Removed decoder layers** (original 0-based indices): {list(removed)} "
                     f"({len(removed)}{of} {'layer' if len(removed) == 1 and not dense else 'layers'})")
    if order and list(order) != sorted(order):
        lines.append(f"- **Removal order**: {list(order)}")
    if kept is not None:
        lines.append(f"- **Kept layers** (original indices, in order): {list(kept)}")
    if method:
        desc = METHODS.get(method)
        lines.append(f"- **Selection method**: `{method}`" + (f" — {desc}" if desc else ""))
    metric = settings.get("metric")
    if metric and (method in (None, "gradmap")):
        lines.append(f"- **Layer-importance metric**: `{metric}`")
    comp = (report.get("compensation") or {}).get("mode") or settings.get("compensate")
    if comp:
        desc = COMPENSATIONS.get(comp)
        lines.append(f"- **Compensation**: `{comp}`" + (f" — {desc}" if desc else ""))
        ridge = settings.get("ridge")
        if comp != "none":
            lines.append(f"- **Ridge**: {ridge if ridge is not None else 'chosen by k-fold cross-validation'}")
    cal = report.get("calibration") or {}
    if cal:
        parts = []
        if cal.get("source"):
            parts.append(f"source `{cal['source']}`")
        if cal.get("nsamples") is not None and cal.get("seqlen") is not None:
            parts.append(f"{cal['nsamples']} windows x {cal['seqlen']} tokens")
        if cal.get("tokens") is not None:
            parts.append(f"{cal['tokens']} tokens in total")
        if cal.get("seed") is not None:
            parts.append(f"seed {cal['seed']}")
        if parts:
            lines.append("- **Calibration set**: " + ", ".join(parts))
    if settings.get("seed") is not None:
        lines.append(f"- **Seed**: {settings['seed']}")
    notes = (report.get("compensation") or {}).get("notes") or []
    for note in notes:
        lines.append(f"- Compensation note: {note}")
    return lines


def _perplexity(report: dict) -> list[str]:
    ppl = report.get("perplexity") or {}
    if not ppl:
        return []
    dense_n = report.get("num_layers_dense")
    kept = report.get("kept_layers")
    names = [n for n in _PPL_ORDER if n in ppl] + [n for n in ppl if n not in _PPL_ORDER]
    lines = ["## Perplexity", "", "| model | decoder layers | perplexity | tokens scored | window (tokens) |",
             "|---|---:|---:|---:|---:|"]
    for name in names:
        r = ppl[name] or {}
        layers = dense_n if name == "dense" else (len(kept) if kept is not None else None)
        lines.append(f"| {name} | {_fmt(layers)} | {_fmt(r.get('ppl'), 3)} | {_fmt(r.get('tokens'))} | "
                     f"{_fmt(r.get('seqlen'))} |")
    text = (report.get("settings") or {}).get("eval_text")
    if text:
        lines += ["", f"Evaluation text: `{text}`."]
    return lines


def _zero_shot_models(zs) -> dict[str, dict]:
    if not isinstance(zs, dict) or not zs:
        return {}
    if "tasks" in zs:
        return {"pruned": zs}
    return {name: r for name, r in zs.items() if isinstance(r, dict) and "tasks" in r}


def _zero_shot(report: dict) -> list[str]:
    models = _zero_shot_models(report.get("zero_shot"))
    if not models:
        return []
    names = [n for n in _PPL_ORDER if n in models] + [n for n in models if n not in _PPL_ORDER]
    tasks = list(dict.fromkeys(t for n in names for t in models[n]["tasks"]))
    lines = ["## Zero-shot accuracy", "", "| task | metric | items | " + " | ".join(names) + " |",
             "|---|---|---:|" + "---:|" * len(names)]
    for task in tasks:
        first = next(models[n]["tasks"][task] for n in names if task in models[n]["tasks"])
        metric = first.get("headline") or "acc"
        cells = []
        for n in names:
            r = models[n]["tasks"].get(task)
            cells.append(_fmt(r.get(metric), 4) if r else "–")
        lines.append(f"| {task} | {metric} | {_fmt(first.get('n'))} | " + " | ".join(cells) + " |")
    if all(models[n].get("average") is not None for n in names):
        lines.append("| **average** | | | " + " | ".join(_fmt(models[n]["average"], 4) for n in names) + " |")
    limit = next((models[n].get("limit") for n in names if models[n].get("limit")), None)
    lines += ["", "lm-evaluation-harness multiple-choice scoring on each task's validation split"
              + (f", first {limit} items per task." if limit else ".")]
    return lines


def _speed(report: dict) -> list[str]:
    sp = report.get("speed")
    if not isinstance(sp, dict) or "dense" not in sp or "pruned" not in sp:
        return []
    d, p, s = sp["dense"], sp["pruned"], sp.get("speedup") or {}
    lines = ["## Measured speed", "", "| model | decoder layers | prefill tokens/s | time to first token (s) | "
             "decode tokens/s |", "|---|---:|---:|---:|---:|"]
    for name, m in (("dense", d), ("pruned", p)):
        lines.append(f"| {name} | {_fmt(m.get('num_layers'))} | {_fmt(m.get('prefill_tokens_per_s'), 1)} | "
                     f"{_fmt(m.get('time_to_first_token_s'), 4)} | {_fmt(m.get('decode_tokens_per_s'), 1)} |")
    if s:
        lines.append(f"| **speed-up** | | {_fmt(s.get('prefill'), 2)}x | {_fmt(s.get('time_to_first_token'), 2)}x | "
                     f"{_fmt(s.get('decode'), 2)}x |")
    lines += ["", f"Measured on {d.get('device_name', d.get('device', '?'))} ({d.get('device')}), "
              f"torch threads: {d.get('torch_threads')}, {d.get('dtype')}, batch {d.get('batch_size')}, "
              f"{d.get('prompt_tokens')}-token prompts, {d.get('new_tokens')} greedy new tokens with the KV cache; "
              f"median of {d.get('repeats')} runs after a warm-up, both models in the same run."]
    return lines


def _check_plot(output_dir: Path, curve_png: str) -> str:
    rel = PurePosixPath(str(curve_png).replace(os.sep, "/"))
    if rel.is_absolute() or "://" in str(curve_png) or ".." in rel.parts:
        raise ValueError(f"curve_png: {curve_png!r} must be a path relative to output_dir (the card links it)")
    if not (output_dir / rel).is_file():
        raise ValueError(f"curve_png: {str(output_dir / rel)!r} does not exist")
    return str(rel)


def render_model_card(report: dict, *, base_model: str, output_dir: str | os.PathLike = ".",
                      curve_png: str | None = None, model_name: str | None = None,
                      scores_png: str | None = None) -> str:
    """The card's text (front matter + body); see :func:`write_model_card`. ``output_dir`` is only read (licence in
    ``config.json``, the plots' existence)."""
    if not isinstance(report, dict):
        raise TypeError(f"report: expected a dict (PruneResult.report()), got {type(report).__name__}")
    try:
        validate_repo_id(base_model)
    except (HFValidationError, TypeError) as exc:
        raise ValueError(f"base_model: {base_model!r} is not a Hugging Face repo id ('owner/name'): {exc}") from None
    output_dir = Path(output_dir)
    plot = _check_plot(output_dir, curve_png) if curve_png is not None else None
    scores = _check_plot(output_dir, scores_png) if scores_png is not None else None
    data = ModelCardData(base_model=base_model, library_name="transformers", tags=list(TAGS),
                         pipeline_tag="text-generation", license=_license(report, output_dir, base_model))
    name = model_name or output_dir.absolute().name
    body = [f"# {name}", "",
            f"[{base_model}](https://huggingface.co/{base_model}) with whole decoder layers removed by "
            "[gradmap](https://arxiv.org/abs/2602.14649). It is a plain `transformers` checkpoint: "
            "`AutoModelForCausalLM.from_pretrained` loads it, no gradmap needed.", ""]
    for section in (_removal(report), _perplexity(report), _zero_shot(report), _speed(report)):
        if section:
            body += section + [""]
    if plot:
        body += ["## Removal curve", "", "Held-out calibration perplexity, parameters removed and measured forward "
                 "tokens/s after each removed layer (and test perplexity at the saved counts).", "",
                 f"![removal curve]({plot})", ""]
    if scores:
        body += ["## Layer scores", "", f"![layer scores at each removal step]({scores})", ""]
    body += ["## Usage", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
             f'model = AutoModelForCausalLM.from_pretrained("{name}")',
             f'tokenizer = AutoTokenizer.from_pretrained("{name}")', "```", ""]
    env = report.get("environment") or {}
    pkgs = {k: v for k, v in (env.get("packages") or {}).items() if v}
    if pkgs or report.get("timings"):
        body += ["## Reproducibility", ""]
        if pkgs:
            body += ["Versions: " + ", ".join(f"{k} {v}" for k, v in pkgs.items()) + ".", ""]
        t = report.get("timings") or {}
        if t:
            body += ["Time (s): " + ", ".join(f"{k} {v:.1f}" for k, v in t.items() if isinstance(v, (int, float)))
                     + ".", ""]
    if (output_dir / "gradmap_report.json").is_file():
        body += ["The full record of the run (scores at every step, compensation fits, settings) is "
                 "`gradmap_report.json` in this repository.", ""]
    return f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body)


def write_model_card(output_dir: str | os.PathLike, report: dict, *, base_model: str,
                     curve_png: str | None = None, scores_png: str | None = None,
                     model_name: str | None = None) -> Path:
    """Write ``output_dir/README.md``: the Hub model card of a pruned checkpoint.

    Args:
        output_dir: the checkpoint directory (must exist).
        report: the run's report (``PruneResult.report()``, or ``gradmap_report.json`` loaded); missing sections are
            left out of the card.
        base_model: Hub repo id of the dense model (``"owner/name"``), written as ``base_model`` metadata.
        curve_png: path of the removal-curve plot RELATIVE to ``output_dir`` (e.g. ``"gradmap_curve.png"``), linked
            from the card; None: no curve section.
        scores_png: path of the layer-scores plot, relative to ``output_dir``; None: no scores section.
        model_name: the card's title and the name in its usage snippet (default: ``output_dir``'s name).

    Returns:
        Path of ``README.md``, written atomically (temporary file in ``output_dir``, then renamed; an existing card
        is replaced).

    Raises:
        ValueError: ``output_dir`` is not a directory, ``base_model`` is not a repo id, ``curve_png`` is absolute,
            leaves ``output_dir`` or does not exist.
        TypeError: ``report`` is not a dict.
    """
    out = Path(output_dir)
    if not out.is_dir():
        raise ValueError(f"output_dir: {str(out)!r} is not a directory")
    text = render_model_card(report, base_model=base_model, output_dir=out, curve_png=curve_png,
                             scores_png=scores_png, model_name=model_name)
    target = out / CARD_FILE
    fd, tmp = tempfile.mkstemp(prefix=f".{CARD_FILE}.", suffix=".tmp", dir=out)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def check_card(path: str | os.PathLike) -> dict:
    """Offline check of a written card: parse it with ``huggingface_hub.ModelCard`` and check the metadata fields.

    Returns:
        The card's metadata as a dict.

    Raises:
        ValueError: the front matter does not parse, or a field is missing or wrong (message names it).
    """
    card = ModelCard.load(Path(path))
    meta = card.data.to_dict()
    try:
        validate_repo_id(meta.get("base_model"))
    except (HFValidationError, TypeError) as exc:
        raise ValueError(f"base_model: {meta.get('base_model')!r} is not a repo id: {exc}") from None
    expected = {"library_name": "transformers", "pipeline_tag": "text-generation"}
    for key, value in expected.items():
        if meta.get(key) != value:
            raise ValueError(f"{key}: expected {value!r}, got {meta.get(key)!r}")
    if not set(TAGS) <= set(meta.get("tags") or []):
        raise ValueError(f"tags: expected {TAGS} among {meta.get('tags')}")
    if "license" in meta and not isinstance(meta["license"], str):
        raise ValueError(f"license: expected a string, got {meta['license']!r}")
    return meta
