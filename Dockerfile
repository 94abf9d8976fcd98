# syntax=docker/dockerfile:1
# One image runs every distzo service: distzo-paramserver, distzo-coordinator, distzo-worker,
# distzo-worker-launch, zoctl. The k8s manifests (k8s/) set `command:`, so there is no
# ENTRYPOINT. Two flavors, chosen with the FLAVOR build arg:
#
#   CPU  (python:3.11-slim + the CPU torch build; the k8s dev overlay):
#     docker build -t registry.example.com/distzo:0.1.0-cpu .
#   CUDA (a CUDA runtime base + Python 3.11 + the CUDA torch build; the k8s gpu overlay):
#     docker build --build-arg FLAVOR=cuda -t registry.example.com/distzo:0.1.0-cuda .
#
# The CUDA torch wheel must suit the nodes' driver: pick its index with
#   --build-arg TORCH_CUDA_INDEX=https://download.pytorch.org/whl/cu126   (cu126, cu128, ...)
# and, to match, --build-arg CUDA_IMAGE=nvidia/cuda:<version>-runtime-ubuntu22.04.
# torch is installed BEFORE the package from its own index, so `pip install .` finds the
# requirement met and never pulls the default (CUDA) wheels from PyPI into the CPU image.

ARG FLAVOR=cpu
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu22.04

# ---------------------------------------------------------------- CPU base
FROM python:3.11-slim-bookworm AS base-cpu
ARG TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu
ENV TORCH_INDEX_URL=${TORCH_CPU_INDEX}
RUN python -m venv /opt/venv

# ---------------------------------------------------------------- CUDA base
FROM ${CUDA_IMAGE} AS base-cuda
ARG TORCH_CUDA_INDEX=https://download.pytorch.org/whl/cu128
# (the device plugin sets NVIDIA_VISIBLE_DEVICES to the GPUs a container was given)
ENV TORCH_INDEX_URL=${TORCH_CUDA_INDEX} \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
# Python 3.11 from the deadsnakes PPA (Ubuntu 22.04 ships 3.10)
RUN export DEBIAN_FRONTEND=noninteractive \
 && apt-get update \
 && apt-get install -y --no-install-recommends software-properties-common gpg-agent \
 && add-apt-repository -y ppa:deadsnakes/ppa \
 && apt-get update \
 && apt-get install -y --no-install-recommends python3.11 python3.11-venv ca-certificates \
 && apt-get purge -y --auto-remove software-properties-common gpg-agent \
 && rm -rf /var/lib/apt/lists/* \
 && python3.11 -m venv /opt/venv

# ---------------------------------------------------------------- the image
FROM base-${FLAVOR}
ARG TORCH_VERSION=2.13.0
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 \
    XDG_CACHE_HOME=/tmp/.cache \
    HF_HOME=/tmp/.cache/huggingface \
    NUMBA_CACHE_DIR=/tmp/.cache/numba \
    CUDA_CACHE_PATH=/tmp/.cache/nv \
    TRITON_CACHE_DIR=/tmp/.cache/triton
# (caches go to /tmp: the pods run with a read-only root filesystem and an emptyDir at /tmp)

# torch first, in its own layer, from the flavor's index
RUN pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"

# then distzo and its other dependencies (from PyPI)
COPY . /src
RUN pip install /src && rm -rf /src

RUN groupadd --gid 10001 distzo \
 && useradd --uid 10001 --gid 10001 --create-home --shell /usr/sbin/nologin distzo
USER 10001:10001
WORKDIR /home/distzo

CMD ["zoctl", "--help"]
