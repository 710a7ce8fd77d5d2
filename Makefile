# Two commands do all set-up on a fresh machine:
#   make run    the sidecar on its embedded default (files under ./var/, console), routes from routes.d/
#   make test   installs what the tests need (pip into .venv, Debian packages), then runs every suite
SHELL := /bin/bash
# The Rust toolchain of a rustup install, for the native hot path (sidecar/_native, built by pip).
# Go's, for the Fluent client of Docker's log driver that a forward-source test builds.
export PATH := $(HOME)/.cargo/bin:$(PATH):/usr/local/go/bin
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEBIAN_PACKAGES := $(sort $(shell cat sdk_clients/*/debian-packages.txt tests/debian-packages.txt 2>/dev/null))
# kustomize, to render deploy/kubernetes/ as `kubectl apply -k` does (tests/test_deploy.py reads
# the version from here, and installs it the same way when it is missing). v5.8 needs Go 1.27.
KUSTOMIZE_VERSION := v5.7.1
KUSTOMIZE := $(VENV)/.kustomize-$(KUSTOMIZE_VERSION)

.PHONY: run test test-python test-python-sdk test-perl test-c test-java test-r test-native check bench soak fuzz debian-packages clean image

$(STAMP): pyproject.toml sdk_clients/python/pyproject.toml native/Cargo.toml native/Cargo.lock $(wildcard native/src/*.rs)
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { echo "Python >= 3.11 is needed (found $$($(PYTHON) --version))"; exit 1; }
	@if [ -x $(BIN)/python ]; then what="pyproject.toml or native/ changed: reinstalling into $(VENV)"; else what="first run: installing into $(VENV)"; fi; \
	if command -v cargo >/dev/null; then echo "$$what and building the native hot path (about a minute)..."; \
	else echo "$$what (about a minute; no cargo on the PATH, so without the native hot path: rustup.rs for it)..."; fi
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]' -e 'sdk_clients/python[msgpack]'
	@$(BIN)/monitoring-sidecar --version
	touch $@

run: $(STAMP)
	$(BIN)/monitoring-sidecar run --routes routes.d

check: $(STAMP)
	$(BIN)/monitoring-sidecar check --routes routes.d

# Debian packages the SDKs and their tests need, each SDK listing its own; apt-get update
# runs only when one is missing, so a second `make test` installs nothing.
debian-packages:
	@missing=$$(for p in $(DEBIAN_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed$$' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:" $$missing; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi

# Every suite; the SDKs' own first, then one pytest run over the sidecar's tests and the shared
# SDK conformance suite (which needs the C and Java drivers built by their suites).
test: test-perl test-python-sdk test-c test-java test-r test-native test-python

test-perl: debian-packages
	cd sdk_clients/perl && perl Makefile.PL >/dev/null && $(MAKE) --no-print-directory >/dev/null && $(MAKE) --no-print-directory test
	prove examples/perl-pipeline/t

test-python-sdk: $(STAMP)
	cd sdk_clients/python && ../../$(BIN)/python -m pytest -q

test-c: debian-packages
	$(MAKE) --no-print-directory -C sdk_clients/c all test

test-java: debian-packages
	cd sdk_clients/java && mvn -q -B -Dstyle.color=never test

test-r: debian-packages
	Rscript sdk_clients/r/run-tests.R

# The native crate's unit tests (its pure parts; the rest is tested through Python). Without
# cargo there is no native hot path to test.
test-native: $(STAMP)
	@if command -v cargo >/dev/null; then cargo test --release --quiet --manifest-path native/Cargo.toml; \
	else echo "no cargo on the PATH: no native hot path, so no native unit tests"; fi

test-python: $(STAMP) debian-packages $(KUSTOMIZE)
	$(BIN)/python -m pytest tests sdk_clients/conformance

# kustomize, to render deploy/kubernetes/ as `kubectl apply -k` does: installed with go install.
$(KUSTOMIZE): $(STAMP)
	@echo "installing kustomize $(KUSTOMIZE_VERSION) into $(BIN) (go install, about a minute)..."
	GOBIN=$(abspath $(BIN)) go install sigs.k8s.io/kustomize/kustomize/v5@$(KUSTOMIZE_VERSION)
	touch $@

# The container image (Containerfile), with the first builder whose engine answers; without one
# (docker installed but no daemon, as on the development machines), says so and fails.
IMAGE ?= monitoring-sidecar:$(shell sed -n 's/^__version__ = "\(.*\)"/\1/p' sidecar/__init__.py)
image:
	@if command -v podman >/dev/null && podman info >/dev/null 2>&1; then builder="podman build"; \
	elif command -v buildah >/dev/null && buildah info >/dev/null 2>&1; then builder="buildah build"; \
	elif command -v docker >/dev/null && docker info >/dev/null 2>&1; then builder="docker build"; \
	else \
		echo "make image: no container builder with a working engine here: podman, buildah, or docker with a running daemon" >&2; \
		for tool in podman buildah docker; do command -v $$tool >/dev/null && echo "  $$tool is installed, but \`$$tool info\` fails: is its engine (or daemon) running?" >&2; done; \
		echo "  build elsewhere with: podman build --file Containerfile --tag $(IMAGE) ." >&2; \
		exit 1; \
	fi; \
	echo "$$builder --file Containerfile --tag $(IMAGE) ."; \
	$$builder --file Containerfile --tag $(IMAGE) .

bench: $(STAMP)
	$(BIN)/python bench/ingest.py

# The production soak: SDK processes and raw senders to four backends under faults, reloads and
# restarts (tests/test_soak.py runs it for 60 s). SOAK_MINUTES=30 is the documented run.
SOAK_MINUTES ?= 30
soak: $(STAMP) debian-packages
	$(BIN)/python bench/soak.py --minutes $(SOAK_MINUTES)

# A coverage-guided run (atheris) over the whole path, both decode paths, and the config loader;
# the corpus grows under var/fuzz-corpus, a crash is written as crash-* here.
FUZZ_SECONDS ?= 300
fuzz: $(STAMP)
	$(BIN)/python -m pip install --quiet 'atheris>=2.3'
	mkdir -p var/fuzz-corpus
	@echo "fuzzing the whole path and the config loader for $(FUZZ_SECONDS) s"
	$(BIN)/python -m tests.fuzz.whole_path -max_total_time=$(FUZZ_SECONDS) -print_final_stats=1 var/fuzz-corpus

clean:
	rm -rf $(VENV) var build dist *.egg-info
	-cd sdk_clients/perl && [ -f Makefile ] && $(MAKE) --no-print-directory realclean >/dev/null
