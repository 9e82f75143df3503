# The README's two commands: `make serve` and `make test`. Both install what they need first.
PYTHON ?= python3
STAMP := .make/installed

.PHONY: setup serve test test-slow

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
