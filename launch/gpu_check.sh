#!/usr/bin/env bash
# A first check of one GPU node (1 to 8 GPUs) before real runs, in about 4 minutes per case.
#
#   bash launch/gpu_check.sh
#
# Prints the GPUs (nvidia-smi) and the vllm / torch / NCCL / deepspeed / ray versions, then
# trains 3 steps of configs/demo_cpu.yaml on its tiny model (builtin:tiny-arith, built
# locally: no model download) in each case below, float32 so that the generator's and the
# learner's log-probs must agree closely, and prints one line per case:
#   PASS <case>: weights/version=3 logprob_mismatch=0.0012 (<0.05) in 74 s
#   FAIL <case>: <reason>                  (then the last 30 lines of that run's log)
#   SKIP <case>: needs N GPUs, found M
#
#   case             GPUs  layout
#   vllm+nccl+zero3  3     2 ZeRO-3 learner ranks + 1 vLLM generator, weights over NCCL
#   vllm-tp2         3     1 learner rank + 1 vLLM generator over 2 GPUs (tensor parallel;
#                          both engine workers join the NCCL group; 6 buckets a version)
#   colocated        1     1 learner rank + 1 sleeping vLLM generator on the same GPU,
#                          weights over sync.transport auto (CUDA IPC)
#
# Each case's overrides are the CASE_* arrays below (tests/integration/test_cluster_files.py
# loads every one with the config loader). Each case runs under `timeout` with a limit of
# its own, GPU_CHECK_CASE_S seconds (default 240: Ray's start, a cold vLLM engine, the
# learner ranks and 3 steps), so the whole check takes at most about 4 minutes per case
# that runs. Logs stay in a temp folder, named at the end. Exits 0 when no case failed, 1
# when one did, 2 at once (before Ray or vLLM start) when there is no CUDA GPU, no vllm
# (bash launch/install_vllm.sh) or no rlalign-ray (pip install -e .).
set -uo pipefail
case "${1-}" in
  -h|--help) awk 'NR > 1 && !/^#/ {exit} NR > 1 {sub(/^# ?/, ""); print}' "$0"; exit 0 ;;
  ?*) echo "gpu_check.sh takes no arguments (see --help)" >&2; exit 2 ;;
esac

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)"
PY=${PYTHON:-$(command -v python || command -v python3 || echo python)}
STEPS=3
MAX_MISMATCH=0.05
CASE_S=${GPU_CHECK_CASE_S:-240}
START=$SECONDS

# Every case: the tiny model in float32, vLLM generators, no reference (kl_coef 0), CPU rewards.
COMMON=(
  model.path=builtin:tiny-arith model.dtype=float32 algorithm.kl_coef=0
  rollout.backend=vllm rollout.num_actors=1 rollout.gpu_memory_utilization=0.2
  trainer.eval_every=0 trainer.progress_bar=false 'trainer.loggers=[jsonl]'
)
CASE_NCCL_ZERO3=(
  learner.world_size=2 learner.zero_stage=3 learner.backend=nccl learner.resources.num_gpus=1
  rollout.resources.num_gpus=1 sync.transport=collective sync.backend=nccl
)
CASE_TP2=(
  learner.resources.num_gpus=1
  rollout.tensor_parallel_size=2 rollout.resources.num_gpus=2
  sync.bucket_mb=0.25  # six buckets of whole layers: each worker loads many, not one
)
CASE_COLOCATED=(
  learner.resources.num_gpus=0.5
  rollout.resources.num_gpus=0.5 rollout.placement.colocate_with=learner
  rollout.enable_sleep_mode=true sync.transport=auto
)
# name, GPUs needed, overrides array
CASES=(
  "vllm+nccl+zero3 3 CASE_NCCL_ZERO3"
  "vllm-tp2 3 CASE_TP2"
  "colocated 1 CASE_COLOCATED"
)

refuse() { echo "gpu_check.sh: $*" >&2; exit 2; }

cd "$REPO"
export PYTHONUNBUFFERED=1 RAY_USAGE_STATS_ENABLED=0 TOKENIZERS_PARALLELISM=false

# ---- the node (refused here, before anything starts) -------------------------------------
[[ "$CASE_S" =~ ^[0-9]+$ && "$CASE_S" -ge 30 ]] \
  || refuse "GPU_CHECK_CASE_S=$CASE_S: give each case at least 30 seconds"
command -v nvidia-smi >/dev/null \
  || refuse "no CUDA GPU: nvidia-smi is not installed, so this is not an NVIDIA GPU node (run it on one)"
nvidia-smi -L || refuse "no CUDA GPU: nvidia-smi lists none (driver not loaded?)"
NGPU=$($PY -c 'import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)') \
  || refuse "torch does not import in $PY; install the project first: pip install -e ."
[[ "$NGPU" -ge 1 ]] || refuse "torch sees no CUDA GPU ($($PY -c 'import torch; print("torch", torch.__version__, "CUDA", torch.version.cuda)'), CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES-unset})"
TESTED_VLLM=$(sed -n 's/^TESTED_VLLM_VERSION=\([0-9.]*\)$/\1/p' launch/install_vllm.sh)
$PY -c 'import vllm' 2>/dev/null \
  || refuse "vllm does not import; install the tested release ($TESTED_VLLM): bash launch/install_vllm.sh"
command -v rlalign-ray >/dev/null || refuse "no rlalign-ray command; install the project: pip install -e ."

TESTED_VLLM=$TESTED_VLLM $PY - <<'PYEOF' || refuse "a package above does not import"
import os
import deepspeed, ray, torch, transformers, vllm

nccl = torch.cuda.nccl.version()
nccl = ".".join(map(str, nccl)) if isinstance(nccl, tuple) else str(nccl)
tested = os.environ["TESTED_VLLM"]
note = "" if vllm.__version__.startswith(tested) else f"  WARNING: not the tested {tested}"
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}, NCCL {nccl}), "
      f"{torch.cuda.device_count()} GPUs visible")
print(f"vllm {vllm.__version__}{note}")
print(f"deepspeed {deepspeed.__version__}, ray {ray.__version__}, "
      f"transformers {transformers.__version__}")
PYEOF

TMP=$(mktemp -d -t rlalign-gpu-check.XXXXXX)
echo "building the tiny model (once, cached) ..."
timeout 120 $PY -c 'from rlalign_ray.models.builtin import resolve_model_path as r; print(r("builtin:tiny-arith"))' \
  >"$TMP/build.log" 2>&1 || { tail -n 30 "$TMP/build.log"; refuse "the tiny model did not build"; }

# ---- the cases ---------------------------------------------------------------------------
# Reads a run's metrics.jsonl: prints the PASS summary (exit 0) or why it failed (exit 1).
judge() {
  $PY - "$@" "$STEPS" "$MAX_MISMATCH" <<'PYEOF'
import json, math, sys

path, rc, limit = sys.argv[1], int(sys.argv[2]), sys.argv[3]
steps, bound = int(sys.argv[4]), float(sys.argv[5])


def fail(why):
    print(why)
    sys.exit(1)


if rc in (124, 137):
    fail(f"timed out after {limit} s")
if rc:
    fail(f"rlalign-ray exited with {rc}")
try:
    rows = [json.loads(line) for line in open(path) if line.strip()]
except OSError:
    fail(f"no {path}")
trained = [r for r in rows if "train/logprob_mismatch" in r]
if not trained:
    fail("metrics.jsonl has no training step")
last = max(trained, key=lambda r: r["step"])
if last["step"] != steps:
    fail(f"the last training step is {last['step']}, expected {steps}")
version = last.get("weights/version")
if version != steps:
    fail(f"weights/version={version} after {steps} steps: the generators did not load each update")
worst = max(r["train/logprob_mismatch"] for r in trained)
summary = f"weights/version={version} logprob_mismatch={worst:.3g}"
if not math.isfinite(worst) or worst >= bound:
    fail(f"{summary} (>= {bound}): the generator's log-probs differ from the learner's")
print(f"{summary} (<{bound})")
PYEOF
}

RUN=()
for spec in "${CASES[@]}"; do
  read -r name need _ <<<"$spec"
  if [[ "$NGPU" -lt "$need" ]]; then
    echo "SKIP $name: needs $need GPUs, found $NGPU"
  else
    RUN+=("$spec")
  fi
done

failed=0
for spec in "${RUN[@]}"; do
  read -r name need array <<<"$spec"
  ref="$array[@]"
  overrides=("${!ref}")
  limit=$CASE_S
  out="$TMP/$array" log="$TMP/$array.log"
  echo "running $name (timeout ${limit} s) ..."
  t0=$SECONDS
  timeout -k 10 "$limit" rlalign-ray train configs/demo_cpu.yaml "${COMMON[@]}" "${overrides[@]}" \
    "trainer.steps=$STEPS" "trainer.output_dir=$out" >"$log" 2>&1
  rc=$?
  if verdict=$(judge "$out/metrics.jsonl" "$rc" "$limit"); then
    echo "PASS $name: $verdict in $((SECONDS - t0)) s"
  else
    echo "FAIL $name: $verdict"
    tail -n 30 "$log" | sed 's/^/    /'
    failed=1
  fi
done

echo "logs: $TMP ($((SECONDS - START)) s in all)"
exit "$failed"
