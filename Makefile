# harken: `make demo` (set up, synthesize, train, evaluate, transcribe) and `make test`.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
JOBS ?= $(shell nproc)
DEMO_CFG ?= configs/demo.yaml

.PHONY: demo test test-all setup voices-apt synth train eval transcribe bench clean lint

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[voices,export,wav2vec2,sherpa,bench,dev]'
	$(BIN)/pip install -q 'kenlm==0.3.0' || echo "kenlm did not build: the KenLM cross-check test will be skipped"
	touch $(STAMP)

setup: $(STAMP)

# Extra offline voices from Debian (flite, festival); the corpus still builds without them.
voices-apt:
	@if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	    flite festival festvox-kallpc16k festvox-kdlpc16k festvox-us-slt-hts ffmpeg >/dev/null) \
	  || echo "voices-apt: apt-get failed; continuing with pip voices only"; \
	else echo "voices-apt: not root or no apt-get; continuing with pip voices only"; fi

synth: $(STAMP) voices-apt
	$(BIN)/harken synth --out data/corpus --noise-dir data/noise --jobs $(JOBS)

train: $(STAMP)
	$(BIN)/harken train --config $(DEMO_CFG)

eval: $(STAMP)
	$(BIN)/harken eval --checkpoint exp/demo/best.pt data/corpus/test_seen.jsonl data/corpus/test_unseen.jsonl --out exp/demo/eval

transcribe: $(STAMP)
	$(BIN)/harken transcribe --checkpoint exp/demo/best.pt $$(head -n 3 data/corpus/test_unseen.jsonl | $(BIN)/python -c 'import sys,json; print(" ".join("data/corpus/"+json.loads(l)["audio"] for l in sys.stdin))')

demo: synth train eval transcribe

test: $(STAMP)
	$(BIN)/python -m pytest -q -m 'not slow' tests

test-all: $(STAMP)
	$(BIN)/python -m pytest -q tests

bench: $(STAMP)
	$(BIN)/python bench/features.py
	$(BIN)/python bench/train_throughput.py

lint: $(STAMP)
	$(BIN)/ruff check harken tests bench

clean:
	rm -rf data exp $(VENV)
