# The two commands a new machine needs (see README): `make demo` and `make test`.
# Each creates .venv and installs what it needs. PYTHON may point at any Python >= 3.10.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: demo test test-zoo test-ray docs bench-latency bench-quality bench-scale clean

$(VENV)/.core: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e .
	touch $@

# the [metrics] extra (pycocotools, editdistance: two small wheels) so the dense-metric tests run, not skip
$(VENV)/.test: $(VENV)/.core constraints.txt
	$(PY) -m pip install -q -c constraints.txt -e '.[test,metrics]'
	touch $@

# timm and ultralytics for the production zoo tests: --no-deps (their own requirements would pull CUDA torch and
# GUI OpenCV), then the few modules they import.
$(VENV)/.production: $(VENV)/.test constraints.txt
	$(PY) -m pip install -q -c constraints.txt --no-deps timm==1.0.31 ultralytics==8.4.190 ultralytics-thop==2.2.3
	$(PY) -m pip install -q -c constraints.txt pyyaml opencv-python-headless psutil polars safetensors huggingface_hub
	touch $@

$(VENV)/.ray: $(VENV)/.test
	$(PY) -m pip install -q -c constraints.txt -e '.[test,ray]'
	touch $@

$(VENV)/.docs: $(VENV)/.core constraints.txt
	$(PY) -m pip install -q -c constraints.txt -e '.[docs]'
	touch $@

$(VENV)/.bench: $(VENV)/.core constraints.txt
	$(PY) -m pip install -q -c constraints.txt -e '.[bench]'
	touch $@

demo: $(VENV)/.core
	$(VENV)/bin/diprune demo

test: $(VENV)/.test
	$(PY) -m pytest -q

test-zoo: $(VENV)/.test $(VENV)/.production
	$(PY) -m pytest -q -m zoo

# The documentation site (MkDocs): the CLI reference from the argparse parser, the API reference from the
# docstrings, the results pages from benchmarks/results/; built into work/site (open work/site/index.html).
docs: $(VENV)/.docs
	$(PY) docs/generate.py
	$(VENV)/bin/mkdocs build -q

# The Ray tests (tests/unit/pipeline/test_cluster.py) on a local Ray instance; installs the [ray] extra (about 360 MB).
test-ray: $(VENV)/.ray
	$(PY) -m pytest -q -m ray

# Regenerates benchmarks/results/scale.{json,md} (ResNet-18, 1,000 images, 1 and 2 Ray workers; about 15 minutes).
bench-scale: $(VENV)/.ray
	$(PY) -m benchmarks.scale

# Regenerates benchmarks/results/quality.{json,md} and quality_<family>.png (about 2 hours of compute on 2 cores).
bench-quality: $(VENV)/.bench
	for stage in diprune seeds onnxsim tp task report; do $(PY) -m benchmarks.quality --stage $$stage || exit 1; done

# Regenerates benchmarks/results/latency.{json,md} (torchvision models on onnxruntime CPU, 1 thread).
bench-latency: $(VENV)/.test
	$(PY) -m benchmarks.latency --threads 1

clean:
	rm -rf $(VENV) work
