#!/usr/bin/env bash
# One prepared check of igkd's GPU paths (issue 15), at most 8 minutes on one GPU:
#
#   1. the suite's GPU tests (pytest -m gpu: IG on CUDA against the CPU, bf16/fp16 autocast IG,
#      distill with --amp, torchrun with nccl where there are 2 GPUs, export of a CUDA-trained
#      checkpoint, a CUDA-saved checkpoint on a machine without a GPU), their measured figures
#      in the JUnit XML;
#   2. benchmarks/train_throughput.py (with its cuDNN autotuner A/B), ig_throughput.py and
#      data_throughput.py with --device cuda;
#   3. one epoch of the evidence recipe's student (cifar10_evidence_gpu) on the full JPEG
#      CIFAR-10 training set, for the time per epoch;
#   4. as much of `igkd experiment montecarlo --config cifar10_evidence_gpu` as the minutes left
#      allow (resumable: rerun it with the same --out to go on).
#
#   scripts/gpu_check.sh                       # outputs in $OUT if set, else ./gpu-check-out
#   GPU_CHECK_SECONDS=480 OUT=/tmp/check scripts/gpu_check.sh
#   GPU_CHECK_STAGES=gpu_tests,ig_throughput scripts/gpu_check.sh   # rerun only these stages
#   GPU_CHECK_DEVICE=cpu scripts/gpu_check.sh  # rehearsal where there is no GPU: every stage on
#                                              # the CPU (the gpu tests skip), to prove the script
#                                              # itself before GPU minutes are spent on it
#
# Stages: gpu_tests, decode_data, train_throughput, ig_throughput, data_throughput, epoch_probe,
# evidence. Needs torch with CUDA, igkd's test extras (pytest, captum) and, for the last two, the
# JPEG CIFAR-10 archive and the paper's published KD+IG student (../shared by default,
# IGKD_SHARED=DIR to point elsewhere). A GPU machine that reaches neither ../shared nor PyPI gets
# them from .gpu-carry/, which scripts/gpu_prepare.sh fills beforehand: wheels, installed only when
# the image lacks captum, and a copy of the archive and the teacher. A stage whose inputs are
# absent is skipped with the reason. Writes summary.md (every stage: status, seconds, its
# figures), one log per stage, and gpu-check.tar.gz (every text output, no checkpoints: the one
# file to bring back). Exit status 1 when a GPU test or a benchmark failed (the evidence stage
# ending at its time limit is expected), 2 when there is no CUDA GPU and this is no rehearsal.
set -uo pipefail
. "$(dirname "$0")/gpu_common.sh" "$@"  # GPU_ARCHIVE, GPU_TEACHER; --help; no arguments
cd "$(dirname "$0")/.."
REPO=$PWD
PY=${PYTHON:-python3}  # GPU images often have python3 and no python
export PYTHONPATH="$REPO/src${PYTHONPATH:+:$PYTHONPATH}"  # igkd from this checkout, installed or not
BUDGET=${GPU_CHECK_SECONDS:-480}
DEVICE=${GPU_CHECK_DEVICE:-cuda}
STAGES=${GPU_CHECK_STAGES:-all}
STAGES=,${STAGES//[[:space:]]/},  # spaces dropped: 'gpu_tests, evidence' names two stages
OUT=${OUT:-$REPO/gpu-check-out}
CARRY=$REPO/.gpu-carry
if [ -n "${IGKD_SHARED:-}" ]; then SHARED=$IGKD_SHARED
elif [ -d "$REPO/../shared" ]; then SHARED=$REPO/../shared
else SHARED=$CARRY/shared; fi
DATA=/tmp/igkd-test-data/cifar10-jpg   # where the benchmarks and tests look for the JPEG CIFAR-10
TEACHER=$SHARED/$GPU_TEACHER
export IGKD_CACHE_DIR=${IGKD_CACHE_DIR:-/tmp/igkd-gpu-check-cache}  # decoded data and stores shared by stages
case $DEVICE in
  cuda|cpu) ;;
  *) echo "gpu_check: GPU_CHECK_DEVICE must be cuda or cpu, not '$DEVICE'" >&2; exit 2;;
esac
for name in ${STAGES//,/ }; do
  case $name in
    all|gpu_tests|decode_data|train_throughput|ig_throughput|data_throughput|epoch_probe|evidence) ;;
    *) echo "gpu_check: GPU_CHECK_STAGES names no stage '$name'; stages: gpu_tests, decode_data," \
         "train_throughput, ig_throughput, data_throughput, epoch_probe, evidence (or all)" >&2; exit 2;;
  esac
done
mkdir -p "$OUT"
START=$SECONDS
STATUS=()
FAILED=0

left() { echo $((BUDGET - (SECONDS - START))); }
wanted() { [ "$STAGES" = ",all," ] || [[ $STAGES == *",$1,"* ]]; }

# stage NAME LIMIT CMD...: run CMD with a time limit (at most what is left, less a margin for the
# summary), its output in $OUT/NAME.log, and record the status and seconds
stage() {
  local name=$1 limit=$2 began=$SECONDS rc
  shift 2
  wanted "$name" || return 0  # not asked for (GPU_CHECK_STAGES): no line in the summary
  local room=$(($(left) - 20))
  if [ "$room" -lt 30 ]; then
    STATUS+=("$name|skipped: $(left) s left of $BUDGET|0")
    return 0
  fi
  local clamped=0
  if [ "$limit" -gt "$room" ]; then limit=$room; clamped=1; fi
  echo "== $name (limit ${limit} s, $(left) s left)" >&2
  timeout -s INT -k 20 "$limit" "$@" >"$OUT/$name.log" 2>&1
  rc=$?
  local took=$((SECONDS - began))
  if [ "$rc" -eq 0 ]; then
    STATUS+=("$name|passed|$took")
  elif [ "$clamped" -eq 1 ] && { [ "$rc" -eq 124 ] || [ "$rc" -eq 130 ] || [ "$rc" -eq 137 ]; }; then
    # cut short by the check's own budget, not by its limit: what it did is kept, not a failure
    STATUS+=("$name|stopped: the check's time budget ran out (${limit} s left for it)|$took")
    return 0
  elif [ "$rc" -eq 124 ] || [ "$rc" -eq 130 ] || [ "$rc" -eq 137 ]; then
    STATUS+=("$name|stopped at its time limit (${limit} s)|$took")
  else
    STATUS+=("$name|FAILED (exit $rc), see $name.log|$took")
  fi
  return $rc
}

# wheels carried from elsewhere (scripts/gpu_prepare.sh), installed only where captum is missing
if [ -d "$CARRY/wheels" ] && ! "$PY" -c "import captum" 2>/dev/null; then
  SITE=/tmp/igkd-gpu-check-site
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
    "$CARRY"/wheels/*.whl >"$OUT/wheels.log" 2>&1 || { cat "$OUT/wheels.log" >&2; exit 1; }
  export PYTHONPATH="$PYTHONPATH:$SITE"  # after the image's own packages: only what it lacks
fi

DEVICE=$DEVICE "$PY" - >"$OUT/device.txt" 2>&1 <<'EOF'
import os, platform
import torch
if os.environ["DEVICE"] == "cpu":
    print(f"device: REHEARSAL on the CPU ({os.cpu_count()} cores, {platform.machine()}), not a GPU check: "
          f"the gpu tests skip and every figure is a CPU one; torch {torch.__version__}")
elif not torch.cuda.is_available():
    raise SystemExit("gpu_check: no CUDA GPU (torch.cuda.is_available() is False); run it where there is one, "
                     "or GPU_CHECK_DEVICE=cpu for a rehearsal of the script on the CPU")
else:
    print(f"device: {torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}, "
          f"{torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB; torch {torch.__version__}, "
          f"CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}, bf16 {torch.cuda.is_bf16_supported()}")
EOF
if [ $? -ne 0 ]; then
  cat "$OUT/device.txt" >&2
  exit 2
fi
cat "$OUT/device.txt" >&2

# the JPEG CIFAR-10, unpacked once where tests/helpers_data.py and the benchmarks look
if [ ! -d "$DATA/train" ] && [ -f "$SHARED/$GPU_ARCHIVE" ]; then
  mkdir -p "$DATA.partial" && tar -xzf "$SHARED/$GPU_ARCHIVE" -C "$DATA.partial" && mv "$DATA.partial" "$DATA"
fi

# 1. the GPU tests (figures as JUnit properties: record_property needs the xunit1 family), from
# tests/test_gpu.py alone, where they all are: collecting the whole suite imports what a GPU
# image may lack (scipy, optuna), and one module that fails to import stops every test
stage gpu_tests 180 "$PY" -m pytest -m gpu -q -rs -p no:cacheprovider -o junit_family=xunit1 \
  --junitxml="$OUT/gpu_tests.xml" tests/test_gpu.py || FAILED=1

# the JPEG CIFAR-10 decoded once into the cache every later stage reads (not charged to a benchmark)
if [ -d "$DATA/train" ]; then
  stage decode_data 60 "$PY" -c "import igkd; d = igkd.load_dataset('imagefolder:$DATA'); print(len(d.train), len(d.test))"
fi

# 2. throughput on the GPU (short: fewer steps and rounds than the CPU figures in the README)
# --cudnn-benchmark: the compute limit with cuDNN's autotuner off and on, a child process each
stage train_throughput 110 "$PY" benchmarks/train_throughput.py --device "$DEVICE" --steps 20 --rounds 2 \
  --cudnn-benchmark || FAILED=1
IG_ARGS=(--device "$DEVICE" --images 64 --repeats 2 --error-images 16)
# the engine's CUDA default of 256 interpolated samples per pass was set without a GPU: sweep it
[ "$DEVICE" = cuda ] && IG_ARGS+=(--batch-sizes 1024,3200)  # 3200 = all 64 images x 50 steps at once
if [ -f "$TEACHER" ]; then  # map errors on a trained network (a random one is nearly linear along the path)
  IG_ARGS+=(--error-model mobilenetv2:drop=5 --error-weights "$TEACHER")
fi
stage ig_throughput 90 "$PY" benchmarks/ig_throughput.py "${IG_ARGS[@]}" || FAILED=1
stage data_throughput 70 "$PY" benchmarks/data_throughput.py --device "$DEVICE" --images 1000 --rounds 2 || FAILED=1

# 3. and 4. the evidence recipe on the real data, as far as the time goes
if [ -d "$DATA/train" ] && [ -f "$TEACHER" ]; then
  wanted epoch_probe && rm -rf "$OUT/epoch_probe"  # a run folder from an earlier check would be refused
  stage epoch_probe 60 "$PY" -m igkd distill --config cifar10_evidence_gpu --device "$DEVICE" --data "imagefolder:$DATA" \
    --method student --epochs 1 --out "$OUT/epoch_probe" --json
  stage evidence 100000 "$PY" -m igkd experiment montecarlo --config cifar10_evidence_gpu --device "$DEVICE" \
    --data "imagefolder:$DATA" --teacher "$TEACHER" --out "$OUT/evidence"
else
  why="no JPEG CIFAR-10 ($SHARED/$GPU_ARCHIVE) or teacher ($TEACHER): scripts/gpu_prepare.sh carries them"
  wanted epoch_probe && STATUS+=("epoch_probe|skipped: $why|0")
  wanted evidence && STATUS+=("evidence|skipped: $why|0")
fi

# summary.md: every stage's status and the figures it produced
if [ ${#STATUS[@]} -gt 0 ]; then printf '%s\n' "${STATUS[@]}" >"$OUT/.status"; else : >"$OUT/.status"; fi
"$PY" - "$OUT" <<'EOF'
import json, re, sys
import xml.etree.ElementTree as ET
from pathlib import Path

out = Path(sys.argv[1])
lines = ["# igkd GPU check", "", (out / "device.txt").read_text().strip(), "",
         "| stage | status | seconds |", "|---|---|---:|"]
for row in filter(None, (out / ".status").read_text().splitlines()):  # none when no stage ran
    name, status, took = row.split("|", 2)
    lines.append(f"| {name} | {status} | {took} |")


def tail(name, pattern):
    p = out / f"{name}.log"
    return [l for l in p.read_text(errors="replace").splitlines() if re.search(pattern, l)] if p.exists() else []


xml = out / "gpu_tests.xml"
if xml.exists():
    lines += ["", "## GPU tests", ""]
    for case in ET.parse(xml).getroot().iter("testcase"):
        state = "failed" if case.find("failure") is not None or case.find("error") is not None else \
            "skipped" if case.find("skipped") is not None else "passed"
        why = case.find("skipped").get("message", "") if state == "skipped" else ""
        props = {p.get("name"): p.get("value") for p in case.iter("property")}
        figures = ", ".join(f"{k} {float(v):.4g}" if re.match(r"^-?[\d.e+-]+$", v or "") else f"{k} {v}"
                            for k, v in props.items())
        lines.append(f"- {case.get('name')}: {state}{' (' + why + ')' if why else ''}{': ' + figures if figures else ''}")
for name, pattern in (("train_throughput", r"img/s|training throughput|\(b\)/|\(c\)/|\(e\)"),
                      ("ig_throughput", r"^\||RESULT|SWEEP|bound:|^model"),
                      ("data_throughput", r"img/s|loader /|OK|NOT MET|training images")):
    found = tail(name, pattern)
    if found:
        lines += ["", f"## {name}", "", "```", *found, "```"]
probe = out / "epoch_probe" / "metrics.jsonl"
rows = [json.loads(l) for l in probe.read_text().splitlines()] if probe.exists() else []
epoch_s = rows[0]["seconds"] if rows else None
if rows:
    lines += ["", "## One epoch of the evidence student", "",
              f"{rows[0]['images_per_s']:.0f} images/s, {epoch_s:.1f} s per epoch (student, full training set less "
              f"the validation split); the recipe's 6 methods x 10 runs x 100 epochs: about "
              f"{6 * 10 * 100 * epoch_s / 3600:.1f} h of training at this rate (overlay and KD add little per step; "
              "the IG precompute and the corruption scoring come on top)."]
runs = sorted((out / "evidence" / "runs").glob("*/metrics.jsonl")) if (out / "evidence" / "runs").exists() else []
if (out / "evidence.log").exists():
    done = [json.loads(l) for p in runs for l in p.read_text().splitlines()]
    lines += ["", "## Evidence run (cifar10_evidence_gpu), as far as it got", "",
              f"{len(runs)} run(s) started, {sum((p.parent / 'summary.json').exists() for p in runs)} finished, "
              f"{len(done)} epoch(s) trained; resumable: rerun the same command with --out {out / 'evidence'}.", "",
              "```", *tail("evidence", r"precompute|store|teacher|epoch|run \d|error")[-15:], "```"]
(out / "summary.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
EOF
# every text output in one archive (no checkpoints, stores or decoded data): what comes back
(cd "$OUT" && find . -path ./gpu-check.tar.gz -prune -o -type f \( -name '*.md' -o -name '*.txt' -o -name '*.log' \
  -o -name '*.xml' -o -name '*.json' -o -name '*.jsonl' -o -name '*.yaml' -o -name '*.csv' -o -name '*.png' \
  -o -name '.status' \) -print0 | tar -czf gpu-check.tar.gz --null -T -)
echo "gpu_check: $((SECONDS - START)) s; outputs in $OUT (summary.md, all text in gpu-check.tar.gz)" >&2
exit $FAILED
