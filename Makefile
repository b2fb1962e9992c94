# Two commands on a fresh machine: `make demo` and `make test`.
# Both create (once) and reuse the virtual environment in .venv.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# DeepSpeed picks its accelerator at import; without a GPU it must be told to use the CPU.
export DS_ACCELERATOR ?= cpu

.PHONY: demo demo-toy test test-fast install clean

install: $(STAMP)

# torch first and pinned (a CUDA build that also runs on CPU): DeepSpeed builds from source
# against the installed torch, hence --no-build-isolation for the project install. The bench
# extra too: a test checks the benchmark's diffusers Latte and CogVideoX arms.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install --quiet --no-build-isolation -e '.[test,bench]'
	touch $(STAMP)

# A prompt through the shipped cascade (checkpoints/tiny): mp4, GIF and contact sheet in outputs/.
demo: $(STAMP)
	$(PY) sample.py --prompt "a red circle moving right on a gray background" --out outputs/demo.mp4 --gif --sheet

# The samplers on a 2D toy distribution with its exact denoiser: outputs/toy2d/samplers.png.
demo-toy: $(STAMP)
	$(PY) -m dit_video.toy2d configs/toy/samplers2d.yaml

# pytest exits 5 when it collected nothing: for this suite that is a failure, said plainly.
test: $(STAMP)
	$(PY) -m pytest || { rc=$$?; [ $$rc -ne 5 ] || echo "make test: pytest collected no tests" >&2; exit $$rc; }

test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow"

clean:
	rm -rf $(VENV) outputs .pytest_cache
