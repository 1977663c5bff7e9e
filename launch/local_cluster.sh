#!/usr/bin/env bash
# A multi-node Ray cluster on this one machine (node IPs on 127.0.0.2, dashboard on 127.0.0.1) for trying
# `ray job submit` (launch/submit.sh) and node-targeted placement without a real cluster.
#
#   launch/local_cluster.sh start  [--workers N] [--temp-dir DIR] [--head-cpus N]
#                                  [--worker-cpus N] [--object-store-mb MB] [--timeout S]
#                                  [--node-resources NODE=JSON ...]   (NODE: head, a, b, ...)
#                                  [--isolate PATH]
#   launch/local_cluster.sh status [--temp-dir DIR]
#   launch/local_cluster.sh env    [--temp-dir DIR]     # prints `export ...` lines to eval
#   launch/local_cluster.sh stop   [--temp-dir DIR]
#
# Every node is its own `ray start --block` process in its own session; the head gets
# the custom resource {"node_head": 1}, worker k gets {"node_<letter k>": 1}
# (node_a, node_b, ...), so configs can pin roles with e.g.
# rollout.resources.custom={node_a: 0.01}.
#
# Loopback only: nodes advertise 127.0.0.2 (Ray rewrites 127.0.0.1 and localhost to the
# machine's routable address, so another address of the loopback range is used, as in
# rlalign_ray/runtime/cluster.py LOOPBACK; override with RLALIGN_LOOPBACK), and the
# dashboard / job API listens on 127.0.0.1 only. Ray's gRPC ports themselves listen on all
# interfaces (Ray's own choice); token auth guards them.
#
# Token authentication is on: the cluster gets its own token in DIR/auth_token
# (RAY_AUTH_MODE=token, RAY_AUTH_TOKEN_PATH=DIR/auth_token); ~/.ray/auth_token is
# neither read nor written. Clients need the same two variables: see `env`.
#
# --isolate PATH: the worker nodes do not share PATH with the head, as separate machines
# would not: each worker runs in a private mount namespace (`unshare -m`; `unshare -r -m`
# when not root) with an empty tmpfs mounted over PATH (an existing folder), so what the
# head writes there is not on the workers, nor the other way round. For trying storage that
# must be shared (trainer.output_dir: a local folder is refused at start-up, a URI works).
#
# State (addresses, ports, pids) lives in DIR/cluster.env. `stop` signals only the
# pids recorded there and then sweeps leftovers whose command line names DIR; it never
# runs `ray stop` (which would stop every Ray instance on the machine).
#
# Keep DIR short (Ray's unix socket paths must stay under ~107 characters).
set -euo pipefail

DEFAULT_DIR="/tmp/rlalign_ray_cluster"

usage() { sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-2}"; }
die() { echo "local_cluster.sh: $*" >&2; exit 1; }

[[ $# -ge 1 ]] || usage
CMD="$1"; shift
[[ "$CMD" == -h || "$CMD" == --help || "$CMD" == help ]] && usage 0
WORKERS=1
TEMP_DIR="${RLALIGN_CLUSTER_DIR:-$DEFAULT_DIR}"
HEAD_CPUS=2
WORKER_CPUS=2
OBJ_MB=512
TIMEOUT=120
EXTRA_RESOURCES=()
ISOLATE=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --workers) WORKERS="$2"; shift 2 ;;
    --temp-dir) TEMP_DIR="$2"; shift 2 ;;
    --head-cpus) HEAD_CPUS="$2"; shift 2 ;;
    --worker-cpus) WORKER_CPUS="$2"; shift 2 ;;
    --object-store-mb) OBJ_MB="$2"; shift 2 ;;
    --timeout) TIMEOUT="$2"; shift 2 ;;
    --node-resources) EXTRA_RESOURCES+=("$2"); shift 2 ;;
    --isolate) ISOLATE="$2"; shift 2 ;;
    -h|--help) usage 0 ;;
    *) die "unknown argument: $1" ;;
  esac
done
[[ "$WORKERS" =~ ^[0-9]+$ ]] || die "--workers must be a number"
(( WORKERS <= 26 )) || die "at most 26 workers"
TEMP_DIR="$(mkdir -p "$TEMP_DIR" && cd "$TEMP_DIR" && pwd -P)"
STATE="$TEMP_DIR/cluster.env"
(( ${#TEMP_DIR} <= 60 )) || die "--temp-dir $TEMP_DIR is too long for Ray's socket paths; use a short one under /tmp"

PY="${PYTHON:-python}"
RAY="${RAY_CLI:-ray}"
LOOPBACK="${RLALIGN_LOOPBACK:-127.0.0.2}"
[[ "$LOOPBACK" == 127.* ]] || die "RLALIGN_LOOPBACK=$LOOPBACK is not a loopback address (127.x.y.z)"

state_get() { [[ -f "$STATE" ]] && sed -n "s/^$1=//p" "$STATE" | tail -n 1; }

alive() { [[ -n "${1:-}" ]] && kill -0 "$1" 2>/dev/null; }

# Print N distinct free TCP ports on 127.0.0.1.
free_ports() {
  "$PY" - "$1" <<'EOF'
import socket, sys
socks = []
for _ in range(int(sys.argv[1])):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    socks.append(s)
print(" ".join(str(s.getsockname()[1]) for s in socks))
for s in socks:
    s.close()
EOF
}

# pids of this cluster's processes: their command line names the temp dir, or their
# environment carries this cluster's token path (Ray workers rename themselves ray::...).
pids_under_dir() {
  local p cmd
  for p in /proc/[0-9]*; do
    p="${p#/proc/}"
    [[ "$p" == "$$" || "$p" == "$BASHPID" ]] && continue
    cmd="$( { tr '\0' ' ' < "/proc/$p/cmdline"; } 2>/dev/null || true)"
    [[ -n "$cmd" && "$cmd" != *local_cluster.sh* ]] || continue
    if [[ "$cmd" == *ray* && ( "$cmd" == *"$TEMP_DIR/"* || "$cmd" == *"$TEMP_DIR "* ) ]] ||
       { tr '\0' '\n' < "/proc/$p/environ"; } 2>/dev/null | grep -qxF "RAY_AUTH_TOKEN_PATH=$TEMP_DIR/auth_token"; then
      echo "$p"
    fi
  done
}

cluster_env() {
  # Environment of every node (and of the jobs and actors they start).
  export RAY_AUTH_MODE=token
  export RAY_AUTH_TOKEN_PATH="$TEMP_DIR/auth_token"
  export RAY_USAGE_STATS_ENABLED=0
  unset RAY_AUTH_TOKEN RAY_ADDRESS
}

# A node's resources: its own node_<name> marker plus any --node-resources NODE=JSON given.
node_resources() {
  "$PY" - "$1" "${EXTRA_RESOURCES[@]}" <<'EOF'
import json, sys
name, extra = sys.argv[1], sys.argv[2:]
res = {f"node_{name}": 1}
for item in extra:
    node, _, spec = item.partition("=")
    if node == name:
        res.update(json.loads(spec))
print(json.dumps(res))
EOF
}

# The command prefix that runs a worker node with an empty tmpfs over $ISOLATE (--isolate).
UNSHARE=()
isolation() {
  [[ -n "$ISOLATE" ]] || return 0
  [[ -d "$ISOLATE" ]] || die "--isolate $ISOLATE is not an existing folder"
  ISOLATE="$(cd "$ISOLATE" && pwd -P)"
  [[ "$TEMP_DIR/" != "$ISOLATE/"* ]] || die "--isolate $ISOLATE must not hold the temp dir $TEMP_DIR"
  local flags=(-m)
  [[ "$(id -u)" == 0 ]] || flags=(-r -m)
  # shellcheck disable=SC2016  # expanded by the inner sh
  UNSHARE=(unshare "${flags[@]}" sh -c 'mount -t tmpfs rlalign-isolated "$0" && exec "$@"' "$ISOLATE")
  "${UNSHARE[@]}" true 2>/dev/null || die "--isolate: cannot mount a tmpfs in a private mount namespace here (unshare ${flags[*]} needs root or unprivileged user namespaces)"
}

# Start one node as a background `ray start --block` in its own session; echo its pid.
# With WRAP=1, inside the --isolate mount namespace.
launch_node() {
  local log="$1"; shift
  local wrap=()
  [[ "${WRAP:-0}" == 1 ]] && wrap=("${UNSHARE[@]}")
  setsid "${wrap[@]}" "$RAY" start --block --disable-usage-stats --node-ip-address "$LOOPBACK" \
    --temp-dir "$TEMP_DIR" "$@" > "$log" 2>&1 < /dev/null &
  echo $!
}

# Number of alive nodes, or -1 when the cluster cannot be reached yet.
count_nodes() {
  timeout 60 "$PY" - "$1" "$LOOPBACK" <<'EOF' 2>/dev/null || echo -1
import logging, sys
import ray
ray.init(address=sys.argv[1], logging_level=logging.ERROR, log_to_driver=False,
         _node_ip_address=sys.argv[2])
print(sum(1 for n in ray.nodes() if n.get("Alive")))
EOF
}

cmd_start() {
  if [[ -f "$STATE" ]] && alive "$(state_get HEAD_PID)"; then
    die "a cluster from $TEMP_DIR is already running (head pid $(state_get HEAD_PID)); stop it first"
  fi
  cluster_env
  isolation
  if [[ ! -s "$RAY_AUTH_TOKEN_PATH" ]]; then
    (umask 077; "$PY" -c 'import secrets; print(secrets.token_hex(32), end="")' > "$RAY_AUTH_TOKEN_PATH")
  fi
  local ports; read -r -a ports <<< "$(free_ports $((7 + 4 * WORKERS)))"
  local gcs_port="${ports[0]}" dash_port="${ports[1]}" client_port="${ports[2]}"
  local pids=() i=3
  {
    echo "# written by launch/local_cluster.sh start; source it or use \`local_cluster.sh env\`"
    echo "TEMP_DIR=$TEMP_DIR"
    echo "RAY_ADDRESS=$LOOPBACK:$gcs_port"
    echo "RAY_API_SERVER_ADDRESS=http://127.0.0.1:$dash_port"
    echo "RAY_AUTH_MODE=token"
    echo "RAY_AUTH_TOKEN_PATH=$RAY_AUTH_TOKEN_PATH"
    echo "WORKERS=$WORKERS"
    [[ -z "$ISOLATE" ]] || echo "ISOLATED=$ISOLATE"
  } > "$STATE"

  local head_pid
  head_pid="$(launch_node "$TEMP_DIR/head.out" --head --port "$gcs_port" \
    --dashboard-host 127.0.0.1 --dashboard-port "$dash_port" --include-dashboard true \
    --ray-client-server-port "$client_port" \
    --dashboard-agent-listen-port "${ports[i]}" --dashboard-agent-grpc-port "${ports[i+1]}" \
    --metrics-export-port "${ports[i+2]}" --runtime-env-agent-port "${ports[i+3]}" \
    --num-cpus "$HEAD_CPUS" --num-gpus 0 --object-store-memory $((OBJ_MB * 1024 * 1024)) \
    --resources "$(node_resources head)")"
  echo "HEAD_PID=$head_pid" >> "$STATE"
  i=$((i + 4))

  # Wait for the head before adding workers.
  local deadline=$((SECONDS + TIMEOUT))
  until grep -q "Ray runtime started" "$TEMP_DIR/head.out" 2>/dev/null; do
    alive "$head_pid" || { cat "$TEMP_DIR/head.out" >&2; cmd_stop >/dev/null 2>&1 || true; die "the head node exited"; }
    (( SECONDS < deadline )) || { cmd_stop >/dev/null 2>&1 || true; die "the head node did not start in ${TIMEOUT}s (see $TEMP_DIR/head.out)"; }
    sleep 1
  done

  local k letter pid
  for ((k = 0; k < WORKERS; k++)); do
    letter="$(printf "\\x$(printf %x $((97 + k)))")"
    pid="$(WRAP=1 launch_node "$TEMP_DIR/worker_$letter.out" --address "$LOOPBACK:$gcs_port" \
      --dashboard-agent-listen-port "${ports[i]}" --dashboard-agent-grpc-port "${ports[i+1]}" \
      --metrics-export-port "${ports[i+2]}" --runtime-env-agent-port "${ports[i+3]}" \
      --include-log-monitor false \
      --num-cpus "$WORKER_CPUS" --num-gpus 0 --object-store-memory $((OBJ_MB * 1024 * 1024)) \
      --resources "$(node_resources "$letter")")"
    echo "WORKER_${letter}_PID=$pid" >> "$STATE"
    pids+=("$pid")
    i=$((i + 4))
    # One node at a time: raylets starting together can race for the same ports.
    until grep -q "Ray runtime started" "$TEMP_DIR/worker_$letter.out" 2>/dev/null; do
      alive "$pid" || break
      (( SECONDS < deadline )) || break
      sleep 1
    done
  done

  local want=$((WORKERS + 1)) have=-1
  while :; do
    have="$(count_nodes "$LOOPBACK:$gcs_port")"
    [[ "$have" == "$want" ]] && break
    for pid in "$head_pid" "${pids[@]}"; do
      alive "$pid" || { tail -n 30 "$TEMP_DIR"/*.out >&2; cmd_stop >/dev/null 2>&1 || true; die "node pid $pid exited during start-up"; }
    done
    (( SECONDS < deadline )) || { cmd_stop >/dev/null 2>&1 || true; die "only $have of $want nodes joined in ${TIMEOUT}s"; }
    sleep 2
  done
  echo "STARTED=$(date +%s)" >> "$STATE"

  echo "local_cluster.sh: $want nodes up on $LOOPBACK (state: $STATE)"
  [[ -z "$ISOLATE" ]] || echo "  the workers see an empty $ISOLATE of their own (--isolate)"
  echo "  RAY_ADDRESS=$LOOPBACK:$gcs_port            (ray.init / rlalign-ray train run.ray_address)"
  echo "  RAY_API_SERVER_ADDRESS=http://127.0.0.1:$dash_port  (dashboard, ray job submit --address)"
  echo "  token auth: RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=$RAY_AUTH_TOKEN_PATH"
  echo "  use it:  eval \"\$($0 env --temp-dir $TEMP_DIR)\"; launch/submit.sh configs/demo_cpu.yaml"
  echo "  stop it: $0 stop --temp-dir $TEMP_DIR"
}

cmd_env() {
  [[ -f "$STATE" ]] || die "no cluster state in $TEMP_DIR"
  local k
  for k in RAY_ADDRESS RAY_API_SERVER_ADDRESS RAY_AUTH_MODE RAY_AUTH_TOKEN_PATH; do
    printf 'export %s=%q\n' "$k" "$(state_get "$k")"
  done
}

cmd_status() {
  [[ -f "$STATE" ]] || { echo "local_cluster.sh: no cluster state in $TEMP_DIR"; return 1; }
  local line name pid up=0 total=0
  echo "state: $STATE"
  grep -E '^(RAY_ADDRESS|RAY_API_SERVER_ADDRESS|RAY_AUTH_TOKEN_PATH)=' "$STATE" | sed 's/^/  /'
  while IFS= read -r line; do
    name="${line%%=*}"; pid="${line#*=}"; total=$((total + 1))
    if alive "$pid"; then up=$((up + 1)); echo "  $name $pid running"; else echo "  $name $pid gone"; fi
  done < <(grep -E '^(HEAD|WORKER_[a-z])_PID=' "$STATE")
  echo "  $up/$total node processes running"
  [[ "$up" == "$total" && "$total" -gt 0 ]]
}

cmd_stop() {
  [[ -f "$STATE" ]] || { echo "local_cluster.sh: no cluster state in $TEMP_DIR (nothing to stop)"; return 0; }
  local pids=() pid
  # Workers first, then the head; each `ray start --block` shuts its own node down on SIGTERM.
  while IFS= read -r pid; do pids+=("$pid"); done < <(sed -n 's/^WORKER_[a-z]_PID=//p' "$STATE"; state_get HEAD_PID)
  for pid in "${pids[@]}"; do
    alive "$pid" && kill -TERM "$pid" 2>/dev/null || true
  done
  local deadline=$((SECONDS + 30)) left
  while :; do
    left=0
    for pid in "${pids[@]}"; do alive "$pid" && left=1; done
    [[ "$left" == 0 ]] && break
    (( SECONDS < deadline )) || break
    sleep 1
  done
  for pid in "${pids[@]}"; do
    if alive "$pid"; then kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true; fi
  done
  # Leftovers of this cluster only: processes whose command line names its temp dir.
  sleep 1
  local stray; stray="$(pids_under_dir | tr '\n' ' ')"
  if [[ -n "${stray// /}" ]]; then
    echo "local_cluster.sh: stopping leftover processes of this cluster: $stray"
    kill -TERM $stray 2>/dev/null || true
    sleep 3
    stray="$(pids_under_dir | tr '\n' ' ')"
    [[ -n "${stray// /}" ]] && kill -KILL $stray 2>/dev/null || true
  fi
  mv -f "$STATE" "$STATE.stopped"
  echo "local_cluster.sh: stopped the cluster in $TEMP_DIR"
}

case "$CMD" in
  start) cmd_start ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  env) cmd_env ;;
  -h|--help|help) usage 0 ;;
  *) die "unknown command: $CMD (start|stop|status|env)" ;;
esac
