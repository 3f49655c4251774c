"""Optuna studies whose trials are whole federations: ``fedyolo tune`` (``tuning.trials``).

Optuna itself is imported when a study opens (``fl_client.lazy``), so ``fedyolo --help`` stays
light.
"""

from tuning.space import Param, TuningError, load_space
from tuning.trials import tune

__all__ = ["Param", "TuningError", "load_space", "tune"]
