#!/usr/bin/env bash
# A multi-node Ray cluster on one machine: a head plus N worker nodes, each its own raylet with its
# own resources ({"head": 1} / {"worker_<i>": 1}; worker i also gets GPU i when the machine has one).
# For trying cluster-mode placement (RAY_ADDRESS=...) without a real cluster.
#
#   cluster/start_local_cluster.sh start [N]   # prints `export RAY_ADDRESS=...` (eval it)
#   cluster/start_local_cluster.sh status
#   cluster/start_local_cluster.sh stop
#
# Settings (environment): HEAD_CPUS (1), WORKER_CPUS (1), RAY_PORT (6390), RAY_CLIENT_PORT
# (RAY_PORT+1; Ray's default 10001 would clash with a second head), OBJECT_STORE_BYTES per node
# (500000000), FFSPLIT_HOME (state dir, default <repo>/.ffsplit), RAY (the `ray` executable).
#
# Stopping never runs `ray stop`: that kills every Ray process of the machine, other people's
# embedded ray.init() included. Every process started here carries FFSPLIT_LOCAL_CLUSTER_TOKEN in
# its environment (Ray workers inherit it though they leave the process group): `stop` kills the
# recorded process groups and whatever else carries the token, and nothing else.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STATE="${FFSPLIT_HOME:-$REPO/.ffsplit}/local-cluster"
if [[ -z "${RAY:-}" ]]; then
    if [[ -x "$REPO/.venv/bin/ray" ]]; then RAY="$REPO/.venv/bin/ray"; else RAY="ray"; fi
fi
HEAD_CPUS="${HEAD_CPUS:-1}"
WORKER_CPUS="${WORKER_CPUS:-1}"
RAY_PORT="${RAY_PORT:-6390}"
RAY_CLIENT_PORT="${RAY_CLIENT_PORT:-$((RAY_PORT + 1))}"
OBJECT_STORE_BYTES="${OBJECT_STORE_BYTES:-500000000}"

# Same values as services/stack.py SERVICE_ENV and cluster/runtime_env.yaml (a test checks).
export RAY_USAGE_STATS_ENABLED=0
export PREFECT_SERVER_ANALYTICS_ENABLED=false
export MLFLOW_DISABLE_TELEMETRY=true
export HF_HUB_OFFLINE=1

die() { echo "start_local_cluster.sh: $*" >&2; exit 2; }

# PIDs whose environment holds our token (own user's processes only; others are unreadable). The
# token is never exported in this script's own environment, so it never matches itself.
token_pids() {
    grep -lazx "FFSPLIT_LOCAL_CLUSTER_TOKEN=$1" /proc/[0-9]*/environ 2>/dev/null |
        sed 's#^/proc/\([0-9]*\)/environ$#\1#' || true
}

# Every live process of the cluster: members of the recorded process groups, token holders, and
# all their descendants. Descendants matter: Ray workers (ray::IDLE) move to their own process
# group and setproctitle overwrites their /proc/PID/environ, so only the process tree finds them.
cluster_pids() {
    local token="" pgids=""
    [[ -f "$STATE/token" ]] && token="$(cat "$STATE/token")"
    [[ -f "$STATE/pgids" ]] && pgids="$(tr '\n' ' ' <"$STATE/pgids")"
    ps -eo pid=,ppid=,pgid=,stat= | awk -v pgids="$pgids" -v seeds="$( [[ -n "$token" ]] && token_pids "$token" | tr '\n' ' ')" -v self=$$ '
        BEGIN { n = split(pgids, g, " "); for (i = 1; i <= n; i++) group[g[i]] = 1
                n = split(seeds, t, " "); for (i = 1; i <= n; i++) keep[t[i]] = 1 }
        $4 !~ /^Z/ && $1 != self { parent[$1] = $2; if ($3 in group) keep[$1] = 1 }
        END { do { added = 0
                  for (p in parent) if (!(p in keep) && (parent[p] in keep)) { keep[p] = 1; added = 1 }
              } while (added)
              for (p in keep) if (p in parent) print p }'
}

gpu_count() {
    if command -v nvidia-smi >/dev/null 2>&1; then
        nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true
    else
        echo 0
    fi
}

# Launch `ray start ...` in its own session (own process group) with the token; its pid (= its
# process group) goes to LAST_PID (not echoed: a $(...) subshell could not `wait` for it).
launch_node() {
    local name="$1"
    shift
    FFSPLIT_LOCAL_CLUSTER_TOKEN="$TOKEN" setsid "$RAY" start "$@" >"$STATE/$name.log" 2>&1 &
    LAST_PID=$!
    echo "$LAST_PID" >>"$STATE/pgids"
}

# Wait for a launched `ray start` (it returns once the node is up); on failure stop all and exit.
wait_node() {
    local name="$1" pid="$2" rc=0
    wait "$pid" || rc=$?
    if [[ "$rc" -ne 0 ]]; then
        tail -n 20 "$STATE/$name.log" >&2
        cp "$STATE/$name.log" "${STATE%/*}/local-cluster-failed-$name.log" 2>/dev/null || true
        stop_cluster
        die "ray start for $name exited with $rc (log above, kept in ${STATE%/*}/local-cluster-failed-$name.log)"
    fi
}

start_cluster() {
    local workers="${1:-2}" gpus i temp_dir address
    [[ "$workers" =~ ^[0-9]+$ ]] || die "N workers must be a number, got '$workers'"
    if [[ -d "$STATE" ]] && [[ -n "$(cluster_pids)" ]]; then
        die "a local cluster is already running ($(cat "$STATE/address")); run '$0 stop' first"
    fi
    rm -rf "$STATE"
    mkdir -p "$STATE"
    TOKEN="lc$(od -An -N8 -tx1 /dev/urandom | tr -d ' \n')"
    echo "$TOKEN" >"$STATE/token"
    # Token auth set explicitly for every node and client: left unset, Ray 2.60 enables it on a head
    # whenever ~/.ray/auth_token exists but not on nodes joining it (they then fail to connect).
    (umask 077 && od -An -N32 -tx1 /dev/urandom | tr -d ' \n' >"$STATE/auth_token")
    export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH="$STATE/auth_token"
    unset RAY_AUTH_TOKEN
    # A short temp dir of our own: Ray's unix sockets live there (107-byte path limit), and the
    # address file stays out of /tmp/ray/ray_current_cluster, so a plain ray.init() never joins.
    temp_dir="$(mktemp -d /tmp/ffray-XXXXXX)"
    echo "$temp_dir" >"$STATE/temp_dir"
    launch_node head --head --port "$RAY_PORT" --ray-client-server-port "$RAY_CLIENT_PORT" \
        --temp-dir "$temp_dir" \
        --num-cpus "$HEAD_CPUS" --num-gpus 0 --resources '{"head": 1}' \
        --object-store-memory "$OBJECT_STORE_BYTES" \
        --include-dashboard=false --disable-usage-stats
    wait_node head "$LAST_PID"
    address="$(cat "$temp_dir/ray_current_cluster")"
    echo "$address" >"$STATE/address"
    gpus="$(gpu_count)"
    # One at a time: raylets joining from the same host at once time out registering with the GCS.
    for ((i = 0; i < workers; i++)); do
        local gpu_args=(--num-gpus 0) visible=""
        if ((i < gpus)); then gpu_args=(--num-gpus 1) visible="$i"; fi
        # CUDA_VISIBLE_DEVICES pins worker node i to GPU i (Ray numbers it 0 inside the node).
        CUDA_VISIBLE_DEVICES="$visible" launch_node "worker_$i" --address "$address" \
            --num-cpus "$WORKER_CPUS" "${gpu_args[@]}" --resources "{\"worker_$i\": 1}" \
            --object-store-memory "$OBJECT_STORE_BYTES" --disable-usage-stats
        wait_node "worker_$i" "$LAST_PID"
    done
    echo "local Ray cluster at $address: head + $workers workers ($gpus GPUs seen); state in $STATE" >&2
    echo "export RAY_ADDRESS=$address RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=$STATE/auth_token"
}

stop_cluster() {
    [[ -d "$STATE" ]] || { echo "no local cluster state in $STATE" >&2; return 0; }
    local pids pgid left
    pids="$(cluster_pids | tr '\n' ' ')"
    for sig in TERM KILL; do
        if [[ -f "$STATE/pgids" ]]; then
            while read -r pgid; do kill "-$sig" -- "-$pgid" 2>/dev/null || true; done <"$STATE/pgids"
        fi
        # shellcheck disable=SC2086  # word splitting of the pid list is intended
        [[ -n "${pids// /}" ]] && { kill "-$sig" $pids 2>/dev/null || true; }
        # gcs_server ignores SIGTERM for a long while: 2 s, then SIGKILL (as `ray stop --force`).
        for _ in $(seq 20); do
            left=""
            for p in $pids; do [[ -d "/proc/$p" ]] && ! grep -q '^State:.*Z' "/proc/$p/status" 2>/dev/null && left+="$p "; done
            [[ -z "$left" && -z "$(cluster_pids)" ]] && break
            sleep 0.1
        done
        pids="$left $(cluster_pids | tr '\n' ' ')"
    done
    if [[ -n "$(cluster_pids)" ]]; then
        die "processes survived SIGKILL: $(cluster_pids | tr '\n' ' ')"
    fi
    [[ -f "$STATE/temp_dir" ]] && rm -rf "$(cat "$STATE/temp_dir")"
    rm -rf "$STATE"
    echo "local Ray cluster stopped" >&2
}

status_cluster() {
    if [[ ! -f "$STATE/token" ]]; then
        echo "not running (no state in $STATE)"
        return 1
    fi
    local n
    n="$(cluster_pids | wc -l)"
    if ((n == 0)); then
        echo "not running (stale state in $STATE: run '$0 stop')"
        return 1
    fi
    echo "running at $(cat "$STATE/address"): $n processes; state in $STATE"
    echo "export RAY_ADDRESS=$(cat "$STATE/address") RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=$STATE/auth_token"
}

case "${1:-}" in
    start) start_cluster "${2:-2}" ;;
    stop) stop_cluster ;;
    status) status_cluster ;;
    *) die "usage: $0 start [N_WORKERS] | stop | status" ;;
esac
