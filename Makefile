# A thin layer over CMake. `make run` and `make test` install what is missing first.
BUILD      ?= build
FUZZ_BUILD ?= build-fuzz
PORT       ?= 8000
PYTHON     := /usr/bin/python3
JOBS       := $(shell nproc)

.PHONY: all build run test layers unit integration fuzz-build fuzz-replay fuzz bench deps format clean

all: build

build:
	@cmake -S . -B $(BUILD) -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
	@cmake --build $(BUILD) -j $(JOBS)

deps:
	@scripts/install-deps

run: deps build
	@echo
	@echo "inferd is starting on http://127.0.0.1:$(PORT) with ./models (Ctrl-C stops it)."
	@echo "Try, from another terminal:"
	@echo "  curl -s -X POST http://127.0.0.1:$(PORT)/v2/models/breast_cancer/infer \\"
	@echo "       -H 'Content-Type: application/json' -d @models/breast_cancer/sample_request.json"
	@echo
	@exec $(BUILD)/inferd serve --models ./models --port $(PORT)

test: layers deps build unit fuzz-replay integration

# fails fast, before the build, when an #include breaks the source layout (README)
layers:
	@scripts/check-layers

unit: build
	@cd $(BUILD) && ctest --output-on-failure

FUZZ_TARGETS := infer_request batch_record cron s3_xml copy_row auth s3_creds redis_url batch_job callback_url
FUZZ_SECONDS ?= 60

fuzz-build: $(wildcard src/*/*.c src/*/*.cc src/*/*.h fuzz/*.c)
	@CC=clang CXX=clang++ cmake -S . -B $(FUZZ_BUILD) -DINFERD_FUZZ=ON -DINFERD_TESTS=OFF >/dev/null
	@cmake --build $(FUZZ_BUILD) -j $(JOBS) $(foreach t,$(FUZZ_TARGETS),--target fuzz_$(t))

# replays every seed corpus once (part of make test)
fuzz-replay: fuzz-build
	@for t in $(FUZZ_TARGETS); do \
	    $(FUZZ_BUILD)/fuzz_$$t -runs=0 fuzz/corpus/$$t 2>&1 | tail -1 || exit 1; done

# fuzzes each parser for FUZZ_SECONDS
fuzz: fuzz-build
	@for t in $(FUZZ_TARGETS); do mkdir -p $(FUZZ_BUILD)/corpus/$$t; \
	    $(FUZZ_BUILD)/fuzz_$$t -max_total_time=$(FUZZ_SECONDS) -max_len=8192 \
	        $(FUZZ_BUILD)/corpus/$$t fuzz/corpus/$$t || exit 1; done

integration: build
	@$(PYTHON) -m pytest -q tests/integration

bench:
	@scripts/install-deps --bench
	@$(MAKE) --no-print-directory build
	@bench/run
	@bench/table_run
	@bench/scale_run
	@bench/upstream_run
	@bench/tls_run

format:
	@clang-format -i $$(git ls-files '*.c' '*.h')

clean:
	rm -rf $(BUILD) $(FUZZ_BUILD)
