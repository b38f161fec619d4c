#!/usr/bin/env bash
# The GPU check, for a machine with NVIDIA GPUs (not part of CI). Prints one table: device,
# precision, feature extraction img/s, fine-tune img/s, GPU memory peak, wall time per step,
# CPU-vs-GPU feature cosine, accuracy.
#
#   scripts/gpu_check.sh              --library, then --pipeline when the venv has MLflow + DVC
#   scripts/gpu_check.sh --library    the project's GPU code paths with the torch found here
#                                     (PYTHON=..., else .venv/bin/python, else python3), on
#                                     generated images, without DVC or MLflow (< 5 min on one GPU)
#   scripts/gpu_check.sh --pipeline   the DVC pipeline in a scratch copy, with .venv: device=auto,
#                                     a fine-tune run, and nproc=auto with >= 2 GPUs
#   scripts/gpu_check.sh --cpu-smoke  both, on this CPU with tiny data: checks the plumbing of
#                                     the check itself (DDP with 2 Gloo processes)
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
check="$here/scripts/gpu_check.py"
venv_py="$here/.venv/bin/python"
lib_py="${PYTHON:-}"
if [ -z "$lib_py" ]; then
  if [ -x "$venv_py" ]; then lib_py="$venv_py"; else lib_py="$(command -v python3)"; fi
fi
has_pipeline() { [ -x "$venv_py" ] && "$venv_py" -c 'import mlflow, dvc' 2>/dev/null; }
need_pipeline() {
  has_pipeline || { echo "gpu_check: --pipeline needs the project's venv (make venv)" >&2; exit 2; }
}

mode="${1:-default}"
smoke=()
case "$mode" in
  --library) steps=(library) ;;
  --pipeline) need_pipeline; steps=(pipeline) ;;
  --cpu-smoke) need_pipeline; steps=(library pipeline); smoke=(--smoke) ;;
  default) if has_pipeline; then steps=(library pipeline); else steps=(library); fi ;;
  -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
  *) echo "gpu_check: unknown option $mode (--library, --pipeline, --cpu-smoke)" >&2; exit 2 ;;
esac

out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
start=$SECONDS
for step in "${steps[@]}"; do
  if [ "$step" = library ]; then py="$lib_py"; else py="$venv_py"; fi
  "$py" "$check" "$step" ${smoke[@]+"${smoke[@]}"} --out "$out/$step.json"
done
"$lib_py" "$check" table "$out"/*.json
echo "(${steps[*]}: $((SECONDS - start)) s)"
