# The two commands a newcomer needs (see README): `make run` and `make test`.
# Both install everything into .venv first; installing is idempotent and quick once done.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml Makefile | sha1sum | cut -c1-12)

export KEDRO_DISABLE_TELEMETRY := true
export DO_NOT_TRACK := 1
export MPLBACKEND := Agg

.PHONY: install run test lint bench clean-data

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3.11 -m venv $(VENV) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel
	# Pinned torch first: an unpinned torch would pull the newest CUDA build.
	$(PIP) install -q torch==2.14.1 torchvision==0.29.1
	# sam2 is an sdist: build it against the torch above (an isolated build fetches another torch),
	# without its optional CUDA extension (only a post-processing speed-up).
	SAM2_BUILD_CUDA=0 $(PIP) install -q --no-build-isolation sam2==1.1.0
	$(PIP) install -q -e ".[dev]"
	# The browser test drives Debian's Chromium through Playwright (which never downloads a browser here).
	command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null \
		&& apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } \
		|| echo "WARNING: /usr/bin/chromium missing and not installable here: the browser test will be skipped"
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

install: $(STAMP)

# Main job on the embedded default: demo slides (generated on first run) -> ingestion -> segmentation.
run: install
	$(VENV)/bin/kedro run

lint: install
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/ruff format --check src tests bench

test: install lint
	$(VENV)/bin/pytest

bench: install
	$(PY) bench/tissue_bench.py
	$(PY) bench/segmentation_node_bench.py
	$(PY) bench/bm_graz.py ../shared/data/MICCAI2015_bone_marrow/BM_GRAZ bench/results/bm_graz.json
	taskset -c 0 $(PY) bench/real_tissue.py
	$(PY) bench/gpu_bench.py
	$(PY) bench/tile_edges.py
	$(PY) bench/faults.py
	$(PY) bench/czi_subblock_enumeration.py
	$(PY) bench/scale_out.py
	$(PY) bench/demo_study.py
	$(PY) bench/export_bench.py
	$(PY) bench/annotation_server_bench.py
	$(PY) bench/classification.py --project .

clean-data:
	find data -mindepth 2 ! -name .gitkeep -delete
