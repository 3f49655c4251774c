# BuildKit is required (RUN --mount): the wheels are bind-mounted, never a layer of the image.
# Same source, same image: no label or file here carries a build time; what the image was built
# from is recorded in /opt/fedyolo/build/ (dpkg.txt, pip-freeze.txt) and the base's labels.
ARG BASE_IMAGE=python:3.11-slim-bookworm

# ---- base: a fixed non-root user, /state for a volume that any user the container runs as can
# write (the SuperLink's database). No apt package: OpenCV is the headless build. ----
FROM ${BASE_IMAGE} AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    YOLO_OFFLINE=1 \
    YOLO_CONFIG_DIR=/tmp/ultralytics \
    MPLCONFIGDIR=/tmp/matplotlib \
    FLWR_HOME=/tmp/flwr \
    FLWR_TELEMETRY_ENABLED=0
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
RUN groupadd --gid 10001 fedyolo \
 && useradd --uid 10001 --gid 10001 --home-dir /home/fedyolo --create-home --shell /usr/sbin/nologin fedyolo \
 && install -d -m 1777 /state \
 && install -d /opt/fedyolo/build \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/archives/*.deb \
 && dpkg-query --show --showformat '${Package}=${Version} ${Architecture}\n' > /opt/fedyolo/build/dpkg.txt

# ---- reqs: the pinned requirements per role and platform, from pyproject.toml, and the locks ----
FROM base AS reqs
ARG TARGETARCH
WORKDIR /reqs
COPY pyproject.toml deploy/docker/requirements.py deploy/docker/pip.sh deploy/docker/lock-*.txt ./
RUN for r in cuda core server drop headless; do \
      python3 requirements.py pyproject.toml "$r" "$TARGETARCH" > "$r.txt"; done

# ---- wheel: fedyolo itself, built from the source (the image gets the wheel, not the tree) ----
FROM base AS wheel
ARG TARGETARCH
WORKDIR /src
COPY pyproject.toml README.md ./
COPY fl_server fl_server
COPY fl_client fl_client
COPY strategies strategies
COPY tuning tuning
COPY deploy deploy
COPY configs configs
# Build isolation fetches setuptools from the wheelhouse when there is one, else from the index.
RUN --mount=type=bind,from=reqs,source=/reqs,target=/reqs \
    --mount=type=bind,source=.wheelhouse,target=/wheels \
    python3 -m venv /opt/venv \
 && sh /reqs/pip.sh wheel --no-deps --wheel-dir /dist /src

# ---- runtime: the core, identical in both images, so they share these (large) layers. Two
# layers: torch's NVIDIA libraries (3.2 GB on x86_64; none from a CPU index, TORCH_INDEX_URL),
# then the rest (2.3 GB), since Docker compresses each layer on one core when it pushes and
# decompresses it on one core when it pulls. The rest is installed with its dependencies, then
# triton and the desktop OpenCV are removed in the same step (so never in a layer) and the
# headless OpenCV of the same release takes its place. ----
FROM base AS runtime
ARG TARGETARCH
ARG TORCH_INDEX_URL=""
RUN --mount=type=bind,from=reqs,source=/reqs,target=/reqs \
    --mount=type=bind,source=.wheelhouse,target=/wheels \
    python3 -m venv /opt/venv \
 && if [ -s /reqs/cuda.txt ] && [ -z "$TORCH_INDEX_URL" ]; then \
      sh /reqs/pip.sh install --no-deps --requirement /reqs/cuda.txt; fi
RUN --mount=type=bind,from=reqs,source=/reqs,target=/reqs \
    --mount=type=bind,source=.wheelhouse,target=/wheels \
    sh /reqs/pip.sh install --requirement /reqs/core.txt \
 && xargs pip uninstall --quiet --yes < /reqs/drop.txt \
 && sh /reqs/pip.sh install --no-deps --requirement /reqs/headless.txt
