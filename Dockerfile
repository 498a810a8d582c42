# mmekit's serving image: TorchServe with the handlers' Python dependencies baked in, for a
# SageMaker GPU multi-model endpoint (`docker run <image> serve`) and for compose on a
# workstation (`local`, see compose.yaml). The model archives are not in the image: SageMaker
# downloads them per model, compose mounts model_store/. Build it with `make image`
# (scripts/image.py), which passes the CA bundle secret below and labels torch's CUDA build.
#
# Base image: Debian 12 slim, public on Docker Hub, no login. Its apt packages are exactly the
# project's world: python3 is 3.11 (requirements.lock was resolved for 3.11; torch 2.14.1 has
# wheels for it) and openjdk-17-jre-headless is TorchServe's Java. The GPU needs nothing from
# the base: torch's PyPI wheels bring their own CUDA libraries (nvidia-* wheels, RUNPATH'd), and
# the host's driver (libcuda) is mounted by NVIDIA's container toolkit, which the two
# NVIDIA_* variables below ask for (without `compute` it mounts no libcuda and torch sees no
# GPU). What was dropped: the SageMaker PyTorch DLC (needs an ECR login; its Python 3.12,
# torch 2.6 and CUDA 12.4 were all unused, since our pins cannot live in its interpreter) and
# uv fetching CPython from GitHub (a download outside the package registries).
# BASE_IMAGE may name a copy of the same image (a registry mirror, a pinned digest:
# debian:bookworm-slim@sha256:...); the steps below need Debian 12's apt and its Python 3.11.
#
# GPU driver: torch 2.14.1 from PyPI is a CUDA 13.0 build (the image's label
# org.mmekit.torch.cuda says which), needing an NVIDIA driver >= 580; SageMaker's inference
# hosts document drivers 470/535/550 (CUDA 11.4-12.4). For those, build with a CUDA 12 wheel
# index, e.g. TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126 make image.
ARG BASE_IMAGE=docker.io/library/debian:bookworm-slim
FROM ${BASE_IMAGE}

# multi-models: models are registered per request; accept-bind-to-port: `serve` listens on
# SAGEMAKER_BIND_TO_PORT when SageMaker sets it.
LABEL com.amazonaws.sagemaker.capabilities.multi-models=true \
      com.amazonaws.sagemaker.capabilities.accept-bind-to-port=true \
      org.opencontainers.image.title=mmekit

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# Debian's Python 3.11 and Java 17: a layer that never changes with our code. The slim image
# has no /usr/share/man (its dpkg excludes man pages), and Java's postinst registers its man
# page with update-alternatives, which fails without the folder.
# hadolint ignore=DL3008
RUN mkdir -p /usr/share/man/man1 \
 && apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv openjdk-17-jre-headless \
 && rm -rf /var/lib/apt/lists/*

# The non-root user compose runs as by default (MMEKIT_UID/MMEKIT_GID override it).
RUN groupadd --gid 1000 mmekit && useradd --uid 1000 --gid 1000 --create-home mmekit

ENV PATH=/opt/mmekit/venv/bin:${PATH} \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    TS_DISABLE_SYSTEM_METRICS=true

ARG PIP_VERSION=26.3
ARG TORCH_INDEX_URL=
WORKDIR /opt/mmekit

# Every runtime dependency, at build time, from the project's own pins: the dependency list of
# pyproject.toml (torchserve and torch-model-archiver included) with requirements.lock as
# constraints, as scripts/bootstrap.py installs them. Only these two files come before this
# layer, so a change to the handlers or scripts reuses it. Nothing is installed at model load
# (install_py_dep_per_model=false in both profiles).
# The CA bundle: where HTTPS goes through a TLS-inspecting proxy (this project's CI machine),
# pip needs the host's bundle. It arrives as a build secret, mounted for this one RUN and never
# written to a layer; without it pip uses its own certifi bundle.
COPY pyproject.toml requirements.lock ./
RUN --mount=type=secret,id=ca_bundle \
    if [ -s /run/secrets/ca_bundle ]; then export PIP_CERT=/run/secrets/ca_bundle; fi \
 && python3 -m venv /opt/mmekit/venv \
 && python -m pip install --no-cache-dir --disable-pip-version-check "pip==${PIP_VERSION}" \
 && python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" > /tmp/requirements.txt \
 && python -m pip install --no-cache-dir --disable-pip-version-check \
      ${TORCH_INDEX_URL:+--extra-index-url "${TORCH_INDEX_URL}"} \
      -c requirements.lock -r /tmp/requirements.txt \
 && rm /tmp/requirements.txt

COPY handlers/ handlers/
COPY scripts/ scripts/
COPY configs/ configs/
# run/: TorchServe's working folder (compose mounts .mmekit/compose over it); writable by the
# image's user, who runs `serve` unless told otherwise.
RUN mkdir -p /opt/mmekit/run /opt/mmekit/model_store && chown mmekit:mmekit /opt/mmekit/run
USER mmekit

# 8080: inference (+ management on SageMaker), 8081: management (local), 8082: metrics
EXPOSE 8080 8081 8082

# scripts/container.py is PID 1: it starts TorchServe's launcher in the foreground as its child
# and forwards SIGTERM to TorchServe's Java frontend (the launcher itself forwards nothing),
# then waits for the frontend and its workers. SageMaker runs `docker run <image> serve`.
ENTRYPOINT ["/opt/mmekit/venv/bin/python", "-m", "scripts.container"]
CMD ["serve"]
