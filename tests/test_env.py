"""``gradmap env``: the environment report states this process's facts (versions, GPUs, kernels per device)."""

import json
import os
import subprocess
import sys

import torch

from gradmap import __version__, ops
from gradmap.env import environment_report, format_report
from gradmap.kernels import triton_interpreting

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_report_states_this_process():
    report = environment_report()
    assert report["versions"]["gradmap"] == __version__ and report["versions"]["torch"] == torch.__version__
    assert report["torch_cuda"] == torch.version.cuda and report["cuda_available"] == torch.cuda.is_available()
    assert [g["index"] for g in report["gpus"]] == list(range(torch.cuda.device_count()))
    assert list(report["devices"]) == ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    assert report["devices"]["cpu"]["ops_backend"] == ops.backend("cpu") == "cpp"
    for i in range(torch.cuda.device_count()):
        assert report["devices"][f"cuda:{i}"]["ops_backend"] == "cuda"
        assert report["devices"][f"cuda:{i}"]["grad_reduce"] == "triton (compiled)"
    # conftest.py interprets Triton on CPU tensors exactly when no GPU is present
    want_cpu = "triton (interpreter)" if triton_interpreting() else "torch fallback"
    assert report["devices"]["cpu"]["grad_reduce"] == want_cpu
    assert report["native_library"] == ops.library_info() and report["cuda_kernels_registered"] is True
    text = format_report(report)
    assert f"torch {torch.__version__}" in text and report["native_library"]["path"] in text
    assert f"cpu       cpp           {want_cpu}" in text


def test_cli_env_prints_text_and_json():
    env = dict(os.environ, PYTHONPATH=ROOT, GRADMAP_GRAD_REDUCE="torch")
    text = subprocess.run([sys.executable, "-m", "gradmap", "env"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert text.returncode == 0, text.stderr
    assert text.stdout.startswith(f"gradmap {__version__}") and "cpu       cpp           torch fallback" in text.stdout
    js = subprocess.run([sys.executable, "-m", "gradmap", "env", "--json"], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=300)
    assert js.returncode == 0, js.stderr
    report = json.loads(js.stdout)
    assert report["devices"]["cpu"] == {"ops_backend": "cpp", "grad_reduce": "torch fallback"}
    assert report["versions"]["torch"] == torch.__version__
