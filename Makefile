# Every target sets up what it needs: a virtual environment in .venv with
# the project installed (editable), and the system packages the guests and
# the emulator use (installed with apt when run as root, otherwise the
# exact command is printed).

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
BACKEND ?= auto
PYTEST_ARGS ?=
SERIES_ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help setup system doctor images run test test-fast test-browser bench \
	lab slides \
	mirror baseline clean distclean

help: ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | \
		awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	@touch $@

system: ## Check (and as root install) QEMU, busybox and friends
	@bash .ci/system-packages

setup: system $(STAMP) ## Prepare everything: system packages and .venv

doctor: setup ## Check this host: tools, KVM, Firecracker, privileges
	$(PY) -m helpers.doctor

images: setup ## Build the offline guest (kernel, initrd, rootfs)
	$(PY) -m helpers.images

run: setup ## Execute the whole series into build/ on the best backend
	$(PY) -m helpers.series run --backend $(BACKEND) $(SERIES_ARGS)

test: setup ## Run every test: unit, VMs, networking, notebooks, browser
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: setup ## Only the tests that boot nothing
	$(PY) -m pytest -m "not vm and not notebook and not browser" \
		$(PYTEST_ARGS)

test-browser: setup ## Drive the slides and JupyterLab in Chromium
	$(PY) -m pytest -m browser $(PYTEST_ARGS)

bench: setup images ## Print the emulator's and the harness's figures
	$(PY) bench/emulator_bench.py
	$(PY) bench/harness_bench.py

lab: setup ## Open JupyterLab on the notebooks with the project's kernel
	$(PY) -m helpers.series lab

slides: setup ## Execute the series and export reveal.js slides
	$(PY) -m helpers.series slides --backend $(BACKEND) $(SERIES_ARGS)

mirror: setup ## Serve artifacts and slides to a workshop room
	$(PY) -m helpers.series mirror

baseline: setup ## Save the last boot-time run as this host's baseline
	$(PY) -m helpers.timing baseline

clean: ## Remove build outputs (keeps the download/build cache)
	rm -rf build

distclean: clean ## Also remove .venv
	rm -rf $(VENV)
