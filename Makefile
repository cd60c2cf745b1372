# Set-up, build, tests and benchmarks in one place. `make test` and `make demo` work
# on a fresh machine: the first run creates .venv and installs everything.
PY ?= python3
VENV ?= .venv
PYTHON := $(VENV)/bin/python
TORCH_VERSION ?= 2.14.1
DEPS := $(VENV)/.deps-installed
# Beyond torch: the transformers integration (+ accelerate and PEFT, which its tests
# combine it with), the data pipeline (+ Spark scale-out), the trainer's monitoring
# and report, and the evaluation's BLEU/chrF.
EXTRA_DEPS := 'transformers>=5.24,<6' 'accelerate>=1.10' 'peft>=0.21' 'datasets>=3' \
	'tokenizers>=0.20' tqdm 'datasketch>=1.6' pyarrow xxhash zstandard 'pyspark>=3.5' \
	tensorboard matplotlib sacrebleu pyyaml
CSRC := $(shell find csrc -name '*.cpp' -o -name '*.cu' -o -name '*.h') setup.py

.PHONY: all build test check-triton check-torch bench demo clean

all: build

$(DEPS): pyproject.toml
	$(PY) -m venv $(VENV)
	$(PYTHON) -m pip install -q --upgrade pip setuptools wheel ninja
	$(PYTHON) -m pip install -q torch==$(TORCH_VERSION) triton numpy 'pytest>=8' 'pytest-benchmark>=4' \
		'pytest-xdist>=3'
	$(PYTHON) -m pip install -q $(EXTRA_DEPS)
	$(PYTHON) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

# Rebuild the extension in place when a C++/CUDA source changed (ninja: incremental).
dsv3/.built: $(DEPS) $(CSRC)
	$(PYTHON) setup.py -q build_ext --inplace
	touch $@

build: dsv3/.built

# Two passes: everything on the C++ CPU kernels, then the op and layer tests again
# through the Triton kernels on CPU tensors under Triton's interpreter.
TRITON_TESTS := tests/test_route.py tests/test_route_extremes.py tests/test_permute.py tests/test_grouped_mm.py \
	tests/test_swiglu.py tests/test_moe.py tests/test_moe_balance.py tests/test_quantize.py \
	tests/test_errors.py tests/test_gpu_hazards.py tests/test_ops_review.py tests/test_gpt_oss_glu.py \
	tests/test_expert_bias.py tests/test_transformers_gpt_oss.py tests/test_wgrad_uniform_walk.py \
	tests/test_interpreter_patching.py

# Both passes take a pytest-xdist worker per core (at most 8: each holds its own torch,
# ~1 GB). The interpreter runs each kernel in one Python thread; the first pass is
# mostly Python, subprocesses and small tensors, where one process left a core idle:
# on 2 cores it went from 23 to 16 minutes. Each worker keeps torch's default thread
# count, so the OpenMP kernels still run multi-threaded in every test.
TEST_WORKERS ?= $(shell n=$$(nproc); echo $$(( n < 8 ? n : 8 )))

test: build
	$(PYTHON) -m pytest -q -n $(TEST_WORKERS) --durations=15 tests
	DSV3_BACKEND=triton TRITON_INTERPRET=1 $(PYTHON) -m pytest -q -n $(TEST_WORKERS) \
		-m "not gpu" $(TRITON_TESTS)

# The Triton kernels against another triton release (the GPU machine has 3.6, torch
# 2.14.1 brings 3.8): that release goes into .triton-VERSION, ahead of the venv's on
# the path, and runs the sm_90 compile checks, then (INTERPRET=1) the interpreter
# pass. E.g. `make check-triton TRITON=3.9.0`. Triton 3.6's interpreter cannot run
# here: it converts loop bounds with int() of a 1-element array, which NumPy 2.4
# refuses; its compile checks are what the GPU machine needs.
TRITON ?= 3.6.0
INTERPRET ?= 1
check-triton: build
	test -d .triton-$(TRITON) || $(PYTHON) -m pip install -q --no-deps \
		--target .triton-$(TRITON) triton==$(TRITON)
	PYTHONPATH=.triton-$(TRITON) $(PYTHON) -m pytest -q tests/test_tuning.py tests/test_sm90_compile.py
	test "$(INTERPRET)" != 1 || PYTHONPATH=.triton-$(TRITON) DSV3_BACKEND=triton \
		TRITON_INTERPRET=1 $(PYTHON) -m pytest -q -n $(TEST_WORKERS) -m "not gpu" \
		$(TRITON_TESTS)

# The C++/CUDA sources against another torch's headers, without installing it (the
# GPU machine builds with torch 2.11; the venv has 2.14.1): only that torch's wheel is
# fetched (~0.5 GB, none of its CUDA libraries), its headers unpacked into
# .torch-VERSION, and every source compiled with the build's flags (the .cu for sm_90,
# when nvcc is here). E.g. `make check-torch CHECK_TORCH=2.12.0`.
CHECK_TORCH ?= 2.11.0
TORCH_HEADERS := .torch-$(CHECK_TORCH)/torch/include
check-torch: $(DEPS)
	test -d $(TORCH_HEADERS) || { $(PYTHON) -m pip download -q --no-deps \
		-d .torch-$(CHECK_TORCH) torch==$(CHECK_TORCH) && $(PYTHON) -c "import glob, zipfile; \
		wheel = zipfile.ZipFile(glob.glob('.torch-$(CHECK_TORCH)/torch-*.whl')[0]); \
		wheel.extractall('.torch-$(CHECK_TORCH)', \
		[n for n in wheel.namelist() if n.startswith('torch/include/')])"; }
	$(PYTHON) csrc/check_headers.py $(TORCH_HEADERS)

bench: build
	$(PYTHON) -m benchmarks.run

# The main job: prepare the embedded corpus, train the tiny MoE LM through its three
# stages, evaluate it on the held-out documents, and write out/demo/report.html.
DATA_DIR ?= out/data
RUN_DIR ?= out/demo
demo: build
	$(PYTHON) -m dsv3.cli data prepare --config demo --out $(DATA_DIR) --no-progress
	$(PYTHON) -m dsv3.cli train --config demo --data $(DATA_DIR) \
		--out $(RUN_DIR) --no-resume
	$(PYTHON) -m dsv3.cli eval --checkpoint $(RUN_DIR)/final --tasks ppl,cloze \
		--corpus $(RUN_DIR)/final/heldout.jsonl --out $(RUN_DIR)/eval
	$(PYTHON) -m dsv3.cli report --run $(RUN_DIR)

clean:
	rm -rf build dsv3/_C*.so dsv3/.built
