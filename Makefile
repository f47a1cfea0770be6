# make book   build the Jupyter Book (executes every chapter; zero Sphinx warnings allowed)
# make test   run the whole test suite, chapter notebooks included (PYTEST_ARGS="-m 'not notebooks'" to skip them)
# make bench  install the `bench` extra and run the comparison with flow_matching / torchcfm
# make assignments            student notebooks (assignments/release) + instructor/nbgrader source (assignments/source)
# make grade NB=student.ipynb  grade a filled-in student notebook (score table + NB.grade.json)
# make book-student           the student edition of the site (solutions removed) in _build/student
# make clean  remove build outputs and caches (keeps .venv; `make distclean` removes it too)
# make lint   ruff: formatting and lint checks (configured in pyproject.toml); `make format` applies the formatting
# make lab    start JupyterLab on the book: chapters (.md) open as notebooks on a double-click, widgets live
# make notebooks  every chapter as .ipynb in _build/notebooks, each opening with a cell that installs fmtoy elsewhere
# make lock   regenerate constraints.txt (exact versions) in a clean temporary venv; kept only if the fast tests pass

PYTHON ?= python3
PYTEST_ARGS ?=
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.fmtoy-installed
BENCH_STAMP := $(VENV)/.fmtoy-bench-installed

.PHONY: setup book test lint format bench lab notebooks assignments grade book-student lock clean distclean

setup: $(STAMP)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Re-install only when the requirements, the locked versions or the package metadata change. requirements.txt stays
# open for people who install fmtoy into their own environment; constraints.txt pins every package to a version
# known to pass (`make lock` regenerates it).
$(STAMP): requirements.txt constraints.txt pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -r requirements.txt -c constraints.txt
	touch $@

book: $(STAMP)
	$(BIN)/jupyter-book build . --all -n -W --keep-going
	@echo "Book: $(CURDIR)/_build/html/index.html"

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# The peers are pinned against the torch already installed, so no CUDA wheels or torchvision are pulled in;
# torchcfm's own dependencies (torchdyn -> torchvision, lightning) are not needed by the code the bench uses.
$(BENCH_STAMP): $(STAMP)
	$(BIN)/python -c "import torch; print('torch==' + torch.__version__)" > $(VENV)/torch-pin.txt
	$(BIN)/python -m pip install -c $(VENV)/torch-pin.txt -e ".[bench]"
	$(BIN)/python -m pip install --no-deps torchcfm==1.0.7
	touch $@

bench: $(BENCH_STAMP)
	$(BIN)/python bench/run.py

# JupyterLab from the venv (its python3 kernel is the venv's; nothing is installed for the user), with jupytext's
# notebook view as the default for .md files (book/_lab/overrides.json, read as the app's settings folder).
# LAB_EXTRA: more JupyterLab options, e.g. make lab LAB_EXTRA="--port=8890" (or --allow-root in a container).
LAB_ARGS = --ServerApp.root_dir="$(CURDIR)" --LabApp.app_settings_dir="$(CURDIR)/book/_lab"
LAB_EXTRA ?=
lab: $(STAMP)
	$(BIN)/jupyter lab $(LAB_ARGS) $(LAB_EXTRA)

notebooks: $(STAMP)
	$(BIN)/python -m fmtoy notebooks --out _build/notebooks

assignments: $(STAMP)
	$(BIN)/python -m fmtoy assign --out assignments

grade: $(STAMP)
	@test -n "$(NB)" || { echo "usage: make grade NB=path/to/student.ipynb"; exit 2; }
	$(BIN)/python -m fmtoy grade "$(NB)" --json "$(basename $(NB)).grade.json"
	@echo "JSON: $(basename $(NB)).grade.json"

book-student: $(STAMP)
	$(BIN)/python -m fmtoy student-book --out _build/student_src
	$(BIN)/jupyter-book build _build/student_src --path-output _build/student --all -n -W --keep-going
	@echo "Student edition: $(CURDIR)/_build/student/_build/html/index.html"

# A clean venv in a temporary folder: the CPU torch first (as .ci/run does), then requirements.txt; pip freeze minus
# fmtoy itself (and minus torch's local label, so that `torch==X` matches the +cpu wheel as well as PyPI's) becomes
# constraints.txt, but only after the fast tests pass in that venv (written next to it, then renamed into place).
LOCK_TORCH ?= torch==2.13.0
lock:
	@set -e; tmp=$$(mktemp -d "$${TMPDIR:-/tmp}/fmtoy-lock.XXXXXX"); new=constraints.txt.tmp.$$$$; \
	trap 'rm -rf "$$tmp" "$$new"' EXIT; \
	echo "lock: clean venv in $$tmp"; \
	$(PYTHON) -m venv "$$tmp/venv"; \
	"$$tmp/venv/bin/python" -m pip install -q "$(LOCK_TORCH)"; \
	"$$tmp/venv/bin/python" -m pip install -q -r requirements.txt; \
	{ echo "# Exact versions known to pass: make book, make test and .ci/run install requirements.txt with -c constraints.txt."; \
	  echo "# Made by \`make lock\`: python3 -m venv (a clean one, in a temporary folder), pip install $(LOCK_TORCH),"; \
	  echo "# pip install -r requirements.txt, then pip freeze --exclude-editable without fmtoy itself and without torch's"; \
	  echo "# local label (+cpu); kept only because the fast tests passed in that venv. Python $$("$$tmp/venv/bin/python" -c 'import platform; print(platform.python_version(), platform.machine())')."; \
	  echo "# requirements.txt stays unpinned: to install fmtoy into your own environment, use it without this file."; \
	  "$$tmp/venv/bin/python" -m pip freeze --exclude-editable | grep -viE '^fmtoy( |=|@|$$)' | sed -E 's/^(torch==[^+]+)\+.*/\1/'; \
	} > "$$tmp/constraints.txt"; \
	grep -qx '$(LOCK_TORCH)' "$$tmp/constraints.txt" || { echo "lock: $(LOCK_TORCH) is not what got installed"; exit 1; }; \
	"$$tmp/venv/bin/python" -m pytest -m 'not notebooks and not grading' -x -q -p no:cacheprovider; \
	cp "$$tmp/constraints.txt" "$$new"; mv -f "$$new" constraints.txt; \
	echo "lock: constraints.txt updated ($$(grep -vc '^#' constraints.txt) packages); make book/test re-sync .venv with it"

clean:
	rm -rf _build .jupyter_cache .pytest_cache *.egg-info assignments
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)
