# Every target creates .venv (Python 3.11) on first use; `make test` also creates .venv-nemo
# (NeMo 2.7.3, for the NeMo export check); nothing else needs installing.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.setup-stamp

# A separate environment with NeMo 2.7.3 (which conflicts with the main stack) used only by
# tests/test_nemo_export.py to verify `convert mcore-to-nemo` with NeMo itself (docs/nemo.md).
NEMO_VENV  := .venv-nemo
NEMO_STAMP := $(NEMO_VENV)/.setup-stamp

.PHONY: setup setup-nemo slurm-up test demo clean

setup: $(STAMP)

setup-nemo: $(NEMO_STAMP)

$(NEMO_STAMP): tests/nemo/requirements.txt
	test -x $(NEMO_VENV)/bin/python || $(PYTHON) -m venv $(NEMO_VENV)
	$(NEMO_VENV)/bin/pip install -q --upgrade pip
	$(NEMO_VENV)/bin/pip install -q torch==2.13.0
	$(NEMO_VENV)/bin/pip install -q -r tests/nemo/requirements.txt
	touch $(NEMO_STAMP)

$(STAMP): setup.py constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e '.[test,eval,tracking]'
	touch $(STAMP)

# A real one-node SLURM cluster for the launch tests and a two-node one (network namespaces)
# for tests/test_multinode.py (installs slurm-wlm + munge from Debian when missing; needs root).
# If one cannot start, its tests fail with the reason.
slurm-up:
	-bash slurm/local/cluster.sh start
	-bash slurm/local/cluster.sh start --nodes 2

test: setup setup-nemo slurm-up
	$(BIN)/python -m pytest -q tests

demo: setup
	$(BIN)/megatron-cpt demo --out demo_out

clean:
	rm -rf $(VENV) $(NEMO_VENV) demo_out
