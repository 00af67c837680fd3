# Two entry points: `make demo` and `make test`. Both set up everything they need first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
FMNIST_DIR := /usr/share/datasets/fashion-mnist

.PHONY: demo test lint setup data tools protos clean gpu-check

demo: setup data
	$(BIN)/prunefleet demo

test: setup data tools lint
	$(BIN)/python -m pytest -q --durations=20  # the slowest, against the 15-minute budget

# Lint, format and the architecture's import rules (import-linter contracts in pyproject.toml).
lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/python -m pip install -q -e '.[cloud,bench,dev]'
	touch $(STAMP)

# Fashion-MNIST comes from Debian's dataset-fashion-mnist package; install it when we may.
data:
	@if [ -f $(FMNIST_DIR)/t10k-labels-idx1-ubyte.gz ] || [ -f $(FMNIST_DIR)/t10k-labels-idx1-ubyte ]; then \
		true; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist; \
	else \
		echo "Fashion-MNIST is missing: run 'sudo apt-get install dataset-fashion-mnist'" \
		     "or pass --data-dir to a directory holding the four IDX files."; \
	fi

# Prometheus (the monitoring tests and `prunefleet cluster`) and docker-compose (validates
# docker-compose.yml) come from Debian's prometheus and docker-compose packages; install them when we may.
TOOLS := prometheus docker-compose
tools:
	@missing=""; for tool in $(TOOLS); do command -v $$tool >/dev/null || missing="$$missing $$tool"; done; \
	if [ -z "$$missing" ]; then \
		true; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	else \
		echo "Missing:$$missing. Run 'sudo apt-get install$$missing' so the monitoring and compose" \
		     "tests run instead of being skipped."; \
	fi

# A build on CUDA (and under torchrun on two GPUs, when there are two) whose variants match on the CPU.
# Needs a GPU and a CUDA build of torch; without them it fails at once and says so.
gpu-check: setup data
	$(BIN)/python -m cloud.build.gpu_check

# Regenerate the gRPC stubs after editing protos/*.proto.
protos: setup
	$(BIN)/python -m grpc_tools.protoc -I. --python_out=. --pyi_out=. --grpc_python_out=. protos/*.proto

clean:
	rm -rf $(VENV) build *.egg-info
