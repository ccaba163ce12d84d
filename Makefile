# zcached: the two commands a user needs are `make run` and `make test`.
PYTHON   ?= python3
VENV     := .venv
PY       := $(VENV)/bin/python
# The C core links liblz4, libzstd and libxxhash; clang and its runtimes build the sanitizer
# and libFuzzer targets that `make test` runs; valgrind counts instructions for the bench.
DEB_PKGS := fuse3 libfuse3-dev pkg-config fio util-linux prometheus \
            gcc liblz4-dev libzstd-dev libxxhash-dev clang libclang-rt-14-dev valgrind strace
STAMP    := $(VENV)/.installed

.PHONY: run test lint typecheck unit bench deps venv core install uninstall clean

PREFIX   ?= /usr/local
OPT      ?= /opt/zcached
UNITDIR  ?= /etc/systemd/system
ETCDIR   ?= /etc/zcached

# Debian packages: pyfuse3 builds against libfuse3; fio drives the block tests.
deps:
	@missing=""; for p in $(DEB_PKGS); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi

CORE_SRC := $(wildcard csrc/*.c csrc/*.h) setup.py
CORE_SO  := zcached/.core-built

$(STAMP): pyproject.toml
	$(MAKE) deps
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

# The C extension, rebuilt in place whenever a C source changes (pip install -e built it once).
$(CORE_SO): $(STAMP) $(CORE_SRC)
	$(PY) setup.py -q build_ext --inplace
	$(PY) -c 'import zcached._core'
	touch $(CORE_SO)

venv: $(STAMP)

core: $(CORE_SO)

lint: $(STAMP)
	$(VENV)/bin/ruff check zcached tests bench
	$(VENV)/bin/ruff format --check zcached tests bench

typecheck: $(STAMP)
	$(VENV)/bin/mypy zcached

unit: $(STAMP) $(CORE_SO)
	$(PY) -m pytest -q

test: deps $(STAMP) lint typecheck unit

# Every bench/*_bench.py against kernel zram (root; ~80 min with 3 repeats, mostly the swap
# workload; see bench/README.md), then the README's comparison block from bench/results/latest.json.
BENCH_ARGS ?= --repeat 3
bench: deps $(STAMP) $(CORE_SO)
	$(PY) -m bench $(BENCH_ARGS)
	$(PY) -m bench.readme

# Foreground, as active swap, with the shipped defaults (config/zcached.toml); Ctrl-C stops it
# cleanly (swapoff, detach, unmount).
run: deps $(STAMP) $(CORE_SO)
	mkdir -p /run/zcached
	$(VENV)/bin/zcached run --config config/zcached.toml

# As root: the package in its own virtualenv, the unit, and the config (an existing one is kept).
install: deps
	$(PYTHON) -m venv $(OPT)
	$(OPT)/bin/python -m pip install -q --upgrade pip
	$(OPT)/bin/python -m pip install -q .
	install -d $(PREFIX)/bin
	ln -sf $(OPT)/bin/zcached $(PREFIX)/bin/zcached
	install -d $(UNITDIR)
	sed -e 's|/usr/local/bin/zcached|$(PREFIX)/bin/zcached|' \
	    -e 's|/usr/local/share/doc|$(PREFIX)/share/doc|' \
	    -e 's|/etc/zcached/zcached.toml|$(ETCDIR)/zcached.toml|' \
	    systemd/zcached.service > $(UNITDIR)/zcached.service
	chmod 0644 $(UNITDIR)/zcached.service
	@if [ -e $(ETCDIR)/zcached.toml ]; then echo "keeping $(ETCDIR)/zcached.toml"; \
	  else install -D -m 0644 config/zcached.toml $(ETCDIR)/zcached.toml; fi
	install -D -m 0644 README.md $(PREFIX)/share/doc/zcached/README.md
	@if [ -d /run/systemd/system ]; then systemctl daemon-reload; fi
	@echo "installed; start with: systemctl enable --now zcached"

uninstall:
	@if [ -d /run/systemd/system ]; then systemctl disable --now zcached 2>/dev/null || true; fi
	rm -f $(UNITDIR)/zcached.service $(PREFIX)/bin/zcached
	rm -rf $(OPT) $(PREFIX)/share/doc/zcached
	@if [ -d /run/systemd/system ]; then systemctl daemon-reload; fi
	@echo "left $(ETCDIR) in place (your configuration)"

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis build
	rm -f zcached/_core*.so $(CORE_SO)
