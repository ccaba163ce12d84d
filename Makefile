# zcached: the two commands a user needs are `make run` and `make test`.
PYTHON   ?= python3
VENV     := .venv
PY       := $(VENV)/bin/python
DEB_PKGS := fuse3 libfuse3-dev pkg-config fio util-linux
STAMP    := $(VENV)/.installed

.PHONY: run test lint typecheck unit bench deps venv install uninstall clean

# Debian packages: pyfuse3 builds against libfuse3; fio drives the block tests.
deps:
	@missing=""; for p in $(DEB_PKGS); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi

$(STAMP): pyproject.toml
	$(MAKE) deps
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check zcached tests bench

typecheck: $(STAMP)
	$(VENV)/bin/mypy zcached

unit: $(STAMP)
	$(PY) -m pytest -q

test: deps $(STAMP) lint typecheck unit

bench: deps $(STAMP)
	$(PY) -m bench

run: deps $(STAMP)
	$(VENV)/bin/zcached run

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis
