# make book   build the Jupyter Book (executes every chapter; zero Sphinx warnings allowed)
# make test   run the whole test suite, chapter notebooks included (PYTEST_ARGS="-m 'not notebooks'" to skip them)
# make bench  install the `bench` extra and run the comparison with flow_matching / torchcfm
# make assignments            student notebooks (assignments/release) + instructor/nbgrader source (assignments/source)
# make grade NB=student.ipynb  grade a filled-in student notebook (score table + NB.grade.json)
# make book-student           the student edition of the site (solutions removed) in _build/student
# make clean  remove build outputs and caches (keeps .venv; `make distclean` removes it too)

PYTHON ?= python3
PYTEST_ARGS ?=
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.fmtoy-installed
BENCH_STAMP := $(VENV)/.fmtoy-bench-installed

.PHONY: setup book test bench assignments grade book-student clean distclean

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

clean:
	rm -rf _build .jupyter_cache .pytest_cache *.egg-info assignments
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)
