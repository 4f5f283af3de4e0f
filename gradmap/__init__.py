"""gradmap: remove whole decoder layers from causal LLMs and repair the damage (GradMAP, arXiv 2602.14649).

Data flow, one way: :mod:`~gradmap.data` (calibration set) → :mod:`~gradmap.engine` (the layer engine: every
forward and backward, resident or streamed, data parallel) → :mod:`~gradmap.methods` (selection: GradMAP's stage-1
metric and the baselines) → :mod:`~gradmap.compensation` (stage 2) → :mod:`~gradmap.evaluation` (perplexity) →
:mod:`~gradmap.checkpoint` (shard-by-shard atomic save). :func:`prune` runs them all.
"""

__version__ = "0.2.0"

from .api import PruneResult, prune  # noqa: E402
from .data import Calibration, build_calibration, calibration_from_texts, load_text, tokenize  # noqa: E402
from .evaluation import perplexity  # noqa: E402
from .methods.metrics import layer_scores, score_layers  # noqa: E402
from .models import load_model, load_tokenizer  # noqa: E402
from .names import DEFAULT_COMPENSATION, DEFAULT_METHOD, DEFAULT_METRIC, METHODS, METRICS  # noqa: E402
from .removal import remove_layers  # noqa: E402

__all__ = ["prune", "PruneResult", "DEFAULT_METHOD", "DEFAULT_METRIC", "DEFAULT_COMPENSATION", "METHODS", "METRICS",
           "Calibration", "build_calibration", "calibration_from_texts", "load_text", "tokenize", "perplexity",
           "load_model", "load_tokenizer", "remove_layers", "layer_scores", "score_layers", "__version__"]
