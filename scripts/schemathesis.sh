#!/usr/bin/env bash
# Fuzzes the REST service against openapi.yaml with schemathesis and fails on any 5xx
# answer or any response that does not match the documented schema (the summaries list
# each 5xx answer with a request that got it):
#   1. `vmmd --fake` (in-memory backend) on a free loopback port, from a fresh service;
#   2. the same with a running VM made beforehand;
#   3. the real KVM backend, `vmmd --allowed-dir /tmp/vmm-example`, when /dev/kvm can be
#      opened and VMM_TEST_NO_KVM is not set (a PARTIAL line otherwise): the examples phase creates, boots and changes the
#      VMs of openapi.yaml's examples (they boot the test guest), and the stateful phase
#      follows the document's OpenAPI links (vm.create -> vm.boot -> vm.add-disk ->
#      vm.update-disk ...);
#   4. a single `vmm --api-socket` process (KVM, same conditions) serving one test-guest
#      VM created at start: the same API without ?id=, fuzzed and along the links.
# vmmd runs every VM in a `vmm` process of its own (in runs 1 and 2 a fake one), so every
# VM-scoped call goes through vmmd's routing. GET events (a never-ending stream) is left
# out.
# openapi.yaml's examples name files under /tmp/vmm-example (the test guest's ELF as
# guest.elf, 4 MiB images disk0.raw..disk3.raw): the script creates that directory and
# removes it at the end, so two runs must not overlap on one host. After each run it
# prints how many requests got a 2xx answer, per operation (from schemathesis' HAR
# report). schemathesis (pinned) is installed from PyPI into a venv under target/; the
# script prints a SKIP line and succeeds only when PyPI cannot be reached.
#
# Environment: ST_MAX_EXAMPLES (default 20) test cases per operation and phase,
# ST_STATEFUL_TIME (default 30) seconds of stateful scenarios against the KVM backend,
# ST_TIMEOUT (default 300) seconds for each schemathesis run, ST_SEED to replay a run.
set -euo pipefail
cd "$(dirname "$0")/.."

ST_VERSION=4.32.5
venv=target/st-venv
max_examples=${ST_MAX_EXAMPLES:-20}
budget=${ST_TIMEOUT:-300}
stateful_time=${ST_STATEFUL_TIME:-30}

# --- schemathesis in a venv --------------------------------------------------------
pypi_reachable() {
    python3 - <<'EOF'
import os, sys, urllib.request
url = os.environ.get("PIP_INDEX_URL", "https://pypi.org/simple/").rstrip("/") + "/schemathesis/"
try:
    urllib.request.urlopen(url, timeout=20).close()
except Exception as e:  # any failure to fetch the index page means unreachable
    print(f"{url}: {e}", file=sys.stderr)
    sys.exit(1)
EOF
}

installed_version() {
    "$venv/bin/python" -c 'import importlib.metadata as m; print(m.version("schemathesis"))' \
        2>/dev/null || true
}

if [[ "$(installed_version)" != "$ST_VERSION" ]]; then
    if ! python3 -m venv --help >/dev/null 2>&1; then
        echo "schemathesis.sh: python3 with the venv module is needed (apt-get install python3-venv)" >&2
        exit 1
    fi
    [[ -x "$venv/bin/pip" ]] || python3 -m venv "$venv"
    echo "== installing schemathesis $ST_VERSION into $venv"
    if ! "$venv/bin/pip" install --quiet "schemathesis==$ST_VERSION"; then
        if ! pypi_reachable; then
            echo "SKIP schemathesis: PyPI is unreachable, schemathesis cannot be installed"
            exit 0
        fi
        echo "schemathesis.sh: installing schemathesis $ST_VERSION failed" >&2
        exit 1
    fi
fi

# --- vmmd, the test guest, the example directory ------------------------------------
cargo build --quiet -p api --bin vmmd --bin vmm
# The test guest, built the way tests/src/test_guest.rs builds it.
guest_target=$PWD/target/guest
(
    cd tests/guest
    env -u RUSTFLAGS -u CARGO_BUILD_RUSTFLAGS -u CARGO_BUILD_TARGET -u CARGO_TARGET_DIR \
        CARGO_ENCODED_RUSTFLAGS=-Crelocation-model=static \
        cargo build --quiet --release --manifest-path Cargo.toml --target-dir "$guest_target"
)
guest_elf=$guest_target/release/test-guest
if [[ ! -f "$guest_elf" ]]; then
    echo "schemathesis.sh: building the test guest did not produce $guest_elf" >&2
    exit 1
fi

# Fixed: openapi.yaml's examples name these paths.
example_dir=/tmp/vmm-example
workdir=$(mktemp -d)
vmmd_pid=
vmmd_log=
base=

# Deletes every VM, then stops vmmd the way a client does (vmm.shutdown); kills it if it
# does not exit.
stop_vmmd() {
    [[ -n "$vmmd_pid" ]] || return 0
    if kill -0 "$vmmd_pid" 2>/dev/null; then
        local ids id
        ids=$(curl -fsS --max-time 10 "$base/api/v1/vms" 2>/dev/null |
            python3 -c 'import json, sys; print("\n".join(v["id"] for v in json.load(sys.stdin)))' \
                2>/dev/null || true)
        while IFS= read -r id; do
            [[ -n "$id" ]] || continue
            curl -sS -o /dev/null --max-time 30 -X PUT -G --data-urlencode "id=$id" \
                "$base/api/v1/vm.delete" || true
        done <<<"$ids"
        curl -sS -o /dev/null --max-time 30 -X PUT "$base/api/v1/vmm.shutdown" || true
        for _ in $(seq 100); do
            kill -0 "$vmmd_pid" 2>/dev/null || break
            sleep 0.1
        done
        kill "$vmmd_pid" 2>/dev/null || true
    fi
    wait "$vmmd_pid" 2>/dev/null || true
    vmmd_pid=
}

cleanup() {
    stop_vmmd
    rm -rf "$workdir" "$example_dir"
}
trap cleanup EXIT

make_example_dir() {
    rm -rf "$example_dir"
    mkdir -p "$example_dir"
    cp "$guest_elf" "$example_dir/guest.elf"
    local i
    for i in 0 1 2 3; do
        truncate -s 4M "$example_dir/disk$i.raw"
    done
}

# start_vmmd NAME [vmm] ARGS...: vmmd (or, after `vmm`, a single `vmm` process) with ARGS
# on a free loopback port; sets vmmd_pid, base.
start_vmmd() {
    local name=$1 port
    shift
    port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    base="http://127.0.0.1:$port"
    vmmd_log="$workdir/$name.log"
    local binary=vmmd
    if [[ "${1:-}" == vmm ]]; then
        binary=vmm
        shift
    else
        set -- "$@" --state-dir "$workdir/$name-state"
    fi
    RUST_LOG=${RUST_LOG:-warn} VMM_LOG=${VMM_LOG:-warn} target/debug/$binary "$@" \
        --api-socket "$workdir/$name.sock" --tcp "127.0.0.1:$port" >"$vmmd_log" 2>&1 &
    vmmd_pid=$!
    for _ in $(seq 100); do
        curl -fsS "$base/api/v1/vmm.ping" >/dev/null 2>&1 && break
        if ! kill -0 "$vmmd_pid" 2>/dev/null; then
            echo "schemathesis.sh: vmmd exited:" >&2
            cat "$vmmd_log" >&2
            exit 1
        fi
        sleep 0.1
    done
    curl -fsS "$base/api/v1/vmm.ping" >/dev/null
}

# summarize NAME HAR...: requests and 2xx answers, in all and per operation (requests to
# undocumented methods, answered 405, on one line).
summarize() {
    python3 - "$@" <<'EOF' || true
import collections, json, sys, urllib.parse
name, paths = sys.argv[1], sys.argv[2:]
ops = collections.defaultdict(collections.Counter)
for path in paths:
    try:
        with open(path) as f:
            entries = json.load(f)["log"]["entries"]
    except (OSError, ValueError, KeyError) as e:
        print(f"== {name}: no HAR report {path} ({e})")
        continue
    for e in entries:
        status = e["response"]["status"]
        op = e["request"]["method"] + " " + urllib.parse.urlsplit(e["request"]["url"]).path
        ops["(other methods)" if status == 405 else op][status] += 1
def ok(c):
    return sum(n for s, n in c.items() if 200 <= s < 300)
print(f"== {name}: {sum(sum(c.values()) for c in ops.values())} requests, "
      f"{sum(ok(c) for c in ops.values())} answered 2xx")
for op in sorted(ops, key=lambda o: o.split(" ", 1)[-1]):
    c = ops[op]
    codes = " ".join(f"{s}:{n}" for s, n in sorted(c.items()))
    print(f"   {op:32} {sum(c.values()):5} requests {ok(c):5} 2xx  ({codes})")
# Every distinct 5xx answer, with one request that got it.
seen = {}
for path in paths:
    try:
        with open(path) as f:
            entries = json.load(f)["log"]["entries"]
    except (OSError, ValueError, KeyError):
        continue
    for e in entries:
        r = e["response"]
        if r["status"] >= 500:
            text = r.get("content", {}).get("text", "")
            seen.setdefault((r["status"], text), e["request"])
for (status, text), req in seen.items():
    body = (req.get("postData") or {}).get("text", "")
    print(f"   {status} answer: {text[:300]}\n      to {req['method']} {req['url']} {body[:300]}")
EOF
}

# --- the runs -----------------------------------------------------------------------
# vmm.shutdown is left out: it stops the service the run is talking to.
seed_args=()
[[ -n "${ST_SEED:-}" ]] && seed_args=(--seed "$ST_SEED")
status=0
# run_st NAME ARGS...: one schemathesis run against $base, then its summary.
run_st() {
    local name=$1 rc=0 t0=$SECONDS
    shift
    timeout "$budget" "$venv/bin/schemathesis" run openapi.yaml \
        --url "$base/" \
        --checks not_a_server_error,response_schema_conformance \
        --max-examples "$max_examples" \
        --exclude-path /api/v1/vmm.shutdown \
        --exclude-path /api/v1/events \
        --workers 1 \
        --generation-database none \
        --no-color \
        --report har --report-har-path "$workdir/$name.har" \
        "${seed_args[@]}" "$@" || rc=$?
    echo "== $name: schemathesis exited with $rc after $((SECONDS - t0)) s"
    summarize "$name" "$workdir/$name.har"
    if ((rc == 124)); then
        echo "schemathesis.sh: the run took longer than $budget s" >&2
    fi
    if ! kill -0 "$vmmd_pid" 2>/dev/null; then
        echo "schemathesis.sh: vmmd died during the run:" >&2
        cat "$vmmd_log" >&2
        rc=1
    fi
    if ((rc != 0)); then
        echo "== vmmd log (last 50 lines)" >&2
        tail -n 50 "$vmmd_log" >&2
        status=$rc
    fi
}

make_example_dir
start_vmmd fake --fake
echo "== schemathesis $ST_VERSION against vmmd --fake at $base: fresh service"
run_st fake-fresh

# Then with a running VM (vm.delete left out so that it stays), so that the VM-scoped
# calls reach the backend and vm.info / vm.counters answers are checked against their
# schemas.
if ((status == 0)); then
    : >"$workdir/kernel"
    truncate -s 1M "$workdir/disk.img"
    cat >"$workdir/vm.json" <<EOF
{"id": "st", "payload": {"kernel": "$workdir/kernel", "cmdline": "console=ttyS0"},
 "iothreads": [{"id": "io0"}],
 "throttle_groups": [{"id": "g0", "limits": {"iops_total": 1000}}],
 "disks": [{"id": "d0", "path": "$workdir/disk.img", "iothread": "io0",
            "throttle": {"bps_total": 1048576}, "throttle_group": "g0"},
           {"id": "d1", "path": "null", "null_size": 1048576, "num_queues": 2,
            "iothread_vq_mapping": [{"iothread": "io0", "vqs": [0, 1]}]}]}
EOF
    curl -fsS -X PUT --data-binary "@$workdir/vm.json" "$base/api/v1/vm.create"
    curl -fsS -X PUT "$base/api/v1/vm.boot?id=st"
    echo "== schemathesis $ST_VERSION against vmmd --fake at $base: one running VM"
    run_st fake-running --exclude-path /api/v1/vm.delete
fi
stop_vmmd

# The KVM backend, with every client path confined to the example directory: the fuzzer
# names images, kernels and serial outputs, and vmmd runs as whoever runs this script.
if ((status == 0)); then
    # (-c first: `<>` would create a missing /dev/kvm as a plain file.)
    # (A PARTIAL line: the fake-backend runs above still count.)
    if [[ -n "${VMM_TEST_NO_KVM:-}" && "${VMM_TEST_NO_KVM}" != 0 ]]; then
        echo "PARTIAL schemathesis: the KVM backend not checked: VMM_TEST_NO_KVM is set"
    elif ! [[ -c /dev/kvm ]] || ! (exec 3<>/dev/kvm) 2>/dev/null; then
        echo "PARTIAL schemathesis: the KVM backend not checked: /dev/kvm cannot be opened"
    else
        make_example_dir
        start_vmmd kvm --allowed-dir "$example_dir"
        echo "== schemathesis $ST_VERSION against vmmd (KVM) at $base, paths under $example_dir"
        # The examples in order: the VMs first, then the calls on them (boot, add-disk,
        # update-disk, ...; schemathesis orders operations by name); vm.delete only in
        # the later phases.
        run_st kvm-examples-create --phases examples --include-path /api/v1/vm.create
        ((status == 0)) && run_st kvm-examples-calls --phases examples \
            --exclude-path /api/v1/vm.create --exclude-path /api/v1/vm.delete
        ((status == 0)) && run_st kvm-fuzzing --phases coverage,fuzzing
        # Scenarios along the OpenAPI links (vm.create -> vm.boot -> vm.pause ...), for a
        # fixed time: one pass stops after a few dozen scenarios.
        ((status == 0)) && run_st kvm-stateful --phases stateful --max-time "$stateful_time"
        summarize "kvm (the four runs)" "$workdir"/kvm-*.har
        stop_vmmd
        if ((status == 0)); then
            make_example_dir
            cat >"$example_dir/vm.json" <<EOF
{"id": "one", "memory": {"size_mib": 64},
 "payload": {"kernel": "$example_dir/guest.elf", "cmdline": "exit=acpi pci=auto ms=300"},
 "iothreads": [{"id": "io0"}],
 "disks": [{"id": "d0", "path": "$example_dir/disk0.raw", "iothread": "io0"}]}
EOF
            start_vmmd vmm vmm --allowed-dir "$example_dir" --config "$example_dir/vm.json"
            echo "== schemathesis $ST_VERSION against vmm --api-socket (KVM, one VM) at $base"
            run_st vmm-fuzzing --phases examples,coverage,fuzzing
            ((status == 0)) && run_st vmm-stateful --phases stateful --max-time "$stateful_time"
            stop_vmmd
        fi
    fi
fi
exit "$status"
