# Two commands on a fresh machine: `make demo` and `make test`. Each builds .venv on first use.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
# CPU machines get the CPU wheel (cached on these machines); CUDA machines get the default wheel.
TORCH  ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo "torch>=2.4,<2.15" || echo "torch==2.13.0")
export RAY_USAGE_STATS_ENABLED := 0

.PHONY: install demo test browser bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip 2>&1 | grep -v "is ignored" || true
	$(PY) -m pip install -q "$(TORCH)" 2>&1 | grep -v "is ignored" || true
	$(PY) -m pip install -q -e '.[dev]' 2>&1 | grep -v "is ignored" || true
	$(PY) -c "import torch, ray, deepspeed, model, jobs"
	rm -f $(VENV)/.installed-* && touch $@

demo: $(STAMP)
	$(PY) -m jobs.prepare  --config configs/demo.yaml
	$(PY) -m jobs.pretrain --config configs/demo.yaml
	$(PY) -m jobs.generate --config configs/demo.yaml
	$(PY) -m jobs.report runs/demo
	@echo "run directory: $(CURDIR)/runs/demo/pretrain (metrics.jsonl, loss.png, tensorboard/, checkpoint_*/)"
	@echo "report: $(CURDIR)/runs/demo/report.html (open it in a browser; it works offline)"

test: $(STAMP) browser
	$(PY) -m pytest -q --durations=25 tests

# tests/test_console.py drives Debian's headless Chromium; without it (and without root or
# sudo to install it) that test skips, saying so loudly.
browser:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ]; then SUDO=; elif sudo -n true 2>/dev/null; then SUDO="sudo -n"; \
	else echo "*** no chromium/chromedriver and no root to install them: the web console's browser test will be SKIPPED ***"; exit 0; fi; \
	command -v apt-get >/dev/null || { echo "*** no apt-get: install chromium and chromedriver yourself, or the browser test is SKIPPED ***"; exit 0; }; \
	$$SUDO apt-get install -y -q --no-install-recommends chromium chromium-driver >/dev/null 2>&1 || \
	{ $$SUDO apt-get update -q >/dev/null 2>&1 && $$SUDO apt-get install -y -q --no-install-recommends chromium chromium-driver >/dev/null 2>&1; } || \
	echo "*** installing chromium and chromium-driver failed: the web console's browser test will be SKIPPED ***"

bench: $(STAMP)
	$(PY) bench/train_step.py --preset tiny gpt2-124m --threads 1

clean:
	rm -rf $(VENV) runs .pytest_cache
