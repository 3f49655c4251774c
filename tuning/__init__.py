"""Optuna studies whose trials are whole federations: ``fedyolo tune`` (``tuning.study``)."""

from tuning.space import Param, TuningError, load_space

__all__ = ["Param", "TuningError", "load_space", "tune"]


def tune(overrides):  # noqa: ANN001, ANN201 - the study module imports Optuna: only on use
    from tuning.study import tune as _tune

    return _tune(overrides)
