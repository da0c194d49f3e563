# halfclose: every target creates .venv/ on first use, so each works from a
# fresh clone.  Targets that touch the kernel need root (the lab makes network
# namespaces); `make test` skips those tests with a reason when not root.
SHELL := /bin/bash
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed

.PHONY: help venv deps kube-assets demo lab-up lab-down test test-unit test-kernel test-kube test-chart \
        lint fmt typecheck crds chart bench bench-agent bench-operator image clean mesh-tools

help:
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/' | column -t -s "$$(printf '\t')"

# The four distributions of the namespace package halfclose (docs/architecture.md).
DISTS   := core agent operator cli

$(STAMP): $(foreach d,$(DISTS),$(d)/pyproject.toml) requirements/dev.in
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip setuptools wheel
	$(BIN)/pip install -q $(foreach d,$(DISTS),-e ./$(d)) -r requirements/dev.in
	@touch $@

venv: $(STAMP) ## create .venv/ with the four halfclose distributions (editable) and the dev tools

deps: ## install the system tools the lab and tests use (Debian; root)
	bash .ci/system-deps

kube-assets: ## etcd, kube-apiserver, kube-controller-manager for the kube tests (built once, cached)
	@bash hack/kube-assets.sh >/dev/null

demo: deps $(STAMP) ## reproduce the leak in the built-in lab and fix it (root)
	$(BIN)/halfclose demo

test: deps $(STAMP) kube-assets mesh-tools ## all tests: unit, real-kernel, real control plane, chart
	$(BIN)/pytest

mesh-tools: ## build the meshes' own rule generators (Go module proxy; cached, see the script)
	bash hack/mesh-generators.sh

test-unit: $(STAMP)
	$(BIN)/pytest -m "not kernel and not kube and not chart"

test-kernel: $(STAMP)
	$(BIN)/pytest -m kernel

test-kube: $(STAMP) kube-assets
	$(BIN)/pytest -m kube

test-chart: $(STAMP)
	$(BIN)/pytest -m chart

lint: $(STAMP) ## ruff, mypy and the layer contract (import-linter)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports

fmt: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

crds: $(STAMP) ## regenerate crds/*.yaml (and the chart's copy) from the Python model
	$(BIN)/python -m halfclose.api.generate
	$(BIN)/python charts/halfclose/hack/sync_crds.py

chart: $(STAMP) ## regenerate the chart's README values table and files/alerts.yaml
	$(BIN)/python charts/halfclose/hack/generate.py

bench: $(STAMP) ## scan benchmark vs ss + conntrack, then the 20k-leak scale vs ss / ss -K (root)
	$(BIN)/python -m bench.scan; rc=$$?; $(BIN)/python -m bench.scale && exit $$rc

bench-agent: $(STAMP) ## leak lifetime, agent footprint, 110-pod burst (root)
	$(BIN)/python -m bench.agent
	$(BIN)/python -m bench.burst

bench-operator: $(STAMP) kube-assets ## operator start-up at 100/1,000/5,000 pods on the real control plane
	$(BIN)/python -m bench.operator

image: ## build the two container images, agent and operator (needs a Docker engine)
	docker build --target agent -t halfclose-agent:dev .
	docker build --target operator -t halfclose-operator:dev .

clean:
	rm -rf $(VENV) build dist *.egg-info .mypy_cache .ruff_cache .pytest_cache
	rm -rf $(foreach d,$(DISTS),$(d)/build $(d)/*.egg-info)

.PHONY: e2e-node
e2e-node: deps $(STAMP) kube-assets mesh-tools ## the chart on a one-node cluster built here: containerd, kubelet, a leaking meshed pod (root; opt-in, docs/e2e-node.md)
	bash hack/node/deps.sh
	$(BIN)/python e2e/node/run.py
