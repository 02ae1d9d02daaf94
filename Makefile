# Two commands for a fresh machine:
#   make demo   set up, generate the mini-benchmark, run the smoke sweep (CPU is fine), write its report
#   make test   set up, run the test suite
# Set-up creates or refreshes the virtual environment .venv and makes WordNet 3.0 available.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.itl_ray-installed
MINI := data/mini
SHARDS := data/mini-shards

.PHONY: setup wordnet demo test clean

setup: $(STAMP) wordnet

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $@

# WordNet 3.0 for nltk: nltk's own data when present, else Debian's wordnet-base and
# wordnet-sense-index packages copied into a corpus folder inside the venv.
wordnet: $(STAMP)
	@if $(PY) -c "from itl_ray import wordnet; wordnet.load()" 2>/dev/null; then \
	  echo "WordNet 3.0: ready"; \
	else \
	  if [ ! -f /usr/share/wordnet/data.noun ] || [ ! -f /usr/share/wordnet/index.sense ]; then \
	    if command -v apt-get >/dev/null; then \
	      SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	      $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq wordnet-base wordnet-sense-index >/dev/null; \
	    else \
	      echo "error: WordNet 3.0 missing; run: python -c \"import nltk; nltk.download('wordnet')\"" >&2; exit 1; \
	    fi; \
	  fi; \
	  $(PY) -m itl_ray.wordnet --install; \
	fi

$(MINI)/SYNTH_INFO.json: | setup
	$(VENV)/bin/itl-ray synth $(MINI)

# The mini-benchmark goes through the same path as real data: its roots are prepared into shards.
$(SHARDS)/sun397/PREPARED.json: $(MINI)/SYNTH_INFO.json
	$(VENV)/bin/itl-ray prepare imagenet $(MINI)/ILSVRC2012 $(SHARDS)/imagenet
	$(VENV)/bin/itl-ray prepare voc2007 $(MINI)/VOCdevkit $(SHARDS)/voc2007
	$(VENV)/bin/itl-ray prepare voc2012-action $(MINI)/VOCdevkit $(SHARDS)/voc2012-action
	$(VENV)/bin/itl-ray prepare sun397 $(MINI)/SUN397 $(SHARDS)/sun397

demo: setup $(SHARDS)/sun397/PREPARED.json
	$(VENV)/bin/itl-ray sweep sweeps/smoke.yaml
	$(VENV)/bin/itl-ray report --experiment smoke
	@echo "report: '$(CURDIR)/itl_runs/report/smoke/report.html'"
	@echo "compare runs: '$(CURDIR)/$(VENV)/bin/mlflow' ui --backend-store-uri 'sqlite:///$(CURDIR)/itl_runs/mlflow.db'"

test: setup
	$(PY) -m pytest -q tests

clean:
	rm -rf itl_runs $(MINI) $(SHARDS)
