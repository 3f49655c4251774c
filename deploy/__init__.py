"""Everything that starts fedyolo somewhere, and everything after training: the deployment
engine on one machine (``deploy.local``), TLS and node keys (``deploy.certs``), container images
(``deploy.images``), the compose engine (``deploy.compose``), the containers' health check
(``deploy.health``), EC2 Auto Scaling (``deploy.aws``) and the edge pipeline (``deploy.edge``).
Nothing heavy is imported here (only the error base), so a health check stays light."""

from fl_client.errors import UserError


class DeployError(UserError, RuntimeError):
    """Something outside fedyolo stops a deployment step (no Docker engine, a failed image
    build, a container that never became healthy); the message names the step and the fix."""
