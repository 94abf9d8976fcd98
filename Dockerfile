# syntax=docker/dockerfile:1
# One image runs every distzo service: distzo-paramserver, distzo-coordinator, distzo-worker,
# distzo-worker-launch, distzo-transfer, zoctl. The k8s manifests (k8s/) set `command:`, so there
# is no ENTRYPOINT. Two flavors, chosen with the FLAVOR build arg, on the same slim Python base:
#
#   CPU  (the CPU torch build; the k8s dev overlay):
#     docker build -t registry.example.com/distzo:0.1.0-cpu .
#   CUDA (the CUDA torch build, whose wheels bring the CUDA runtime, cuBLAS, cuDNN and NCCL; the
#         k8s gpu and gpu-run overlays):
#     docker build --build-arg FLAVOR=cuda -t registry.example.com/distzo:0.1.0-cuda .
#
# The CUDA image needs no CUDA base image: the driver comes from the node (the NVIDIA container
# toolkit mounts it, for the capabilities below) and everything else from the torch wheels. It does
# need a C compiler: Triton builds its launcher with one the first time a kernel runs.
# The CUDA torch wheel must suit the nodes' driver: pick its index with
#   --build-arg TORCH_CUDA_INDEX=https://download.pytorch.org/whl/cu126   (cu126, cu128, ...)
#
# Layers, from the one that changes least: the OS packages, torch (from its own index, so the
# dependencies below find it met and never pull the default CUDA wheels into the CPU image), the
# dependencies read from pyproject.toml, and last the source: a change to the code rebuilds
# only that layer. Versions: TORCH_VERSION is the torch the README and CI install;
# tests/test_k8s.py checks that, and that the Python here meets pyproject's requires-python.
#
# Releases pin the base by digest: --build-arg PYTHON_IMAGE=python:3.11-slim-bookworm@sha256:<digest>,
# and the overlays pin the pushed image by digest (`digest:` in their `images:`; k8s/README.md).

ARG FLAVOR=cpu
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---------------------------------------------------------------- CPU flavor
FROM ${PYTHON_IMAGE} AS base-cpu
ARG TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu
ENV TORCH_INDEX_URL=${TORCH_CPU_INDEX}

# ---------------------------------------------------------------- CUDA flavor
FROM ${PYTHON_IMAGE} AS base-cuda
ARG TORCH_CUDA_INDEX=https://download.pytorch.org/whl/cu128
# (the device plugin sets NVIDIA_VISIBLE_DEVICES to the GPUs a container was given)
ENV TORCH_INDEX_URL=${TORCH_CUDA_INDEX} \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    CC=gcc
# gcc and the C library headers: Triton compiles its launcher at run time
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/*

# ---------------------------------------------------------------- the image
# hadolint ignore=DL3006
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

RUN python -m venv /opt/venv \
 && pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"

# the dependencies (and the object-store extras distzo-transfer uses), from pyproject.toml alone
COPY pyproject.toml /src/pyproject.toml
RUN python -c "import tomllib; p = tomllib.load(open('/src/pyproject.toml', 'rb'))['project']; \
print('\n'.join(p['dependencies'] + p['optional-dependencies']['objectstore']))" > /tmp/requirements.txt \
 && pip install -r /tmp/requirements.txt \
 && rm /tmp/requirements.txt

# the source, last: only this layer is rebuilt when the code changes
COPY . /src
RUN pip install --no-deps /src && rm -rf /src

RUN groupadd --gid 10001 distzo \
 && useradd --uid 10001 --gid 10001 --create-home --shell /usr/sbin/nologin distzo
USER 10001:10001
WORKDIR /home/distzo

CMD ["zoctl", "--help"]
