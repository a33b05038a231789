#!/usr/bin/env bash
# Fill .gpu-carry/ (git-ignored) with what scripts/gpu_check.sh needs on a GPU machine that
# reaches neither PyPI nor ../shared, so that the check's minutes go to the GPU and not to
# finding out what is missing there:
#
#   wheels/   captum (the IG reference of the tests and benchmarks), a pure-Python wheel;
#             gpu_check.sh installs it only where the image lacks captum. Everything else the
#             check imports (torch, numpy, scipy, matplotlib, safetensors, pyyaml, pillow,
#             pytest, onnx, onnxruntime) is in the usual CUDA images.
#   shared/   the JPEG CIFAR-10 archive and the paper's published KD+IG student, as in ../shared
#             (about 22 MB).
#
#   scripts/gpu_prepare.sh               # ../shared by default, IGKD_SHARED=DIR to point elsewhere
#
# Then send the checkout with .gpu-carry to the GPU machine and run gpu_check.sh there (the
# command it prints keeps what comes back to two files: summary.md and gpu-check.tar.gz).
set -euo pipefail
. "$(dirname "$0")/gpu_common.sh" "$@"  # GPU_ARCHIVE, GPU_TEACHER; --help; no arguments
cd "$(dirname "$0")/.."
SHARED=${IGKD_SHARED:-../shared}
CARRY=.gpu-carry
CAPTUM=${CAPTUM_VERSION:-0.9.0}

for f in "$GPU_ARCHIVE" "$GPU_TEACHER"; do
  if [ ! -f "$SHARED/$f" ]; then
    echo "gpu_prepare: $SHARED/$f is missing; set IGKD_SHARED to the folder that holds data/ and checkpoints/" >&2
    exit 2
  fi
done

rm -rf "$CARRY.partial"
mkdir -p "$CARRY.partial/wheels" "$CARRY.partial/shared/data" "$CARRY.partial/shared/checkpoints/nordlinglab"
python3 -m pip download -q --no-deps --only-binary=:all: -d "$CARRY.partial/wheels" "captum==$CAPTUM"
cp "$SHARED/$GPU_ARCHIVE" "$CARRY.partial/shared/$GPU_ARCHIVE"
cp "$SHARED/$GPU_TEACHER" "$CARRY.partial/shared/$GPU_TEACHER"
rm -rf "$CARRY" && mv "$CARRY.partial" "$CARRY"  # whole or not at all

echo "gpu_prepare: $CARRY holds $(du -sh "$CARRY" | cut -f1):" >&2
(cd "$CARRY" && find . -type f | sort) >&2
cat >&2 <<'EOF'
On the GPU machine, with .gpu-carry carried (it is git-ignored), from the repository root:

  B=$OUT; OUT=/tmp/gpu-check GPU_CHECK_SECONDS=420 scripts/gpu_check.sh; rc=$?; cp /tmp/gpu-check/summary.md /tmp/gpu-check/gpu-check.tar.gz "$B"/; exit $rc

Rehearse it here first, on the CPU (the gpu tests skip; it proves the script, not the GPU):

  GPU_CHECK_DEVICE=cpu OUT=/tmp/gpu-rehearsal scripts/gpu_check.sh
EOF
