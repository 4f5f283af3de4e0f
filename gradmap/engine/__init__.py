"""The layer engine, gradmap's ground floor: every forward, backward and resumed forward of every method, run one
decoder layer at a time, with weights resident or streamed from the checkpoint, data parallel over ranks.

* :mod:`~gradmap.engine.weights`: where weights live, onloading a layer while it is needed.
* :mod:`~gradmap.engine.context`: the inputs a decoder layer receives besides its hidden states.
* :mod:`~gradmap.engine.store`: boundary hidden states on the device or spilled to host memory.
* :mod:`~gradmap.engine.loss`: final norm → LM head → summed NLL, never materialising the full logits.
* :mod:`~gradmap.engine.distributed`: micro-batch sharding and all-reduces over ``torch.distributed``.
* :mod:`~gradmap.engine.executor`: the sweeps (forward, backward, many resumed forwards).
* :mod:`~gradmap.engine.memory`: the memory planner (``gradmap plan``) and the resident/streamed decision.
"""

from .distributed import DataParallel, init_from_environment, rank_device
from .executor import Candidate, Engine, Trajectory, View, Windows
from .loss import IGNORE, head_nll, next_token_targets
from .weights import OUTER, CheckpointSource, ModelWeights, build_skeleton

__all__ = ["Candidate", "CheckpointSource", "DataParallel", "Engine", "IGNORE", "ModelWeights", "OUTER", "Trajectory",
           "View", "Windows", "build_skeleton", "head_nll", "init_from_environment", "next_token_targets",
           "rank_device"]
