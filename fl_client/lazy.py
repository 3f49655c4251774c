"""Heavy optional dependencies, imported on first use: the one helper for lazy imports.

Why: ``fedyolo --help``, a robot that never tunes, and a server that never exports must not pay
for torch, Ultralytics, ClearML, Optuna, boto3, Docker or ONNX Runtime when a module is imported
(seconds and gigabytes each). Everything else, fedyolo's own modules included, is imported at
the head of the module that uses it, so the import graph shows every dependency. A module names
a heavy dependency once, at its head::

    optuna = lazy("optuna")
    trial = lazy("optuna.trial")

and uses it as usual (``optuna.create_study(...)``, ``trial.TrialState``): the real import runs
at the first attribute access. A package that is not installed raises its usual
``ModuleNotFoundError`` there, where the feature that needs it is used.
"""

from __future__ import annotations

import importlib
import sys
from types import ModuleType

HEAVY = frozenset(
    {
        "boto3",
        "botocore",
        "clearml",
        "docker",
        "flwr",
        "hydra",
        "matplotlib",
        "onnx",
        "onnxruntime",
        "openvino",
        "optuna",
        "torch",
        "ultralytics",
    }
)


class LazyModule(ModuleType):
    """A stand-in for module ``name`` that imports it on the first attribute access."""

    def __getattr__(self, attr: str) -> object:
        return getattr(importlib.import_module(self.__name__), attr)

    def __repr__(self) -> str:
        return f"<lazy module {self.__name__!r}>"


def lazy(name: str) -> ModuleType:
    """Module ``name`` (a heavy dependency, see ``HEAVY``), imported when first used.

    Already imported: the module itself. Anything not heavy is refused (a bug): import it at
    the head of the module instead.
    """
    if name.partition(".")[0] not in HEAVY:
        raise ValueError(f"lazy({name!r}): only heavy dependencies ({', '.join(sorted(HEAVY))})")
    return sys.modules.get(name) or LazyModule(name)
