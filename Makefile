# Everything a developer or CI needs, from a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
BUF_VERSION := 1.75.0
BUF := .tools/node_modules/.bin/buf
NODE_EXAMPLE := examples/node/node_modules/.package-lock.json

.PHONY: install install-diffusion gpu-check run compute-server compute-worker test fuzz lint fmt check protos protos-check breaking bench chaos demo clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev,postgres,s3,fleet]'
	touch $(STAMP)

install: $(STAMP)

# The diffusion extra, for the tests (the service itself runs without it). torch first, by
# its exact version: on these machines pip takes the CPU build that lies on disk for it.
TORCH ?= torch==2.13.0
DIFFUSION_STAMP := $(VENV)/.diffusion
$(DIFFUSION_STAMP): $(STAMP)
	$(BIN)/python -m pip install -q '$(TORCH)'
	$(BIN)/python -m pip install -q -e '.[dev,postgres,s3,fleet,diffusion]'
	touch $(DIFFUSION_STAMP)

install-diffusion: $(DIFFUSION_STAMP)

# The Node.js example client, run by the suite against a real server.
$(NODE_EXAMPLE): examples/node/package.json examples/node/package-lock.json
	npm ci --prefix examples/node --no-audit --no-fund --silent

$(BUF):
	npm install --prefix .tools --no-save --no-audit --no-fund --silent @bufbuild/buf@$(BUF_VERSION)

## run: install, migrate and serve on 127.0.0.1:50051 (SQLite under ./var, local CPU compute)
run: install
	mkdir -p var
	$(BIN)/python -m server

## compute-server: the compute wire protocol on 127.0.0.1:8700 (SARTIQ_COMPUTE_SERVER__*): one
## process with the local processors, or an API server of the fleet when a broker is set;
## `make run` uses it with SARTIQ_COMPUTE__BACKEND=http
compute-server: install
	$(BIN)/python -m server.compute.server

## compute-worker: a Celery worker of the compute fleet (SARTIQ_COMPUTE_SERVER__BROKER_URL,
## __STORAGE__URL; see the README's "Running the compute fleet")
compute-worker: install
	$(BIN)/sartiq-compute-worker

## test: lint, check the generated stubs for drift, run the whole suite (Node example included)
test: lint protos-check $(NODE_EXAMPLE) $(DIFFUSION_STAMP)
	$(BIN)/python -m pytest

## gpu-check: the diffusion provider's tests on CUDA (fp16 on the device), where one is present
gpu-check: $(DIFFUSION_STAMP)
	@if $(BIN)/python -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then \
		$(BIN)/python -c 'import torch; print("gpu-check on", torch.cuda.get_device_name(0))'; \
		SARTIQ_TEST_DIFFUSION_DEVICE=cuda $(BIN)/python -m pytest tests/diffusion -p no:cacheprovider; \
	else \
		echo "gpu-check: no CUDA device on this machine (torch sees none): nothing was run"; \
	fi

## fuzz: the hostile-input suite's long round (10,000 requests; SARTIQ_FUZZ_SEED=n to vary it)
fuzz: install
	SARTIQ_FUZZ_EXAMPLES=$${SARTIQ_FUZZ_EXAMPLES:-10000} $(BIN)/python -m pytest tests/fuzz -o timeout=1800 -s

## lint: ruff (format + rules), mypy strict, buf lint
lint: install $(BUF)
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BUF) lint

fmt: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

check: test

## protos: regenerate sartiq_grpc/ from protos/
protos: install
	$(BIN)/python scripts/gen_protos.py

protos-check: install
	$(BIN)/python scripts/gen_protos.py --check

## breaking: compare the contract with main
breaking: $(BUF)
	$(BUF) breaking --against '.git#branch=main'

## bench: the DESIGN §10 harness (not part of `make test`; the fleet's part needs Redis)
bench: install
	$(BIN)/python -m benchmarks.harness
	$(BIN)/python -m benchmarks.streams
	$(BIN)/python -m benchmarks.replicas
	$(BIN)/python -m benchmarks.push
	$(BIN)/python -m benchmarks.compute_fleet
	$(BIN)/python -m benchmarks.local_compute --rounds 2

## chaos: the long chaos run (kill -9 under load, killed first starts); SEED=n repeats one
SEED ?= $(shell date +%s)
chaos: install
	$(BIN)/python tests/chaos_harness.py --long --seed $(SEED)

## demo: the pictures of the README tour, in var/demo
demo: install
	$(BIN)/python -m scripts.demo_images var/demo

clean:
	rm -rf $(VENV) .tools examples/node/node_modules var .pytest_cache .mypy_cache .ruff_cache
