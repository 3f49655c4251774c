# fedyolo server image: the Flower SuperLink, which runs the fedyolo ServerApp (aggregation,
# held-out evaluation, drift guard, ClearML tracking) as its subprocess. It also holds the
# `fedyolo` command line (run, data, certs). Core deps + the `server` extra (Ray for the
# simulation engine, ClearML, Hydra, matplotlib).
#
#   make images                       # both images; offline here (local base + wheelhouse)
#   docker build -f Dockerfile.server -t fedyolo-server:0.1.0 .        # a normal machine
#   docker build -f Dockerfile.server --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu ...
#
#@stages
# the server extra on top of the shared core layer
RUN --mount=type=bind,from=reqs,source=/reqs,target=/reqs \
    --mount=type=bind,source=.wheelhouse,target=/wheels \
    sh /reqs/pip.sh install --requirement /reqs/server.txt
RUN --mount=type=bind,from=wheel,source=/dist,target=/dist \
    pip install --quiet --no-deps /dist/*.whl \
 && pip freeze > /opt/fedyolo/build/pip-freeze.txt
# The Flower app `flwr run` submits from this image (the EC2 server's driver, engine=superlink):
# the source the wheel was built from, a few MB; the ServerApp imports the installed package.
COPY --from=wheel /src /opt/fedyolo/app
ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.title="fedyolo-server" \
      org.opencontainers.image.description="fedyolo server: the Flower SuperLink running the fedyolo ServerApp" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.licenses="AGPL-3.0" \
      org.opencontainers.image.source="https://github.com/fedyolo/fedyolo"
USER 10001:10001
WORKDIR /home/fedyolo
# The SuperLink serves its Fleet, Control and ServerAppIo APIs on one port (--port 9092 in
# docker-compose.yml); healthy once it accepts connections there.
EXPOSE 9092
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python3", "-m", "deploy.health", "127.0.0.1:9092"]
ENTRYPOINT ["flower-superlink"]
CMD ["--help"]
