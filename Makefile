# Switchyard: `make serve` and `make test` each set everything up from nothing.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
REPOSITORY ?= models
PYTEST_ARGS ?=

.PHONY: serve test check bench demo protos check-protos lint typecheck clean models models-tvm tuning redis kubectl promtool peers

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[models,compile,dev]'
	@touch $(STAMP)

# Regenerate the protobuf and gRPC code from protos/*.proto (committed; a test
# fails when it is stale).
protos: $(STAMP)
	$(PY) -m protos.generate --out .

check-protos: $(STAMP)
	$(PY) -m protos.generate --check

# The demo model repository, built from code (trained and exported here, nothing downloaded).
$(REPOSITORY)/.built: $(STAMP) $(wildcard backends/demo/*.py)
	$(PY) -m backends.demo --repository $(REPOSITORY)
	@touch $@

models: $(REPOSITORY)/.built

# Tuned TVM variants of the demo models for this CPU, from the tuning records committed in
# backends/compile/tvm/tuning_records/ (applied, not tuned; a CPU without records for its target gets
# none). Opt-in: the default demo repository serves ONNX Runtime variants.
models-tvm: models
	$(PY) -m backends.compile.tvm.tuning apply --repository $(REPOSITORY)

# Tunes the demo models for this CPU with MetaSchedule and rewrites their committed records
# (up to an hour per model on two cores; continues from the records in .bench/tuning/).
# TUNING_TRIALS: the budget per model (default: the committed records' budget).
TUNING_TRIALS ?=
tuning: models
	$(PY) -m backends.compile.tvm.tuning tune --repository $(REPOSITORY) $(if $(TUNING_TRIALS),--trials $(TUNING_TRIALS))

serve: models
	$(VENV)/bin/switchyard serve

# The static checks before the tests: style, strict types, and the walls between the
# planes (import-linter contracts in pyproject.toml).
test: models check redis kubectl promtool peers
	$(PY) -m pytest -q $(PYTEST_ARGS)

# KServe 0.21 in a virtualenv of its own (its protobuf modules clash with ours in one
# process): the foreign-backend tests and the bench run it as a peer.
peers: $(STAMP)
	$(PY) -m gateway.bench.peers_venv .bench/peers-venv

# The shared-state tests and bench run a redis-server of their own (Debian's package),
# installed here as root where apt-get can; elsewhere those tests skip, saying why.
redis:
	@command -v redis-server >/dev/null || { test "$$(id -u)" = 0 && command -v apt-get >/dev/null \
		&& { apt-get install -y -q redis-server >/dev/null 2>&1 \
		     || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q redis-server >/dev/null 2>&1; }; }; } \
		|| echo "redis-server not installed (apt-get install redis-server): the shared-state tests will skip"

# The Kubernetes manifests' tests render them with `kubectl kustomize` (Debian's
# kubernetes-client), installed here as root where apt-get can; elsewhere they skip.
kubectl:
	@command -v kubectl >/dev/null || { test "$$(id -u)" = 0 && command -v apt-get >/dev/null \
		&& { apt-get install -y -q kubernetes-client >/dev/null 2>&1 \
		     || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q kubernetes-client >/dev/null 2>&1; }; }; } \
		|| echo "kubectl not installed (apt-get install kubernetes-client): the Kubernetes manifest tests will skip"

# The dashboard and alert tests run promtool (Debian's prometheus package, without its
# recommended node exporter), installed here as root where apt-get can; elsewhere they skip.
promtool:
	@command -v promtool >/dev/null || { test "$$(id -u)" = 0 && command -v apt-get >/dev/null \
		&& { apt-get install -y -q --no-install-recommends prometheus >/dev/null 2>&1 \
		     || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q --no-install-recommends prometheus >/dev/null 2>&1; }; }; } \
		|| echo "promtool not installed (apt-get install prometheus): the promtool checks of the rules and dashboard will skip"

check: $(STAMP)
	$(VENV)/bin/ruff check gateway backends tests protos/generate.py
	$(VENV)/bin/ruff format --check gateway backends tests protos/generate.py
	$(VENV)/bin/mypy gateway backends tests protos/generate.py
	$(VENV)/bin/lint-imports

lint typecheck: check

# The price-spike scenario played live on its fleet, fastest-only replayed beside it:
# prints the tables and the path of the chart (reports/demo/report.png).
demo: models
	$(PY) -m gateway.loadtest.demo

# Fuzzed requests in `make bench` (1,000,000 take about 40 minutes on two shared cores).
FUZZ_REQUESTS ?= 20000

bench: models redis
	$(PY) -m gateway.bench --repository $(REPOSITORY) --out BENCHMARKS.md
	$(PY) -m backends.demo --repository .bench/hop-models tinyconv midconv
	$(PY) -m gateway.bench --repository .bench/hop-models --models tinyconv midconv --section hop --out BENCHMARKS.md
	$(PY) -m gateway.bench.variants --repository $(REPOSITORY) --out BENCHMARKS.md
	$(PY) -m gateway.bench.routing --out BENCHMARKS.md
	$(PY) -m gateway.bench.simulation --out BENCHMARKS.md
	$(PY) -m gateway.bench.load --out BENCHMARKS.md
	$(PY) -m gateway.bench.fuzz --repository $(REPOSITORY) --requests $(FUZZ_REQUESTS) --out BENCHMARKS.md
	$(PY) -m gateway.bench.overload --repository $(REPOSITORY) --out BENCHMARKS.md
	$(PY) -m gateway.bench.overload_gateway --repository $(REPOSITORY) --out BENCHMARKS.md
	$(PY) -m gateway.bench.rest --repository $(REPOSITORY) --out BENCHMARKS.md
	$(PY) -m gateway.bench.shared_state --out BENCHMARKS.md

clean:
	rm -rf $(VENV) $(REPOSITORY) .pytest_cache
