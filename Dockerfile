# A reproducible training image: the pinned requirements install exactly as on a
# workstation (PyPI's Linux torch wheels carry their CUDA libraries).
# Build on a site mirror with --build-arg BASE_IMAGE=registry.example/python:3.11-slim-bookworm
ARG BASE_IMAGE=python:3.11.7-slim-bookworm
FROM ${BASE_IMAGE}

# Interpreter-level determinism: hash order, and cuBLAS's workspace before CUDA starts.
ENV PYTHONHASHSEED=0 \
    CUBLAS_WORKSPACE_CONFIG=:4096:8 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN useradd --create-home --uid 1000 trainer
WORKDIR /app

COPY requirements.txt ./
RUN pip install --no-cache-dir -r requirements.txt

COPY --chown=trainer:trainer . .
RUN pip install --no-cache-dir --no-deps -e . && mkdir -p /data /runs && chown trainer:trainer /data /runs

USER 1000:1000
VOLUME ["/data", "/runs"]
CMD ["accelerate", "launch", "train.py", "--seed", "2333", "--data-dir", "/data", "--output-dir", "/runs/cifar10-resnet18-seed2333"]
