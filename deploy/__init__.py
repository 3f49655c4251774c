"""Everything around and after training: launching the deployment engine (``deploy.local``);
distillation, export and AWS deployment follow in later issues."""

from deploy.local import run_local_deployment

__all__ = ["run_local_deployment"]
