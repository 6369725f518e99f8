# optiserve: `make run` (the default model end to end) and `make test` (lint, types, the whole suite).
# Both build .venv from scratch on a fresh machine; torch==2.13.0 (the local CPU build) goes in first so
# nothing later pulls a multi-GB CUDA build.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check
TORCH  := torch==2.13.0
RUN_EXTRAS  := models,text,onnx,openvino,serve,load
TEST_EXTRAS := $(RUN_EXTRAS),dev,deploy,tune
ARGS ?=
PYTEST_ARGS ?= -q

.PHONY: run test selftest lint deps-check typecheck pytest venv clean system-deps docker-daemon photos

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

$(VENV)/.run-deps: pyproject.toml | $(PY)
	$(PIP) install --quiet $(TORCH)
	$(PIP) install --quiet -e '.[$(RUN_EXTRAS)]'
	touch $@

$(VENV)/.test-deps: pyproject.toml $(VENV)/.run-deps
	$(PIP) install --quiet -e '.[$(TEST_EXTRAS)]'
	touch $@

venv: $(VENV)/.test-deps

## run: optimize → serve → load test → report on the built-in default model (efficientnet-lite0).
run: $(VENV)/.run-deps
	-@$(MAKE) --no-print-directory photos
	$(VENV)/bin/optiserve run $(ARGS)

## test: the Debian packages the tests use, format check, lint, the dependency check, mypy on optiserve/,
## then every test (pytest exit 5, "no tests", is not a failure). The fashion-cnn tests need Fashion-MNIST's
## 10,000 test images.
test: system-deps lint deps-check typecheck pytest

## selftest: the reliability tests alone (fuzzing and the malformed corpus, overload, faults during a
## benchmark, a full disk, a taken port, safe loading), ending with their figures (requests tried, 5xx,
## crashes, results lost, recovery times). They are part of `make test` too.
RELIABILITY_TESTS := tests/services/test_fuzzing.py tests/services/test_malformed_corpus.py \
	tests/services/test_overload.py tests/loadtests/test_faults.py tests/optimizers/test_disk_full.py \
	tests/services/test_safe_loading.py tests/loadtests/test_generator_cpu.py
selftest: $(VENV)/.test-deps
	$(PY) -m pytest -q $(RELIABILITY_TESTS) tests/deploy/test_targets.py::test_serve_on_a_taken_port_is_one_line_naming_it

lint: $(VENV)/.test-deps
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .

## deps-check: deptry (configured in pyproject.toml) fails on a third-party import the package does not
## declare, or a declared package it never uses; the tests are checked for undeclared imports.
deps-check: $(VENV)/.test-deps
	$(VENV)/bin/deptry .
	$(VENV)/bin/deptry tests --exclude '\.venv' --known-first-party tests --ignore DEP002,DEP004

# mypy cannot follow setuptools' editable-install import hook, so it checks a symlink tree laid out
# the way the package is installed (optiserve/ with optimizers/, services/, ... inside it).
typecheck: $(VENV)/.test-deps
	rm -rf build/typecheck && mkdir -p build/typecheck
	cp -rs "$(CURDIR)/optiserve" build/typecheck/optiserve
	for d in optimizers services loadtests deploy; do cp -rs "$(CURDIR)/$$d" build/typecheck/optiserve/$$d; done
	cd build/typecheck && "$(CURDIR)/$(VENV)/bin/mypy" --config-file "$(CURDIR)/pyproject.toml" -p optiserve

pytest: $(VENV)/.test-deps
	$(PY) -m pytest $(PYTEST_ARGS) || [ $$? -eq 5 ]

## system-deps: Debian packages some built-ins and tests use (run as root): Fashion-MNIST for fashion-cnn
## (without it fashion-cnn trains on scikit-learn's digits instead), Prometheus for server-side
## measurements (without it runs scrape /metrics directly), and a container engine for the docker target
## (docker.io, started here when no daemon answers) with debootstrap for its base image, and the photos of
## efficientnet-lite0's labelled evaluation set (opencv-doc, cimg-examples, tuxpaint-stamps-default; without
## them that set is smaller, and without any labelled photo the gate falls back to agreement). CI installs all.
SYSTEM_PACKAGES := dataset-fashion-mnist prometheus docker.io debootstrap
# Data only: installed without their recommends (which are the programs and -dev packages around them).
PHOTO_PACKAGES := opencv-doc cimg-examples tuxpaint-stamps-default
system-deps:
	@if dpkg -s $(SYSTEM_PACKAGES) $(PHOTO_PACKAGES) >/dev/null 2>&1; then echo "system packages present: $(SYSTEM_PACKAGES) $(PHOTO_PACKAGES)"; \
	elif [ "$$(id -u)" != 0 ]; then echo "make system-deps: missing Debian packages; as root: apt-get install $(SYSTEM_PACKAGES) && apt-get install --no-install-recommends $(PHOTO_PACKAGES)" >&2; exit 1; \
	else apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(SYSTEM_PACKAGES) \
	  && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(PHOTO_PACKAGES); fi
	@$(MAKE) --no-print-directory docker-daemon

## photos: the Debian packages whose photos make efficientnet-lite0's labelled evaluation set (`make run`
## installs them when root; without them the set is smaller and the run's report says which are missing).
photos:
	@if dpkg -s $(PHOTO_PACKAGES) >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" != 0 ]; then echo "note: efficientnet-lite0's labelled photos are incomplete; as root: apt-get install --no-install-recommends $(PHOTO_PACKAGES)" >&2; exit 1; \
	else echo "installing the labelled photos: $(PHOTO_PACKAGES)"; apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(PHOTO_PACKAGES); fi

## docker-daemon: start dockerd in the background when `docker info` does not answer (root only), and wait
## for it; says what it did either way. Without docker's userland proxy, a port published on 127.0.0.1
## is forwarded by the kernel, as a cluster's Service is, instead of by a docker-proxy process outside the
## container's CPUs (measured: container/local served p50 0.915 → 0.979, throughput 0.942 → 0.958).
docker-daemon:
	@if docker info >/dev/null 2>&1; then echo "docker daemon answers"; \
	elif [ "$$(id -u)" != 0 ]; then echo "make docker-daemon: no docker daemon answers; start one as root (dockerd &)" >&2; exit 1; \
	else echo "no docker daemon answers: starting dockerd (log: /var/log/optiserve-dockerd.log)"; \
	  nohup dockerd --userland-proxy=false >/var/log/optiserve-dockerd.log 2>&1 & \
	  for i in $$(seq 1 60); do docker info >/dev/null 2>&1 && break; sleep 1; done; \
	  docker info >/dev/null 2>&1 && echo "docker daemon started" || { echo "dockerd did not start: see /var/log/optiserve-dockerd.log" >&2; exit 1; }; fi

clean:
	rm -rf $(VENV) build optiserve-work .mypy_cache .ruff_cache .pytest_cache
