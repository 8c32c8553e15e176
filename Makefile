# The two commands of the README: `make demo` and `make test`.
# Each installs what it needs first (Debian packages, .venv, the compiled core).
PY := .venv/bin/python
LISTENERS ?= 2000
DURATION ?= 10

FUZZ_SECONDS ?= 60

.PHONY: setup demo test test-fast lint bench bench-full bench-xdp bench-quic bench-hls bench-cluster bench-chaos bench-sim bench-speakers bench-flood fuzz sanitize tsan dist deploy-check annotate clean

setup:
	@./scripts/bootstrap.sh

demo: setup
	$(PY) -m relay demo --listeners $(LISTENERS) --seconds $(DURATION)

test:
	@./scripts/bootstrap.sh test
	$(PY) -m pytest -q -n 2 --dist loadfile -m "not solo" --durations=25
	$(PY) -m pytest -q -m solo --durations=10

lint: setup
	.venv/bin/ruff check relay tests bench fuzz deploy
	.venv/bin/mypy relay

# the core's behaviour tests only, for a quick loop while editing
test-fast: setup
	$(PY) -m pytest -q tests/core/test_core_rings.py tests/core/test_core_model.py tests/core/test_core_safety.py tests/wire/test_protocol.py

# the relay against the C limit and its peers: JSON, bench/RESULTS.md, plots
bench:
	@./scripts/bootstrap.sh bench
	$(PY) bench/run.py

bench-full:
	@./scripts/bootstrap.sh bench
	$(PY) bench/run.py --full

# AF_XDP egress against the sendmmsg limit on a veth pair (root): bench/results/xdp.json
bench-xdp:
	@./scripts/bootstrap.sh bench
	$(PY) bench/xdp.py

# QUIC listeners beside UDP ones: per core-second and callgrind instructions
bench-quic:
	@./scripts/bootstrap.sh bench
	$(PY) bench/quic.py

# LL-HLS: glass-to-glass latency, mux CPU per room, requests per core-second, origin load behind nginx
bench-hls:
	@./scripts/bootstrap.sh test
	$(PY) bench/hls.py

# unknown traffic at the listener port, rising to as fast as one core sends it: the rate at which the first
# legitimate session expires, a join takes over 1 s or audio is lost (bench/flood.py; root, for the raw socket)
bench-flood:
	@./scripts/bootstrap.sh bench
	$(PY) bench/flood.py

# a tree of nodes with a Redis directory: origin cost, a join storm, failover, a Redis outage
bench-speakers:
	@./scripts/bootstrap.sh bench
	$(PY) bench/speakers.py

bench-cluster:
	@./scripts/bootstrap.sh test
	$(PY) bench/cluster.py

# parts of a live tree killed one at a time (origins, mids, an edge, the publisher, Redis): what listeners hear
bench-chaos:
	@./scripts/bootstrap.sh test
	$(PY) bench/chaos.py
	$(PY) bench/stage_pair.py

# the event of docs/capacity.md by simulation, no sockets: 1.3 M joins at 40 edges, 4 of them killed, through the
# real admission and routing code; about 2 minutes of CPU (bench/cluster_sim.py --smoke: seconds)
bench-sim:
	@./scripts/bootstrap.sh
	$(PY) bench/cluster_sim.py

# every parser of untrusted bytes under atheris, FUZZ_SECONDS each
fuzz: setup
	@mkdir -p build/fuzz
	for t in control rtcp token rtp stream; do \
	  mkdir -p build/fuzz/$$t; \
	  $(PY) fuzz/fuzz_parsers.py $$t -max_total_time=$(FUZZ_SECONDS) build/fuzz/$$t || exit 1; \
	done

# the core's tests on an AddressSanitizer + UBSan build
sanitize: setup
	./scripts/sanitize.sh address

# the core's tests (sender threads included) on a ThreadSanitizer build; any report fails
tsan: setup
	./scripts/sanitize.sh thread

# the edge node as one executable (build/dist/relay) and the wheel, both checked
dist: setup
	./scripts/dist.sh

# the systemd unit (systemd-analyze verify) and the deploy files
deploy-check: setup
	./scripts/check_deploy.sh

# Cython's annotated HTML: the per-packet loops must show no Python interaction
# (relay/_core.html, built with the same directives as the extension)
annotate: setup
	RELAY_ANNOTATE=1 $(PY) setup.py -q build_ext --inplace --force

clean:
	rm -rf build .venv *.egg-info relay/*.so relay/_core.c relay/testing/*.so relay/testing/_crowd.c
