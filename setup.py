"""gradmap: GradMAP layer pruning for causal LLMs.

Install with ``pip install --no-build-isolation -e .`` (an isolated build environment would pull a different torch).
torch is not pinned here: bring your own build, or ``pip install torch==2.13.0`` for the CPU wheel.
"""

from setuptools import find_packages, setup

setup(
    name="gradmap",
    version="0.1.0",
    description="GradMAP: faster layer pruning with a gradient metric and projection compensation",
    packages=find_packages(include=["gradmap", "gradmap.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "transformers>=5",
        "accelerate",
        "safetensors",
        "tqdm",
        "numpy",
        "matplotlib",
        "mwparserfromhell",
        "gguf",
    ],
    extras_require={"test": ["pytest", "pytest-benchmark"]},
    entry_points={"console_scripts": ["gradmap=gradmap.cli:main"]},
)
