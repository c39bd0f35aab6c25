# dynacc: every target sets itself up from nothing (venv + packages) on first use.
PYTHON  ?= python3
VENV    ?= .venv
PY      := $(VENV)/bin/python
TORCH   ?= torch==2.13.0
MODEL   ?= resnet50
HW      ?=
JOBS    ?= auto
STAMP   := $(VENV)/.dynacc-setup

.PHONY: setup test test-fast gen deploy bench fpga clean help

help:
	@echo "make gen MODEL=resnet50 [HW=configs/hw/default.yaml]   generate RTL + layer program + reports"
	@echo "make test                                             unit tests + RTL co-simulation"
	@echo "make deploy MODEL=resnet20 CHECKPOINT=ckpt.pt          export weights, exponents, layer program"
	@echo "make fpga MODEL=resnet50 [DEVICE=ecp5-85k]            yosys + nextpnr-ecp5: resources, Fmax, fps"
	@echo "make bench                                            long benchmarks -> build/bench/*.json"

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev,fpga]"
	@touch $@

setup: $(STAMP)

test: setup
	$(PY) -m pytest -n $(JOBS) -q tests sim

test-fast: setup
	$(PY) -m pytest -n $(JOBS) -q tests

gen: setup
	$(PY) -m dynacc.gen --model $(MODEL) $(if $(HW),--hw $(HW))

deploy: setup
	$(PY) sw/deploy.py --model $(MODEL) $(if $(HW),--hw $(HW)) $(if $(CHECKPOINT),--checkpoint $(CHECKPOINT)) --out build/deploy/$(MODEL)

DEVICE  ?= ecp5-85k

fpga: setup
	$(PY) -m dynacc.gen.fpga --model $(MODEL) $(if $(HW),--hw $(HW)) --device $(DEVICE)

bench: setup
	$(PY) bench/run_all.py

clean:
	rm -rf build
