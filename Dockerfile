# mmekit's serving image: TorchServe with the handlers' Python dependencies baked in, for a
# SageMaker GPU multi-model endpoint (`docker run <image> serve`) and for compose on a
# workstation (`local`, see compose.yaml). The model archives are not in the image: SageMaker
# downloads them per model, compose mounts model_store/.
#
# Base image: the newest SageMaker PyTorch *inference* GPU DLC confirmed to exist,
# pytorch-inference:2.6.0-gpu-py312-cu124-ubuntu22.04-sagemaker (aws/deep-learning-containers,
# pytorch/inference/buildspec-2-6-sm.yml: TorchServe 0.12.0, SageMaker toolkit 2.0.25; no later
# SageMaker PyTorch inference buildspec exists there, 2.8 is EC2-only). The floating tag gets
# AWS's security patches; pin a dated tag or a digest with --build-arg BASE_IMAGE=... for
# bit-for-bit rebuilds. Pulling it needs `aws ecr get-login-password --region us-east-1 |
# docker login --username AWS --password-stdin 763104351884.dkr.ecr.us-east-1.amazonaws.com`.
#
# How our pins relate to it: the DLC ships Python 3.12 with torch 2.6.0+cu124 (and TorchServe
# 0.12.0, the same as ours). Our pins are torch==2.14.1 / torchvision==0.29.1 for Python 3.11
# (requires-python <3.12; requirements.lock was resolved on 3.11), so no DLC matches them.
# Rather than pip-upgrading torch inside the DLC's interpreter (which would leave its
# torchaudio/torchtext/torchdata binaries built against 2.6 and its toolkit untested), the pins
# go into their own Python 3.11 venv, /opt/mmekit/venv, the only interpreter the entry point
# uses: the image runs exactly what `make setup` installs. What the DLC still provides: Ubuntu
# 22.04 with AWS's patching, Java 17 for TorchServe's frontend, the SageMaker labels and
# environment (TS_DISABLE_SYSTEM_METRICS=true). Its own Python, torch and CUDA 12.4 libraries
# are unused (torch's wheels bring their own CUDA libraries).
#
# GPU driver: torch 2.14.1 from PyPI is a CUDA 13.0 build, which needs an NVIDIA driver >= 580;
# SageMaker's inference hosts document drivers 470/535/550 (CUDA 11.4-12.4). For those, build
# with a CUDA 12 wheel index, e.g. --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126
# (pip then prefers torch 2.14.1+cu126 over PyPI's 2.14.1 under the same pins).
ARG BASE_IMAGE=763104351884.dkr.ecr.us-east-1.amazonaws.com/pytorch-inference:2.6.0-gpu-py312-cu124-ubuntu22.04-sagemaker
FROM ${BASE_IMAGE}

# The base image already carries both labels; they are restated because this image honours
# them itself: models are registered per request (multi-models), and `serve` listens on
# SAGEMAKER_BIND_TO_PORT when SageMaker sets it (accept-bind-to-port).
LABEL com.amazonaws.sagemaker.capabilities.multi-models=true \
      com.amazonaws.sagemaker.capabilities.accept-bind-to-port=true \
      org.opencontainers.image.title=mmekit

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# uv only fetches the interpreter (python-build-standalone, from GitHub); uv 0.13.8 resolves
# "3.11" to CPython 3.11.18, the same patch release every time. pip is pinned to the version the
# project's venv runs.
ARG UV_VERSION=0.13.8
ARG PYTHON_VERSION=3.11
ARG PIP_VERSION=26.3
ARG TORCH_INDEX_URL=

WORKDIR /opt/mmekit

RUN python3 -m pip install --no-cache-dir --target /tmp/uv "uv==${UV_VERSION}" \
 && export UV_PYTHON_INSTALL_DIR=/opt/mmekit/python \
 && /tmp/uv/bin/uv python install --no-bin "${PYTHON_VERSION}" \
 && "$(/tmp/uv/bin/uv python find --managed-python --no-python-downloads "${PYTHON_VERSION}")" \
      -m venv /opt/mmekit/venv \
 && rm -rf /tmp/uv /root/.cache \
 && /opt/mmekit/venv/bin/python -m pip install --no-cache-dir "pip==${PIP_VERSION}"

# The venv first on PATH: `python`, `torchserve` and the workers TorchServe starts are ours.
# LD_LIBRARY_PATH keeps only the NVIDIA driver folders (as nvidia/cuda images set it): the
# DLC's /usr/local/lib (NCCL 2.23), CUDA 12.4 and Open MPI folders would otherwise outrank the
# RUNPATH of torch's wheels and load older CUDA libraries than the ones torch was built with.
ENV PATH=/opt/mmekit/venv/bin:${PATH} \
    LD_LIBRARY_PATH=/usr/local/nvidia/lib:/usr/local/nvidia/lib64 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

# Every runtime dependency, at build time, from the project's own pins: the dependency list of
# pyproject.toml (torchserve and torch-model-archiver included) with requirements.lock as
# constraints, as scripts/bootstrap.py installs them. Nothing is installed at model load
# (install_py_dep_per_model=false in both profiles).
COPY pyproject.toml requirements.lock ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" > /tmp/requirements.txt \
 && python -m pip install --no-cache-dir ${TORCH_INDEX_URL:+--extra-index-url "${TORCH_INDEX_URL}"} \
      -c requirements.lock -r /tmp/requirements.txt \
 && rm /tmp/requirements.txt

COPY handlers/ handlers/
COPY scripts/ scripts/
COPY configs/ configs/
RUN mkdir -p /opt/mmekit/run /opt/mmekit/model_store

# 8080: inference (+ management on SageMaker), 8081: management (local), 8082: metrics
EXPOSE 8080 8081 8082

# scripts/container.py is PID 1: it starts TorchServe's launcher in the foreground as its child
# and forwards SIGTERM to TorchServe's Java frontend (the launcher itself forwards nothing),
# then waits for the frontend and its workers. SageMaker runs `docker run <image> serve`.
ENTRYPOINT ["/opt/mmekit/venv/bin/python", "-m", "scripts.container"]
CMD ["serve"]
