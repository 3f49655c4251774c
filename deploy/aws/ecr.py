"""``fedyolo deploy aws push``: the local server and client images into the deployment's ECR
repositories, with the ``docker`` SDK (no ``docker`` CLI, no ``aws ecr get-login-password``).

Each role's local image (``fedyolo-<role>:<version>``, what ``fedyolo deploy images`` builds) is
tagged with the URI the launch templates pull (``image_uri``: the repository of the stack ``up``
created, at this fedyolo's version, or ``images.<role>`` from the config) and pushed with the
registry token that ``ecr:GetAuthorizationToken`` returns. Then the groups, kept at 0 instances
while no image existed, get their configured sizes (``stack.release``; an instance refresh where
instances run already). The repositories' tags are immutable, so a tag that is
already in ECR is not pushed again (``exists``): a new build needs a new version. The push's
own stream is read to the end: an error line is one line naming the image, and the digest the
registry answered is returned.
"""

from __future__ import annotations

import base64
import logging
from typing import Any

from deploy.aws import AwsError

LOGGER = logging.getLogger("fedyolo")


def split_reference(uri: str) -> tuple[str, str]:
    """``host:port/repo/name:tag`` -> (``host:port/repo/name``, ``tag``); the tag defaults to
    ``latest`` (a port is not a tag)."""
    head, _, last = uri.rpartition("/")
    if ":" in last:
        name, tag = last.rsplit(":", 1)
        return f"{head}/{name}" if head else name, tag
    return uri, "latest"


def _registry_auth(ctx: Any) -> dict[str, str]:
    data = ctx.client("ecr").get_authorization_token()["authorizationData"][0]
    user, _, password = base64.b64decode(data["authorizationToken"]).decode().partition(":")
    return {"username": user, "password": password}


def _tag_in_ecr(ctx: Any, repo: str, tag: str) -> bool:
    from botocore.exceptions import ClientError

    name = repo.split("/", 1)[1]  # <account>.dkr.ecr.<region>.amazonaws.com/<name>
    try:
        got = ctx.client("ecr").describe_images(repositoryName=name, imageIds=[{"imageTag": tag}])
    except ClientError as e:
        if "ImageNotFound" in str(e):
            return False
        raise
    return bool(got.get("imageDetails"))


def image_uri(ctx: Any, role: str) -> str:
    """The image a ``role`` instance pulls: ``images.<role>``, or the deployment's ECR
    repository at this fedyolo's version (``deploy.aws.cfn.compute``'s choice too)."""
    from botocore.exceptions import ClientError

    from deploy.aws.cfn.compute import image_tag

    given = ctx.cfg.images[role]
    if given:
        return str(given)
    repo = f"{ctx.name.lower()}/{role}"
    try:
        got = ctx.client("ecr").describe_repositories(repositoryNames=[repo])
    except ClientError as e:
        if "RepositoryNotFound" not in str(e):
            raise
        raise AwsError(
            f"deploy aws push: no ECR repository {repo}; run `fedyolo deploy aws up` first "
            "(or set images.<role>)"
        ) from None
    return f"{got['repositories'][0]['repositoryUri']}:{image_tag(ctx.cfg, role)}"


DOCKER_ARCH = {"amd64": "x86_64", "arm64": "arm64"}  # an image's Architecture -> EC2's
PLATFORM = {"x86_64": "linux/amd64", "arm64": "linux/arm64"}  # EC2's -> Docker's platform


def local_tag(role: str, arch: str) -> str:
    """The local image ``push`` sends for ``role`` on ``arch`` (``fedyolo deploy images``)."""
    from deploy.images import default_tag

    return default_tag(role, PLATFORM[arch])


def push(
    cfg: Any,
    sess: Any = None,
    local: dict[str, str] | None = None,
    docker_client=None,
    *,
    release: bool = True,
):
    """Push both roles' images; one row per role (``pushed`` with its digest, or ``exists``),
    then one per group that got its size or an instance refresh (``release``)."""
    from deploy.aws import stack
    from deploy.aws.cfn.compute import client_arch
    from deploy.images import ROLES

    ctx = stack.Context(cfg, sess or stack.session())
    arch = {"server": "x86_64", "client": client_arch(cfg)}
    targets = {role: image_uri(ctx, role) for role in ROLES}
    if docker_client is None:
        import docker

        try:
            docker_client = docker.from_env()
            docker_client.ping()
        except Exception as e:  # noqa: BLE001 - docker.errors.DockerException and socket errors
            raise AwsError(f"deploy aws push: no Docker engine: {stack._one_line(e)}") from e
    import docker.errors

    auth = None
    rows = []
    for role in ROLES:
        src = (local or {}).get(role) or local_tag(role, arch[role])
        target = targets[role]
        repo, tag = split_reference(target)
        ecr = ".dkr.ecr." in repo.split("/", 1)[0]
        try:
            image = docker_client.images.get(src)
        except docker.errors.ImageNotFound as e:
            raise AwsError(
                f"deploy aws push: no local image {src}; build it with `fedyolo deploy images`"
            ) from e
        got = DOCKER_ARCH.get(image.attrs.get("Architecture", ""), image.attrs.get("Architecture"))
        if got != arch[role]:
            key = "clients.arch" if role == "client" else "the server's instances"
            raise AwsError(
                f"deploy aws push: {src} is a {got} image, {key} is {arch[role]}: build it with "
                f"`fedyolo deploy images --platform {PLATFORM[arch[role]]}`"
            )
        if ecr and _tag_in_ecr(ctx, repo, tag):
            LOGGER.info("%s is already in ECR (immutable tags): not pushed", target)
            rows.append({"role": role, "image": src, "target": target, "action": "exists"})
            continue
        if ecr and auth is None:
            auth = _registry_auth(ctx)
        image.tag(repo, tag)
        digest = None
        LOGGER.info("pushing %s -> %s", src, target)
        for line in docker_client.images.push(
            repo, tag=tag, auth_config=auth, stream=True, decode=True
        ):
            if line.get("error") or line.get("errorDetail"):
                msg = line.get("error") or line["errorDetail"].get("message", "")
                raise AwsError(f"deploy aws push: {target}: {' '.join(str(msg).split())}")
            digest = (line.get("aux") or {}).get("Digest", digest)
        if digest is None:
            raise AwsError(f"deploy aws push: {target}: the registry answered no digest")
        rows.append(
            {"role": role, "image": src, "target": target, "action": "pushed", "digest": digest}
        )
    if release and stack.describe(ctx) is not None:
        for r in stack.release(ctx):
            rows.append({"role": r["group"], "image": "", "target": r["group"], **r})
    return rows


__all__ = ["image_uri", "push", "split_reference"]
