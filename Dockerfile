# A reproducible training image: the pinned requirements install exactly as on a
# workstation (PyPI's Linux torch wheels carry their CUDA libraries, so the base
# needs no CUDA toolkit; the host needs only the NVIDIA driver and toolkit).
#
#   docker build -t repro-cifar .
#   docker run --gpus all -v "$PWD/data:/data" -v "$PWD/runs:/runs" repro-cifar
#
# The base is pinned by exact tag (bitwise results depend on the Python build).
# Override it for a site mirror, never with a floating tag:
#   --build-arg BASE_IMAGE=registry.example/python:3.11.7-slim-bookworm
ARG BASE_IMAGE=python:3.11.7-slim-bookworm
FROM ${BASE_IMAGE}

# Extra pip options for the install, e.g. a mirror or local wheels:
#   --build-arg PIP_EXTRA_ARGS="--index-url https://mirror.example/simple"
# Empty by default: plain PyPI, as in the README's install.
ARG PIP_EXTRA_ARGS=""
# The commit the image was built from, for `docker inspect` (.git is not copied in:
# `unknown` unless the build passes --build-arg GIT_COMMIT=$(git rev-parse HEAD)).
ARG GIT_COMMIT=unknown
LABEL org.opencontainers.image.revision="${GIT_COMMIT}"
# ...and for the manifest, whose fingerprint falls back on this variable without .git.
ENV REPRO_GIT_COMMIT=${GIT_COMMIT}

# Interpreter-level determinism: hash order, and cuBLAS's workspace before CUDA starts.
ENV PYTHONHASHSEED=0 \
    CUBLAS_WORKSPACE_CONFIG=:4096:8 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN useradd --create-home --uid 1000 trainer
WORKDIR /app

# Requirements first: this multi-GB layer is then rebuilt only when they change.
# PIP_EXTRA_ARGS is left unquoted so that it splits into separate options.
COPY requirements.txt constraints.txt ./
RUN pip install --no-cache-dir ${PIP_EXTRA_ARGS} -r requirements.txt -c constraints.txt

# The code stays root-owned: the training user cannot change what it runs.
# It is importable through PYTHONPATH rather than `pip install -e .`, which would
# fetch an unpinned setuptools at build time only to write a path file.
# data/ and runs/, the pipeline's default folders, point at the two volumes, so
# the plain `accelerate launch train.py` reads /data and writes /runs.
COPY . .
ENV PYTHONPATH=/app
RUN mkdir -p /data /runs \
    && chown trainer:trainer /data /runs \
    && ln -s /data /app/data \
    && ln -s /runs /app/runs

USER 1000:1000
VOLUME ["/data", "/runs"]
# The documented entry point, unchanged: a run with the default seed on every
# visible GPU (one process per GPU when there are several), writing
# /runs/cifar10-resnet18-seed2333.
CMD ["accelerate", "launch", "train.py", "--seed", "2333"]
