# Set-up and the two entry points of the README. Everything installs into .venv on first use, at the
# exact versions in constraints.txt (the ones the suite is green with). `make test-latest` is the
# deliberate drift check: a separate .venv-latest with the newest versions setup.py allows.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CONSTRAINTS := constraints.txt
# The CPU build of torch that these machines install; GPU machines bring their own torch.
TORCH := torch==2.13.0
LATEST := .venv-latest

.PHONY: setup demo test bench test-latest clean

# $(1): the venv folder; $(2): extra pip arguments (the constraints, or --upgrade for the drift check).
define install
	$(PY) -m venv $(1)
	$(1)/bin/pip install $(2) --upgrade pip setuptools wheel
	# The CPU build of torch first: anything that asks for torch later must find it satisfied.
	$(1)/bin/pip install $(2) $(TORCH)
	# DeepSpeed builds against the installed torch; build isolation would fetch a CUDA torch.
	$(1)/bin/pip install $(2) --no-build-isolation deepspeed
	$(1)/bin/pip install $(2) --no-build-isolation -e ".[dev]"
endef

$(STAMP): setup.py $(CONSTRAINTS)
	$(call install,$(VENV),-c $(CONSTRAINTS))
	touch $(STAMP)

setup: $(STAMP)

# The venv's bin first on PATH: tests and the demo start the `deepspeed` launcher as a subprocess.
RUN := PATH="$(abspath $(BIN)):$$PATH"

demo: $(STAMP)
	$(RUN) $(BIN)/twinflow demo

test: $(STAMP)
	$(RUN) $(BIN)/pytest -q tests benchmarks

bench: $(STAMP)
	$(RUN) $(BIN)/pytest -q benchmarks --benchmark-only

# Newest versions allowed by setup.py (torch stays the machine's CPU build), then the whole suite.
test-latest:
	rm -rf $(LATEST)
	$(call install,$(LATEST),--upgrade --upgrade-strategy eager -c .ci/latest-constraints.txt)
	$(LATEST)/bin/twinflow env
	PATH="$(abspath $(LATEST))/bin:$$PATH" $(LATEST)/bin/pytest -q tests benchmarks

clean:
	rm -rf $(VENV) $(LATEST)
