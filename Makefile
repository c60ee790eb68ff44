# Two commands: `make demo` bakes the default project (with the pose example, named Pose Estimation) and runs its pipeline; `make test` runs every template test.
# Both create .venv with Python 3.11 and install what they need.

PYTHON_BIN ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
DEMO_DIR := demo
SLUG := pose-estimation
export WANDB_MODE ?= offline

.PHONY: demo test test-fast venv clean

$(VENV)/.installed: requirements-dev.txt constraints.txt
	$(PYTHON_BIN) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt -c constraints.txt
	touch $@

venv: $(VENV)/.installed

test: venv  ## all template tests, slow end-to-end ones included
	$(PY) -m pytest tests --durations=15

test-fast: venv  ## template tests without the slow end-to-end ones
	$(PY) -m pytest tests -m "not slow"

demo: venv  ## bake the default project into demo/ and run its whole pipeline
	rm -rf $(DEMO_DIR) && mkdir -p $(DEMO_DIR)
	$(VENV)/bin/cookiecutter --no-input -o $(DEMO_DIR) . project_name="Pose Estimation"
	$(PY) -m pip install --quiet --no-deps -e $(DEMO_DIR)/$(SLUG)
	cd $(DEMO_DIR)/$(SLUG) && $(MAKE) repo pipeline PYTHON=$(abspath $(PY))
	@echo "Demo project: $(DEMO_DIR)/$(SLUG) (see its README; metrics in 3_training/metrics.json)"

clean:
	rm -rf $(VENV) $(DEMO_DIR)
