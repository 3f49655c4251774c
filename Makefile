# fedyolo: `make demo` runs the default federation, `make test` runs the suite.
# Both create .venv on first use (torch 2.14.1 / torchvision 0.29.1 come from the machine's
# local wheel store; everything else is pinned in pyproject.toml, indirect packages in
# deploy/docker/lock-amd64.txt).
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: venv checkov demo test test-fast lint bench clean images images-offline images-arm64 \
        docs docs-serve compose compose-down

# On x86_64 every package, indirect ones too, is held at the images' lock (the tested set).
LOCK   := deploy/docker/lock-amd64.txt
CONSTRAINT := $(if $(filter x86_64,$(shell uname -m)),--constraint $(LOCK),)

$(STAMP): pyproject.toml $(LOCK)
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) (fedyolo is tested on CPython 3.11)"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade "pip==25.3"
	$(BIN)/python -m pip install --quiet "torch==2.14.1" "torchvision==0.29.1"
	$(BIN)/python -m pip install --quiet $(CONSTRAINT) -e ".[dev]"
	touch $(STAMP)

venv: $(STAMP)

# The AWS CLI the EC2 boot script calls, for `fedyolo deploy aws rehearse` (its own venv: awscli
# pins a botocore other than boto3's).
AWS_CLI := .venv-aws/bin/aws
$(AWS_CLI):
	$(PYTHON) -m venv .venv-aws
	.venv-aws/bin/python -m pip install --quiet "awscli==1.45.11"

demo: $(STAMP)
	$(BIN)/fedyolo run name=demo output.overwrite=true

# The e2e tier (-m e2e) and the rest (-m "not e2e") run side by side, each its own pytest session
# (tests/tiers.py: the e2e tier waits on one core much of the time); FEDYOLO_TEST_SERIAL=1 runs
# them one after the other. A tier that collects no test fails (pytest's exit status 5).
# More pytest arguments for both: make test PYTEST_ARGS="-x".
test: $(STAMP) $(AWS_CLI)
	$(BIN)/python tests/tiers.py $(PYTEST_ARGS)

# checkov (scans the CloudFormation template, tests/deploy/test_aws_template.py) in a venv of its
# own: its pins are not fedyolo's and must not change .venv's.
CHECKOV := .venv-checkov/bin/checkov
$(CHECKOV):
	$(PYTHON) -m venv .venv-checkov
	.venv-checkov/bin/python -m pip install --quiet "checkov==3.3.30"

checkov: $(CHECKOV)

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not e2e"

# Container images (BuildKit). On a machine that reaches no registry or index from containers:
# `make images-offline` (a local debootstrap base and a wheelhouse; needs root and debootstrap).
images: $(STAMP)
	$(BIN)/fedyolo deploy images

images-offline: $(STAMP)
	$(BIN)/fedyolo deploy images --offline

# A small federation in containers: 2 clients x 2 rounds of the tiny model (builds the images
# when missing or outdated: offline with OFFLINE=true, the default). `make compose-down
# RUN=runs/<name>` removes what a run with engine.keep=true left.
OFFLINE ?= true
compose: $(STAMP)
	$(BIN)/fedyolo run engine=compose engine.offline=$(OFFLINE) name=compose-demo \
	  output.overwrite=true model=tiny data.synth.images=96 data.synth.imgsz=64 train.imgsz=64 \
	  train.batch=8 federation.clients=2 federation.rounds=2

compose-down: $(STAMP)
	@test -n "$(RUN)" || { echo "usage: make compose-down RUN=runs/<name>" >&2; exit 2; }
	$(BIN)/fedyolo deploy down $(RUN)

# The linux/arm64 client (edge devices, Graviton), offline; on an x86_64 host it needs
# qemu-user-static + binfmt-support (docs/how-to/edge-arm64.md).
images-arm64: $(STAMP)
	$(BIN)/fedyolo deploy images --offline --platform linux/arm64

# The documentation site (mkdocs-material; nothing is downloaded): site/, or served on :8000.
docs: $(STAMP)
	$(BIN)/python -m mkdocs build --strict

docs-serve: $(STAMP)
	$(BIN)/python -m mkdocs serve --dev-addr 127.0.0.1:8000

lint: $(STAMP)
	$(BIN)/ruff check fl_server fl_client strategies tuning deploy tests benchmarks
	$(BIN)/ruff format --check fl_server fl_client strategies tuning deploy tests benchmarks

clean:
	rm -rf runs .fedyolo .pytest_cache
