# The two commands README.md gives a newcomer: `make demo` and `make test`.
SHELL := /bin/bash
CARGO ?= cargo

.PHONY: demo demo-stop test deps fmt lint unit cluster sim soak afl bench deb

# A local cluster: 3 coordinators + 1 hypervisor on loopback, then `herd status`.
demo: deps
	$(CARGO) build --bin herd
	deploy/demo.sh

demo-stop:
	deploy/demo.sh stop

# Everything CI runs: system packages if missing, formatting, lints, every test layer.
test: deps fmt lint
	$(CARGO) test --workspace --all-targets
	$(MAKE) sim

# The deterministic simulation (tests/sim, its own workspace and target directory: it builds
# with --cfg tokio_unstable). The CI seed set, the determinism check, the broken variants.
sim:
	cd tests/sim && $(CARGO) fmt -- --check
	cd tests/sim && $(CARGO) clippy --all-targets -- -D warnings
	cd tests/sim && $(CARGO) test

# Many more seeds: make soak SEEDS=1000
SEEDS ?= 1000
soak:
	cd tests/sim && HERD_SIM_SEEDS=$(SEEDS) $(CARGO) test --test seeds soak -- --ignored --nocapture

# Longer fuzzing with AFL++ (cargo afl, fuzz/: its own workspace): make afl SECONDS=600
SECONDS ?= 600
afl:
	fuzz/run.sh $(SECONDS)

deps:
	deploy/install-deps.sh

fmt:
	$(CARGO) fmt --all -- --check

lint:
	$(CARGO) clippy --workspace --all-targets -- -D warnings

# Single layers, for a quicker loop while working.
unit:
	$(CARGO) test --workspace --lib --bins
cluster:
	$(CARGO) test --test cluster

# Benchmarks measure (never part of `make test`): a table on stdout, JSON in target/bench/.
bench:
	deploy/install-deps.sh --bench
	$(CARGO) build --release --bin herd
	$(CARGO) run --release -p herd-bench --features etcd -- all

# A Debian package (installs cargo-deb from crates.io if missing).
deb:
	command -v cargo-deb >/dev/null || $(CARGO) install cargo-deb --locked
	$(CARGO) build --release --bin herd
	mkdir -p target/assets
	target/release/herd completions bash > target/assets/herd.bash
	target/release/herd completions zsh > target/assets/_herd
	target/release/herd completions fish > target/assets/herd.fish
	target/release/herd man > target/assets/herd.1
	$(CARGO) deb --no-build -p herd
	dpkg-deb -c target/debian/herd_*.deb
