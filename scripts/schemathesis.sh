#!/usr/bin/env bash
# Fuzzes the REST service against openapi.yaml with schemathesis: starts `vmmd --fake`
# on a free loopback port and fails on any 5xx answer or any response that does not
# match the documented schema. schemathesis (pinned) is installed from PyPI into a venv
# under target/; the script prints a SKIP line and succeeds only when PyPI cannot be
# reached.
#
# Environment: ST_MAX_EXAMPLES (default 20) test cases per operation, ST_TIMEOUT (default
# 300) seconds for the whole run, ST_SEED to replay a run.
set -euo pipefail
cd "$(dirname "$0")/.."

ST_VERSION=4.32.5
venv=target/st-venv
max_examples=${ST_MAX_EXAMPLES:-20}
budget=${ST_TIMEOUT:-300}

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

# --- vmmd --fake on a free loopback port --------------------------------------------
cargo build --quiet -p api --bin vmmd
workdir=$(mktemp -d)
vmmd_pid=
cleanup() {
    if [[ -n "$vmmd_pid" ]]; then
        kill "$vmmd_pid" 2>/dev/null || true
        wait "$vmmd_pid" 2>/dev/null || true
    fi
    rm -rf "$workdir"
}
trap cleanup EXIT

port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
base="http://127.0.0.1:$port"
RUST_LOG=${RUST_LOG:-warn} target/debug/vmmd --fake --api-socket "$workdir/vmmd.sock" \
    --tcp "127.0.0.1:$port" >"$workdir/vmmd.log" 2>&1 &
vmmd_pid=$!
for _ in $(seq 100); do
    curl -fsS "$base/api/v1/vmm.ping" >/dev/null 2>&1 && break
    if ! kill -0 "$vmmd_pid" 2>/dev/null; then
        echo "schemathesis.sh: vmmd exited:" >&2
        cat "$workdir/vmmd.log" >&2
        exit 1
    fi
    sleep 0.1
done
curl -fsS "$base/api/v1/vmm.ping" >/dev/null

# --- the runs -----------------------------------------------------------------------
# vmm.shutdown is left out: it stops the service the run is talking to.
seed_args=()
[[ -n "${ST_SEED:-}" ]] && seed_args=(--seed "$ST_SEED")
status=0
run_st() {
    timeout "$budget" "$venv/bin/schemathesis" run openapi.yaml \
        --url "$base/" \
        --checks not_a_server_error,response_schema_conformance \
        --max-examples "$max_examples" \
        --exclude-path /api/v1/vmm.shutdown \
        --workers 1 \
        --generation-database none \
        --no-color \
        "${seed_args[@]}" "$@" || status=$?
}

echo "== schemathesis $ST_VERSION against vmmd --fake at $base: no VM"
run_st

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
    curl -fsS -X PUT "$base/api/v1/vm.boot"
    echo "== schemathesis $ST_VERSION against vmmd --fake at $base: one running VM"
    run_st --exclude-path /api/v1/vm.delete
fi
if ((status == 124)); then
    echo "schemathesis.sh: the run took longer than $budget s" >&2
fi
if ! kill -0 "$vmmd_pid" 2>/dev/null; then
    echo "schemathesis.sh: vmmd died during the run:" >&2
    cat "$workdir/vmmd.log" >&2
    status=1
fi
if ((status != 0)); then
    echo "== vmmd log (last 50 lines)" >&2
    tail -n 50 "$workdir/vmmd.log" >&2
fi
exit "$status"
