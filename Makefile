# Two entry points for a fresh machine; each sets up what it needs on its own.
#   make demo   distil real Fashion-MNIST on this machine with pipelines/demo.yaml, draw it
#   make test   the whole test suite
PYTHON ?= python3
VENV   := .venv
FASHION_MNIST := /usr/share/datasets/fashion-mnist

.PHONY: demo test setup data

setup: $(VENV)/.installed data

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -c constraints.txt -e '.[dev]'
	touch $@

# Real Fashion-MNIST: Debian's package where we can install it, else torchvision's download
# into data/raw/FashionMNIST/raw/, where ingest looks when data.source is "" (pipelines/demo.yaml).
data:
	@if [ -d $(FASHION_MNIST) ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || \
		{ apt-get update -q >/dev/null && apt-get install -y -q dataset-fashion-mnist >/dev/null; }; \
	else \
		$(VENV)/bin/python -c "import torchvision; torchvision.datasets.FashionMNIST('data/raw', download=True)"; \
	fi

# Ends by drawing the run: runs/demo/show/{synthetic,init,loss,accuracy}.png
demo: setup
	$(VENV)/bin/ead-dist run pipelines/demo.yaml
	$(VENV)/bin/ead-dist show runs/demo

test: setup
	$(VENV)/bin/python -m pytest -q
