#!/usr/bin/env bash
# Submit `rlalign-ray train CONFIG [overrides...]` to a running Ray cluster as a Ray job.
#
#   launch/submit.sh [--address http://HOST:8265] [--pip PKG]... [--env K=V | --env K]...
#                    [--working-dir DIR] [--submission-id ID] [--no-wait] [--retry-s S]
#                    CONFIG [dotted.overrides ...]
#
# The working dir (default: this repository's root) is uploaded with the job, minus
# runs/, .git, caches and weight files (rlalign_ray/runtime/cluster.py WORKING_DIR_EXCLUDES);
# CONFIG and data paths resolve inside it on the cluster.
# --address defaults to $RAY_API_SERVER_ADDRESS, then $RAY_ADDRESS when it is an
# http(s):// address, then http://127.0.0.1:8265. --pip adds packages to the job's
# runtime env; --env K=V sets a variable for the job, --env K forwards this shell's $K.
# RAY_AUTH_MODE defaults to token (Ray >= 2.60 clusters started with `ray start`);
# point RAY_AUTH_TOKEN_PATH or RAY_AUTH_TOKEN at the cluster's token if it is not
# ~/.ray/auth_token.
#
# Without --no-wait it follows the job's logs and exits 0 only if the job SUCCEEDED.
# It prints where the outputs really are: the driver (on the head) writes metrics.jsonl
# and the logs to trainer.output_dir, but the learner ranks write checkpoints/ and final/
# from their own nodes. On a cluster of several nodes pass a bucket
# (trainer.output_dir=s3://BUCKET/PATH, 'rlalign-ray[s3]' and credentials on every node)
# or a folder every node mounts at the same path; a relative output_dir lands in the
# job's temporary copy of the working dir on the head and is lost with it.
set -euo pipefail

die() { echo "submit.sh: $*" >&2; exit 2; }
usage() { sed -n '2,24p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-2}"; }

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)"
ADDRESS=""
WORKDIR="$REPO"
SUBMISSION_ID=""
NO_WAIT=0
RETRY_S=120
PIPS=()
ENVS=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --address) ADDRESS="$2"; shift 2 ;;
    --address=*) ADDRESS="${1#*=}"; shift ;;
    --pip) PIPS+=("$2"); shift 2 ;;
    --env) ENVS+=("$2"); shift 2 ;;
    --working-dir) WORKDIR="$2"; shift 2 ;;
    --submission-id) SUBMISSION_ID="$2"; shift 2 ;;
    --no-wait) NO_WAIT=1; shift ;;
    --retry-s) RETRY_S="$2"; shift 2 ;;
    -h|--help) usage 0 ;;
    --) shift; break ;;
    -*) die "unknown option: $1 (see --help)" ;;
    *) break ;;
  esac
done
[[ $# -ge 1 ]] || usage
CONFIG="$1"; shift
OVERRIDES=("$@")

if [[ -z "$ADDRESS" ]]; then
  if [[ -n "${RAY_API_SERVER_ADDRESS:-}" ]]; then
    ADDRESS="$RAY_API_SERVER_ADDRESS"
  elif [[ "${RAY_ADDRESS:-}" == http://* || "${RAY_ADDRESS:-}" == https://* ]]; then
    ADDRESS="$RAY_ADDRESS"
  else
    ADDRESS="http://127.0.0.1:8265"
  fi
fi
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"
PY="${PYTHON:-python}"
RAY="${RAY_CLI:-ray}"

WORKDIR="$(cd "$WORKDIR" && pwd -P)" || die "no such working dir"
cd "$WORKDIR"
[[ -f "$CONFIG" ]] || die "$CONFIG is not a file under the working dir $WORKDIR (it must travel with the job)"

# Resolve K (forward) vs K=V.
ENV_PAIRS=()
for e in "${ENVS[@]+"${ENVS[@]}"}"; do
  if [[ "$e" == *=* ]]; then
    ENV_PAIRS+=("$e")
  else
    [[ -n "${!e+x}" ]] || die "--env $e: \$$e is not set here"
    ENV_PAIRS+=("$e=${!e}")
  fi
done

# Check the config (and overrides) before uploading anything, when the package is here,
# and find where the metrics will go.
OUTPUT_DIR="$("$PY" - "$CONFIG" "${OVERRIDES[@]+"${OVERRIDES[@]}"}" <<'EOF' 2>/dev/null || true
import sys
try:
    from rlalign_ray.config import load_config
except ImportError:
    sys.exit(0)
from rlalign_ray.errors import RlalignError
try:
    cfg = load_config(sys.argv[1], sys.argv[2:])
except RlalignError as e:
    print("!" + str(e).replace("\n", " | "))
    sys.exit(0)
print(cfg.trainer.output_dir)
EOF
)"
[[ "$OUTPUT_DIR" != "!"* ]] || die "invalid config: ${OUTPUT_DIR#!}"

RUNTIME_ENV="$("$PY" - "$REPO" "${#ENV_PAIRS[@]}" "${ENV_PAIRS[@]+"${ENV_PAIRS[@]}"}" "${PIPS[@]+"${PIPS[@]}"}" <<'EOF'
import json, sys
sys.path.insert(0, sys.argv[1])  # this repository's package: the excludes train uses too
from rlalign_ray.runtime.cluster import WORKING_DIR_EXCLUDES
n = int(sys.argv[2])
pairs, pips = sys.argv[3:3 + n], sys.argv[3 + n:]
env = {"PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
env.update(p.split("=", 1) for p in pairs)
rt = {
    "env_vars": env,
    # Keep the upload small: outputs, VCS data, caches and weight files stay behind.
    "excludes": WORKING_DIR_EXCLUDES,
}
if pips:
    rt["pip"] = pips
print(json.dumps(rt))
EOF
)"

if [[ -z "$SUBMISSION_ID" ]]; then
  SUBMISSION_ID="rlalign-$(date +%Y%m%d-%H%M%S)-$("$PY" -c 'import secrets; print(secrets.token_hex(3))')"
fi

echo "submit.sh: submitting $SUBMISSION_ID to $ADDRESS"
echo "  entrypoint: rlalign-ray train $CONFIG ${OVERRIDES[*]+"${OVERRIDES[*]}"}"
echo "  working dir: $WORKDIR  runtime env: $RUNTIME_ENV"

# Submit detached, retrying while a freshly started cluster has no job agent yet
# ("No available agent") or the dashboard is not up; then follow the logs.
deadline=$((SECONDS + RETRY_S))
while :; do
  set +e
  out="$("$RAY" job submit --address "$ADDRESS" --submission-id "$SUBMISSION_ID" --no-wait \
        --working-dir "$WORKDIR" --runtime-env-json "$RUNTIME_ENV" \
        -- rlalign-ray train "$CONFIG" "${OVERRIDES[@]+"${OVERRIDES[@]}"}" 2>&1)"
  rc=$?
  set -e
  if [[ $rc -eq 0 ]]; then break; fi
  if [[ "$out" == *"already exists"* ]]; then break; fi  # an earlier attempt got through
  if [[ "$out" == *"No available agent"* || "$out" == *"onnection refused"* ||
        "$out" == *"ConnectionError"* || "$out" == *"Failed to connect"* ||
        "$out" == *" 502"* || "$out" == *" 503"* ]] && (( SECONDS < deadline )); then
    echo "submit.sh: cluster not ready yet ($(grep -oE 'No available agent|onnection refused|Failed to connect|ConnectionError' <<< "$out" | head -n 1)); retrying"
    sleep 3
    continue
  fi
  echo "$out" >&2
  die "ray job submit failed (exit $rc)"
done

# How many nodes the cluster has ("?" when the state API does not answer).
NODES="$("$PY" - "$ADDRESS" <<'EOF' 2>/dev/null || true
import sys
from ray.util.state import list_nodes
print(sum(1 for n in list_nodes(address=sys.argv[1], limit=10000) if n.state == "ALIVE"))
EOF
)"
[[ "$NODES" =~ ^[0-9]+$ ]] || NODES="?"

where_outputs() {
  local d="${OUTPUT_DIR:-<trainer.output_dir>}"
  if [[ "$d" == *://* ]]; then
    echo "  outputs: $d (metrics.jsonl, tensorboard/, checkpoints/, final/; each written from the node that makes it)"
  elif [[ "$d" == /* ]]; then
    echo "  outputs: $d (metrics.jsonl from the driver on the head node; checkpoints/ and final/ from the learner ranks' nodes)"
    if [[ "$NODES" != 1 ]]; then
      echo "  warning: a local path on a cluster of ${NODES/\?/several} nodes: it must be one volume mounted at $d on every node"
      echo "           (else the run stops at start-up naming the nodes that do not see it); or pass trainer.output_dir=s3://BUCKET/PATH"
    fi
  else
    echo "  outputs: $d, relative: inside the job's temporary copy of the working dir on the head node"
    echo "           (<ray temp dir>/session_*/runtime_resources/working_dir_files/...), lost with it;"
    echo "           pass trainer.output_dir=s3://BUCKET/PATH or an absolute path on a volume every node mounts"
  fi
}

echo "submit.sh: job $SUBMISSION_ID submitted"
echo "  logs:    ray job logs --address $ADDRESS --follow $SUBMISSION_ID"
echo "  status:  ray job status --address $ADDRESS $SUBMISSION_ID   (stop: ray job stop ...)"
where_outputs
[[ $NO_WAIT -eq 1 ]] && exit 0

set +e
"$RAY" job logs --address "$ADDRESS" --follow "$SUBMISSION_ID" --log-style record
set -e
# The final state, from the job SDK (the CLI's wording differs per state).
status="$("$PY" - "$ADDRESS" "$SUBMISSION_ID" <<'EOF' | tail -n 1 || true
import sys, time
from ray.job_submission import JobStatus, JobSubmissionClient
client = JobSubmissionClient(sys.argv[1])
for _ in range(60):
    info = client.get_job_info(sys.argv[2])
    if info.status.is_terminal():
        break
    time.sleep(2)
print(info.status.value)
if info.status != JobStatus.SUCCEEDED and info.message:
    print("submit.sh: " + info.message[-2000:], file=sys.stderr)
EOF
)"
echo "submit.sh: job $SUBMISSION_ID finished with status ${status:-UNKNOWN}"
where_outputs
if [[ "$status" != SUCCEEDED ]]; then
  echo "  details: ray job status --address $ADDRESS $SUBMISSION_ID; ray job logs --address $ADDRESS $SUBMISSION_ID" >&2
  exit 1
fi
