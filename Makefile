# make book   build the Jupyter Book (executes every chapter; zero Sphinx warnings allowed)
# make test   run the whole test suite, chapter notebooks included (PYTEST_ARGS="-m 'not notebooks'" to skip them)
# make bench  install the `bench` extra and run the comparison with flow_matching / torchcfm
# make clean  remove build outputs and caches (keeps .venv; `make distclean` removes it too)

PYTHON ?= python3
PYTEST_ARGS ?=
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.fmtoy-installed
BENCH_STAMP := $(VENV)/.fmtoy-bench-installed

.PHONY: setup book test bench clean distclean

setup: $(STAMP)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Re-install only when the requirements or the package metadata change.
$(STAMP): requirements.txt pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -r requirements.txt
	touch $@

book: $(STAMP)
	$(BIN)/jupyter-book build . --all -n -W --keep-going
	@echo "Book: $(CURDIR)/_build/html/index.html"

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The peers are pinned against the torch already installed, so no CUDA wheels or torchvision are pulled in;
# torchcfm's own dependencies (torchdyn -> torchvision, lightning) are not needed by the code the bench uses.
$(BENCH_STAMP): $(STAMP)
	$(BIN)/python -c "import torch; print('torch==' + torch.__version__)" > $(VENV)/torch-pin.txt
	$(BIN)/python -m pip install -c $(VENV)/torch-pin.txt -e ".[bench]"
	$(BIN)/python -m pip install --no-deps torchcfm==1.0.7
	touch $@

bench: $(BENCH_STAMP)
	$(BIN)/python bench/run.py

clean:
	rm -rf _build .jupyter_cache .pytest_cache *.egg-info
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)
