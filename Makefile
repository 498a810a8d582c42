# mmekit's front door: each target is one line into one Python tool (logic lives in scripts/).
# `make help` lists them.

PYTHON ?= python3
VENV_PY := .venv/bin/python
SETUP := $(PYTHON) -m scripts.bootstrap

.DEFAULT_GOAL := help
.PHONY: help setup weights fetch-weights archive serve-local dev serve-mme image engine-stop edit ui bench footprint plan promote models teardown iam-policy stop token test test-handlers test-hardening test-container test-slow lint

help: ## list the targets
	@$(PYTHON) -m scripts.make_help Makefile

setup: ## install Java 17 (apt) when missing, create .venv with the pinned packages
	@$(SETUP)

weights: ## build the tiny random weights into weights/tiny (seconds, offline)
	@$(SETUP) && $(VENV_PY) -m scripts.weights build --tier tiny

fetch-weights: ## download the real checkpoints into weights/full (SHA-256 pinned; SAM_VARIANT=vit_h)
	@$(SETUP) && $(VENV_PY) -m scripts.weights fetch --sam-variant $(or $(SAM_VARIANT),vit_h)

archive: ## build model_store/<model>.tar.gz + manifest.json, reproducibly (TIER=auto|tiny|full)
	@$(SETUP) && $(VENV_PY) -m scripts.archive --tier $(or $(TIER),auto)

serve-local: ## set up, archive and serve all three models on 127.0.0.1 (DETACH=1, RUNTIME=native|compose)
	@$(SETUP) && $(VENV_PY) -m scripts.serve start

dev: ## the inner loop: serve, and hot-swap a model when its handler or config changes (tiny weights)
	@$(SETUP) && $(VENV_PY) -m scripts.dev

serve-mme: ## a local SageMaker multi-model endpoint for boto3 (MME_PORT=8090, MME_SOURCE=s3://..., MME_BACKEND=container)
	@$(SETUP) && $(VENV_PY) -m scripts.sagemaker.emulator

image: ## build the serving image, tagged mmekit:<git sha>: size, time, torch's CUDA (podman where no Docker)
	@$(SETUP) && $(VENV_PY) -m scripts.image build

engine-stop: ## stop the podman service (Docker API) the image tools started; containers keep running
	@$(SETUP) && $(VENV_PY) -m scripts.engine stop

bench: ## measure: serving overhead, SAM clicks, cold loads, payloads (bench/; QUICK=1: CI-sized)
	@$(SETUP) && $(VENV_PY) -m scripts.bench $(ARGS)

footprint: ## load each model in a fresh process: time, parameters, RSS, GPU memory (model_store/footprint.json)
	@$(SETUP) && $(VENV_PY) -m scripts.footprint $(ARGS)

plan: ## capacity & cost: models per instance, instances, single-model vs MME monthly cost
	@$(SETUP) && $(VENV_PY) -m scripts.plan $(ARGS)

promote: ## the tested archives to a SageMaker multi-model endpoint (DRY_RUN=1: the plan only; IMAGE_URI=)
	@$(SETUP) && $(VENV_PY) -m scripts.promote run $(PROMOTE_FLAGS)

models: ## list the models (TargetModel names) the endpoint can serve
	@$(SETUP) && $(VENV_PY) -m scripts.promote models

teardown: ## delete the endpoint, its configs and models after a confirmation (S3 objects stay)
	@$(SETUP) && $(VENV_PY) -m scripts.promote teardown $(PROMOTE_FLAGS)

iam-policy: ## print least-privilege IAM policies for the execution role and the promoting user
	@$(SETUP) && $(VENV_PY) -m scripts.promote iam-policy

edit: ## the editing client: make edit ARGS="erase photo.jpg --point 410,230 -o out.png"
	@$(SETUP) && $(VENV_PY) -m scripts.client $(ARGS)

ui: ## the editor in a browser, on 127.0.0.1:8095 (UI_TARGET=local|mme|sagemaker)
	@$(SETUP) && $(VENV_PY) -m scripts.ui

stop: ## stop a server started with DETACH=1
	@$(SETUP) && $(VENV_PY) -m scripts.serve stop

token: ## print the inference token of the running local server, serve-local or dev (for curl)
	@$(SETUP) && $(VENV_PY) -m scripts.serve token

test: ## set up everything (chromium too, for the editor's browser test) and run all fast tests
	@$(SETUP) --with-browser && $(VENV_PY) -m pytest

test-handlers: archive ## the handler tests, then model_store/'s archives over HTTP; records what passed
	@$(VENV_PY) -m pytest tests/handlers tests/serving --store model_store

test-hardening: ## faults, load, malformed input, exposure, artifacts; a table of figures (HARDENING_FULL=1)
	@$(SETUP) && $(VENV_PY) -m pytest tests/hardening --run-slow

test-container: ## build the image (cached by its inputs), run it: compose, SageMaker mode, PID 1, hygiene
	@$(SETUP) && $(VENV_PY) -m pytest tests/container --run-container

test-slow: ## the slow tests too (full-size random models)
	@$(SETUP) && $(VENV_PY) -m pytest --run-slow

lint: ## ruff over handlers, scripts and tests
	@$(SETUP) && $(VENV_PY) -m ruff check handlers scripts tests
