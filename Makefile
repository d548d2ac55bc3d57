# Shoal — the two commands: `make demo` and `make test`. Everything else is a step of them.
SHELL := bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
CLUSTER_DIR ?= .cluster
KUBECONFIG_LOCAL := $(CLUSTER_DIR)/kubeconfig
# Resolved lazily: building the control plane is only needed by targets that use it.
BIN = $(shell bash hack/build-control-plane.sh)
KUBECTL = $(BIN)/kubectl --kubeconfig $(KUBECONFIG_LOCAL)
PYTEST_ARGS ?=

.PHONY: help
help: ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-16s %s\n", $$1, $$2}'

UV := bash hack/uv.sh
PYPROJECTS := pyproject.toml $(wildcard */pyproject.toml)

# Exactly the versions in uv.lock (a fresh clone installs what CI tested); --locked fails
# when a pyproject.toml changed without `make lock`.
$(VENV)/.installed: uv.lock $(PYPROJECTS) hack/versions.env
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "Python 3.11+ is needed"'
	@echo "[shoal] installing the workspace into $(VENV) from uv.lock (editable)"
	@$(UV) sync --locked --python $(PYTHON)
	@touch $@

.PHONY: dev
dev: $(VENV)/.installed ## Create .venv from uv.lock and build/cache the control-plane binaries
	@bash hack/build-control-plane.sh >/dev/null

.PHONY: lock
lock: ## Upgrade every dependency to the newest allowed version (changes uv.lock only)
	$(UV) lock --upgrade --python $(PYTHON)

.PHONY: crds
crds: $(VENV)/.installed ## Regenerate crds/ from the pydantic models
	$(PY) -m shoal_api.crd crds helm/shoal/crds

.PHONY: manifests
manifests: $(VENV)/.installed ## Regenerate the operator's RBAC (kustomize + chart) from rbac.py
	$(PY) -m shoal_operator.rbac .

.PHONY: lint
lint: $(VENV)/.installed ## ruff, mypy --strict, import-linter
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy --strict api core operator agent-runtime cli testbed examples tests bench
	$(VENV)/bin/lint-imports

.PHONY: verify
verify: $(VENV)/.installed lint ## Generated files are current, and lint passes
	$(PY) -m shoal_api.crd --check crds helm/shoal/crds
	$(PY) -m shoal_operator.rbac --check .

.PHONY: cluster-up
cluster-up: dev ## Start the local control plane + NATS (.cluster/kubeconfig, .cluster/nats-url)
	$(PY) -m shoal_testbed up --dir $(CLUSTER_DIR)

.PHONY: cluster-down
cluster-down: operator-down ## Stop the local control plane and remove its state
	@test ! -d $(VENV) || $(PY) -m shoal_testbed down --dir $(CLUSTER_DIR)

OPERATOR_PID := $(CLUSTER_DIR)/operator.pid
OPERATOR_ENV = KUBECONFIG=$(KUBECONFIG_LOCAL) SHOAL_NATS_URL=$$(cat $(CLUSTER_DIR)/nats-url) \
	SHOAL_OPERATOR_NAMESPACE=default

.PHONY: operator-up
operator-up: install-crds ## Run the operator in the background (log: .cluster/logs/operator.log)
	@if test -f $(OPERATOR_PID) && grep -q shoal_operator /proc/$$(cat $(OPERATOR_PID))/cmdline 2>/dev/null; then \
	  echo "[shoal] operator already running (pid $$(cat $(OPERATOR_PID)))"; \
	else \
	  $(OPERATOR_ENV) nohup $(PY) -m shoal_operator --liveness http://127.0.0.1:18080/healthz --register-apiservice local \
	    > $(CLUSTER_DIR)/logs/operator.log 2>&1 & echo $$! > $(OPERATOR_PID); \
	  echo "[shoal] operator started (pid $$(cat $(OPERATOR_PID)))"; \
	fi

.PHONY: operator-down
operator-down:
	@if test -f $(OPERATOR_PID) && grep -q shoal_operator /proc/$$(cat $(OPERATOR_PID))/cmdline 2>/dev/null; then \
	  kill $$(cat $(OPERATOR_PID)); echo "[shoal] operator stopped"; fi; rm -f $(OPERATOR_PID)

.PHONY: install-crds
install-crds: cluster-up
	$(KUBECTL) apply --server-side --field-manager=shoal -k crds/
	$(KUBECTL) wait --for=condition=Established --timeout=60s crd -l app.kubernetes.io/part-of=shoal

.PHONY: run-operator
run-operator: install-crds ## Run the operator in the foreground against the local cluster
	$(OPERATOR_ENV) $(PY) -m shoal_operator --liveness http://127.0.0.1:18080/healthz

.PHONY: bench
bench: dev ## Benchmarks (fresh local test beds); writes bench/results/*.json and *.md
	@echo "[shoal] installing redis-server (the Celery baseline's broker)"
	@bash hack/install-redis.sh >/dev/null
	$(PY) bench/operator_scale.py
	$(PY) bench/runtime_throughput.py
	$(PY) bench/workflow_dispatch.py
	$(PY) bench/simulator.py
	$(PY) bench/autoscale_reaction.py
	$(PY) bench/jetstream_scale.py

.PHONY: bench-smoke
bench-smoke: dev ## Every benchmark at a small size (part of `make test`); results in a temp dir
	$(PY) -m pytest tests/bench $(PYTEST_ARGS)

# Not `apply -R -f examples/`: examples/inputs/ holds workflow inputs (JSON), not manifests.
.PHONY: demo
demo: operator-up ## Start the local cluster and the operator, apply the examples, submit tasks and runs
	$(KUBECTL) create namespace support --dry-run=client -o yaml | $(KUBECTL) apply -f -
	$(KUBECTL) apply -n support -f examples/ -f examples/agents/
	$(KUBECTL) wait -n support --for=condition=Ready --timeout=90s agents --all
	$(KUBECTL) wait -n support --for=condition=Ready --timeout=60s scalingpolicies --all
	$(KUBECTL) wait -n support --for=condition=Ready --timeout=60s workflows --all
	$(KUBECTL) get shoal,deployments,hpa -n support
	@echo "[shoal] tasks through the runtimes (each pod runs as a local process: see 'Runtime pods on the local cluster')"
	SHOAL_NATS_URL=$$(cat $(CLUSTER_DIR)/nats-url) $(VENV)/bin/shoal submit triage -n support --wait --timeout 90 \
	  --input '{"text": "I was charged twice on my last invoice"}'
	SHOAL_NATS_URL=$$(cat $(CLUSTER_DIR)/nats-url) $(VENV)/bin/shoal submit triage -n support --wait --timeout 90 \
	  --input '{"text": "Hello, I have a question"}'
	SHOAL_NATS_URL=$$(cat $(CLUSTER_DIR)/nats-url) $(VENV)/bin/shoal submit triage -n support --wait --timeout 90 \
	  --input '{"message": "no text field"}' || echo "[shoal] (exit $$?: dead-lettered, as the contract requires a text field)"
	SHOAL_NATS_URL=$$(cat $(CLUSTER_DIR)/nats-url) $(VENV)/bin/shoal dlq list -n support
	SHOAL_NATS_URL=$$(cat $(CLUSTER_DIR)/nats-url) KUBECONFIG=$(KUBECONFIG_LOCAL) \
	  CLUSTER_DIR=$(CLUSTER_DIR) SHOAL=$(VENV)/bin/shoal PY=$(PY) bash hack/demo-workflow.sh support
	@echo "[shoal] the local cluster and operator keep running: KUBECONFIG=$(KUBECONFIG_LOCAL); 'make cluster-down' stops both"

.PHONY: test
test: dev verify ## Set up everything and run the whole suite (unit + real API server + NATS)
	$(PY) -m pytest $(PYTEST_ARGS)

.PHONY: clean
clean: cluster-down ## Remove the venv and local state (the binary cache stays)
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
