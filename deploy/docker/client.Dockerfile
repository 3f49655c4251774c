# fedyolo client image: a Flower SuperNode whose ClientApp trains YOLO on this node's own shard.
# Only what a robot needs to train (the `core` deps): no Ray, Optuna, ClearML, boto3, ONNX,
# triton or desktop OpenCV, and none of fedyolo's server, tuning or AWS code.
#
#   make images                       # both images; offline here (local base + wheelhouse)
#   make images-arm64                 # the linux/arm64 client (edge devices), offline here
#   docker build -f Dockerfile.client -t fedyolo-client:0.1.0 .        # a normal machine
#   docker build -f Dockerfile.client --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu ...
#
#@stages
# fedyolo itself, less what only the server runs: the client keeps fl_client, the health check
# and its entry point (deploy/supernode.py)
RUN --mount=type=bind,from=wheel,source=/dist,target=/dist \
    pip install --quiet --no-deps /dist/*.whl \
 && site="$(python3 -c 'import sysconfig; print(sysconfig.get_path("purelib"))')" \
 && rm -rf "$site/fl_server" "$site/tuning" "$site/strategies" "$site/configs" /opt/venv/bin/fedyolo \
 && find "$site/deploy" -mindepth 1 -maxdepth 1 ! -name __init__.py ! -name health.py ! -name supernode.py -exec rm -rf {} + \
 && python3 -c 'import fl_client.client_app, deploy.health, deploy.supernode' \
 && pip freeze > /opt/fedyolo/build/pip-freeze.txt
ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.title="fedyolo-client" \
      org.opencontainers.image.description="fedyolo client: a Flower SuperNode training Ultralytics YOLO on its own data" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.licenses="AGPL-3.0" \
      org.opencontainers.image.source="https://github.com/fedyolo/fedyolo"
USER 10001:10001
WORKDIR /home/fedyolo
# Healthy = the SuperNode is up (its ClientAppIo API answers) and its TLS link to the SuperLink
# verifies, both read from the SuperNode's own command line (deploy/health.py --supernode).
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python3", "-m", "deploy.health", "--supernode"]
# flower-supernode, started again at once after a crash, its dead session signed off first so
# the SuperLink takes its key back without waiting out the heartbeats (deploy/supernode.py);
# /state (a volume) keeps the node ID across container restarts
ENTRYPOINT ["python3", "-m", "deploy.supernode"]
CMD ["--help"]
