# syntax=docker/dockerfile:1
# segserve images. Two targets from one file:
#   docker build -t segserve:0.1.0 .                    CPU (the default: the last stage)
#   docker build --target gpu -t segserve:0.1.0-gpu .   CUDA torch + onnxruntime-gpu
# Checkpoints are not baked in: mount them at /models and name one with SEGSERVE_CHECKPOINT.
# See docs/deploy.md.

FROM python:3.11-slim-bookworm AS python-base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# --- build stages: the project and its dependencies in a virtual environment, copied later ---------
# Only the files pip needs, so that editing tests or docs does not invalidate the install layer.
FROM python-base AS build-source
WORKDIR /src
RUN python -m venv /opt/venv
COPY pyproject.toml README.md ./
COPY constraints/ constraints/
COPY models/ models/
COPY service/ service/
COPY loadtest/ loadtest/
COPY segserve_client/ segserve_client/

FROM build-source AS build-cpu
# PyPI's Linux torch wheels carry CUDA libraries (gigabytes); the CPU index offers the same release
# as 2.13.0+cpu, which pip prefers for `torch==2.13.0`. A build arg, so a mirror can replace it.
ARG PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu
# The README's install command, unchanged (tests/deploy/test_docker.py keeps them equal).
RUN pip install -c constraints/cpu.txt .

FROM build-source AS build-gpu
ARG PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cu128
# Same command with the GPU constraints (a CUDA torch), then onnxruntime-gpu in place of
# onnxruntime: both install the `onnxruntime` module, so one has to go before the other comes.
RUN pip install -c constraints/gpu.txt . \
    && pip uninstall -y onnxruntime \
    && pip install -c constraints/gpu.txt onnxruntime-gpu

# --- runtime: no compilers, no sources, a non-root numeric user ------------------------------------
FROM python-base AS runtime
# A numeric UID lets Kubernetes' runAsNonRoot verify the user without reading /etc/passwd.
RUN groupadd --system --gid 10001 segserve \
    && useradd --system --uid 10001 --gid 10001 --home-dir /home/segserve --create-home segserve \
    && mkdir -p /models
# Library caches (torch, onnxruntime) go to /tmp, the one writable path under Kubernetes'
# readOnlyRootFilesystem (an emptyDir there).
# The image listens on every interface, so API keys are required: give them as SEGSERVE_API_KEYS
# (comma-separated) or SEGSERVE_API_KEYS_FILE (SHA-256 digests, one a line, e.g. a mounted secret);
# without any the server refuses to start. SEGSERVE_AUTH=off for a trusted network only.
ENV SEGSERVE_HOST=0.0.0.0 \
    SEGSERVE_PORT=8080 \
    SEGSERVE_GRPC_PORT=50051 \
    SEGSERVE_AUTH=on \
    XDG_CACHE_HOME=/tmp/.cache
VOLUME ["/models"]
# 8080: HTTP API, /healthz, /readyz and /metrics (these three open, without a key). 50051: gRPC
# (segserve.v1 + grpc.health.v1, health open).
EXPOSE 8080 50051
# Ready means models loaded, latencies calibrated and workers alive; calibration on a CPU can take
# minutes, hence the long start period. urllib because the slim image has no curl; a non-2xx
# answer raises, which exits non-zero.
HEALTHCHECK --interval=15s --timeout=5s --start-period=300s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('SEGSERVE_PORT', '8080') + '/readyz', timeout=4)"]
WORKDIR /home/segserve
USER 10001:10001
CMD ["segserve", "serve"]

FROM runtime AS gpu
COPY --from=build-gpu /opt/venv /opt/venv
# The NVIDIA container runtime reads these to mount the driver into the container.
ENV NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    SEGSERVE_DEVICE=cuda

# Last stage, so a plain `docker build .` gives the CPU image.
FROM runtime AS cpu
COPY --from=build-cpu /opt/venv /opt/venv
