"""gradmap: remove whole decoder layers from causal LLMs and repair the damage (GradMAP, arXiv 2602.14649).

Pipeline, top to bottom: :mod:`~gradmap.data` (calibration set) → :mod:`~gradmap.scoring` (stage 1 metric) →
:mod:`~gradmap.pruning` / :mod:`~gradmap.removal` (iterative removal) → :mod:`~gradmap.compensation` (stage 2) →
:mod:`~gradmap.evaluation` (perplexity) → :mod:`~gradmap.checkpoint` (atomic save). :func:`prune` runs them all.
"""

__version__ = "0.1.0"

from .api import DEFAULT_COMPENSATION, DEFAULT_METRIC, PruneResult, prune  # noqa: E402
from .data import Calibration, build_calibration, calibration_from_texts, load_text, tokenize  # noqa: E402
from .evaluation import perplexity  # noqa: E402
from .models import load_model  # noqa: E402
from .removal import remove_layers  # noqa: E402
from .scoring import METRICS, layer_scores  # noqa: E402

__all__ = ["prune", "PruneResult", "DEFAULT_METRIC", "DEFAULT_COMPENSATION", "Calibration", "build_calibration",
           "calibration_from_texts", "load_text", "tokenize", "perplexity", "load_model", "remove_layers", "METRICS",
           "layer_scores", "__version__"]
