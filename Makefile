# Twill: the two commands of the README, plus helpers.
#   make demo   set up, build, bring up a three-host overlay in network namespaces, show it, clean up
#   make test   set up, build the binaries, run every test (end-to-end ones need root)
SHELL := /usr/bin/env bash
CARGO ?= cargo

.PHONY: all setup build demo test lint clean-lab

all: build

setup:
	bash scripts/setup.sh

build:
	$(CARGO) build --workspace --bins

# The demo binary lives in the tests crate (tests/src/bin/twill-demo.rs).
demo: setup build
	$(CARGO) run --quiet -p twill-tests --bin twill-demo

# The end-to-end tests start the built binaries from the target dir, so build them first.
test: setup build
	$(CARGO) test --workspace --no-fail-fast

lint:
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

# Remove network namespaces (and the processes in them) left behind by an interrupted lab.
clean-lab:
	@for ns in $$(ip netns list 2>/dev/null | awk '{print $$1}' | grep '^tw-' || true); do \
		pids=$$(ip netns pids "$$ns" 2>/dev/null || true); \
		if [[ -n "$$pids" ]]; then kill -9 $$pids 2>/dev/null || true; fi; \
		ip netns del "$$ns" && echo "deleted netns $$ns"; \
	done; true
