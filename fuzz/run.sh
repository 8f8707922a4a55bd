#!/usr/bin/env bash
# Longer fuzzing runs with AFL++ (cargo afl, stable Rust) of every decoder that reads bytes from
# outside. Not part of `make test` (the proptest pass in tests/fuzz.rs is).
#
#   fuzz/run.sh [SECONDS per target, default 600] [TARGET ...]
#
# Targets: cluster_frame heartbeat_datagram admin_request config fence_agent_output.
# Findings land in fuzz/out/TARGET/default/{crashes,hangs}; a summary line per target is printed.
set -euo pipefail
cd "$(dirname "$0")"
secs=${1:-600}
shift || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    targets=(cluster_frame heartbeat_datagram admin_request config fence_agent_output)
fi
command -v cargo-afl >/dev/null || cargo install cargo-afl --locked
# AFL++ itself, built once per toolchain (cargo afl keeps it under its data directory).
out=$(cargo afl config --build 2>&1) || echo "$out" | grep -q "already built" || { echo "$out"; exit 1; }
cargo afl build --release --bins
./target/release/make_seeds seeds
export AFL_NO_UI=1 AFL_SKIP_CPUFREQ=1 AFL_I_DONT_CARE_ABOUT_MISSING_CRASHES=1 AFL_QUIET=1
for t in "${targets[@]}"; do
    rm -rf "out/$t" && mkdir -p out
    cargo afl fuzz -i "seeds/$t" -o "out/$t" -V "$secs" "target/release/$t" >"out-$t.log" 2>&1 || {
        echo "$t: afl-fuzz failed (see fuzz/out-$t.log)"; tail -20 "out-$t.log"; exit 1; }
    stats="out/$t/default/fuzzer_stats"
    get() { sed -n "s/^$1 *: *//p" "$stats"; }
    echo "$t: ${secs}s, $(get execs_done) execs, corpus $(get corpus_count), crashes $(get saved_crashes), hangs $(get saved_hangs)"
done
