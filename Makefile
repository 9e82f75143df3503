# The README's two commands: `make serve` and `make test`. Both install what they need first.
PYTHON ?= python3
STAMP := .make/installed

.PHONY: setup serve test test-slow gpu-check

$(STAMP): pyproject.toml
	$(PYTHON) -m pip install --quiet --disable-pip-version-check -e ".[test]"
	@mkdir -p .make && touch $(STAMP)

setup: $(STAMP)

serve: $(STAMP)
	$(PYTHON) -m dsjax.serve

test: $(STAMP)
	$(PYTHON) -m pytest -q

test-slow: $(STAMP)
	$(PYTHON) -m pytest -q -m slow

# On a GPU machine (no network, no install step: the device image has JAX with CUDA): kernel tests
# built for the GPU, the kernels against XLA, end-to-end tokens/s; writes docs/gpu.md.
gpu-check:
	PYTHONPATH=. $(PYTHON) -m dsjax.bench gpu
