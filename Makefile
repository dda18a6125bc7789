# Set-up and the two entry points of the README. Everything installs into .venv on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test bench clean

$(STAMP): setup.py
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip setuptools wheel
	# The CPU build of torch first: anything that asks for torch later must find it satisfied.
	$(BIN)/pip install torch==2.13.0
	# DeepSpeed builds against the installed torch; build isolation would fetch a CUDA torch.
	$(BIN)/pip install --no-build-isolation "deepspeed>=0.16"
	$(BIN)/pip install --no-build-isolation -e ".[dev]"
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

clean:
	rm -rf $(VENV)
