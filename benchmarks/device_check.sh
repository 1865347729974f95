#!/usr/bin/env bash
# The GPU checks of the inference issue (issue 6), as one script for a device lease.
#
# Here, once, fetch the Python 3.12 wheels the device image lacks (about 56 MB; .whl/ is git-ignored):
#   bash benchmarks/device_check.sh --download
# Then, with the device tool:
#   run(command="STEPS='smoke unet dynunet' bash benchmarks/device_check.sh", carry=[".whl"], timeout_s=400)
# Three files land in $OUT (the device tool brings back at most 8): results.jsonl (one line per row: the smoke check
# of the bundled sample on the GPU against the CPU, benchmarks/inference.py's rows and summaries, each tagged with
# its step, and how each step ended), stderr.log, and nvidia-smi.txt.
# Steps, most important first: smoke unet dynunet dynunet-long segresnet unet-e2e io (all by default: about 15 minutes
# by their time limits, more than one lease holds; pick some with STEPS="smoke unet"). Each benchmark variant is a
# child process that costs 10 to 30 s of imports, CUDA start-up and cuDNN autotuning before it times anything. The
# network-part steps use a synthetic CT on the untrained models' own grid (1.5 x 1.5 x 2 mm), so the network runs on
# the volume the issue's table names; the end-to-end and memory steps use a 0.8 x 0.8 x 1.5 mm CT that is resampled.
# QUICK=1 DEVICE=cpu runs the same steps on small inputs, to check the script itself on a machine without a GPU.
set -uo pipefail
cd "$(dirname "$0")/.."
WHEELS="monai==1.6.1 SimpleITK==2.5.7 PyMaxflow==1.3.2 nibabel==5.4.2 isal==1.9.1"

if [ "${1:-}" = "--download" ]; then
    exec python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl $WHEELS
fi

OUT=${OUT:-$(mktemp -d)}
DEVICE=${DEVICE:-cuda}
PYTHON=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1 && [ "$DEVICE" = cuda ]; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { echo "wheel install failed" >&2; exit 1; }
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD/MedSegExtension${PYTHONPATH:+:$PYTHONPATH}"
SCRATCH=$(mktemp -d)
export MEDSEG_CACHE_DIR="$SCRATCH/cache"
RESULTS="$OUT/results.jsonl"
LOG="$OUT/stderr.log"
echo "results in $OUT"
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || echo "no nvidia-smi" > "$OUT/nvidia-smi.txt"

if [ "${QUICK:-0}" = 1 ]; then
    CT=(48 48 32); LARGE=(48 48 64); MID=(40 40 32); ROI=(32 32 32); BIG_ROI=(32 32 32); REPEATS=1
else
    CT=(512 512 320); LARGE=(512 512 1000); MID=(272 272 224); ROI=(96 96 96); BIG_ROI=(128 128 128); REPEATS=3
fi

STEPS=${STEPS:-smoke unet dynunet dynunet-long segresnet unet-e2e io}
step() {  # name, seconds, command...: run with a time limit, keep going whatever happens, log how it ended
    local name=$1 limit=$2
    shift 2
    case " $STEPS " in *" $name "*) ;; *) return 0 ;; esac
    local start=$SECONDS
    echo "=== $name" >> "$LOG"
    timeout "$limit" "$@" 2>> "$LOG" | sed -u "s/^{/{\"step\": \"$name\", /" | tee -a "$RESULTS"
    local code=${PIPESTATUS[0]}
    echo "{\"step\": \"$name\", \"exit\": $code, \"seconds\": $((SECONDS - start))}" | tee -a "$RESULTS"
}

# 1. The engine on the GPU: the bundled model on the bundled sample, labels against the CPU's.
step smoke 60 "$PYTHON" - "$DEVICE" "$SCRATCH" <<'PY'
import json, sys, time
import numpy as np, SimpleITK as sitk, torch
from medseg.segmenter import Segmenter
device, out = sys.argv[1], sys.argv[2]
sample = "Resources/SampleData/hippocampus-mni152-t1.nii.gz"
labels, row = {}, {"device_name": torch.cuda.get_device_name() if device == "cuda" else "cpu"}
for name in dict.fromkeys([device, "cpu"]):
    segmenter = Segmenter(None, device=name)
    segmenter.segment_files([sample], f"{out}/smoke-{name}.nii.gz")
    start = time.perf_counter()
    result = segmenter.segment_files([sample], f"{out}/smoke-{name}.nii.gz")
    row[name] = {"seconds": round(time.perf_counter() - start, 3), "precision": result.inference.precision,
                 "backend": result.inference.backend, "window_batch": result.inference.window_batch,
                 "ml": [round(s.volume_ml, 3) for s in result.statistics], "notes": result.inference.notes}
    labels[name] = sitk.GetArrayFromImage(sitk.ReadImage(f"{out}/smoke-{name}.nii.gz"))
row["agreement_with_cpu"] = float(np.mean(labels[device] == labels["cpu"]))
print(json.dumps(row))
PY

bench() {  # name, seconds, benchmark arguments...
    local name=$1 limit=$2
    shift 2
    step "$name" "$limit" "$PYTHON" benchmarks/inference.py --device "$DEVICE" --repeats "$REPEATS" "$@"
}
GRID=(--spacing 1.5 1.5 2)  # the untrained models' grid: the network runs on the volume as it is
# 2. The issue's models, network part against plain MONAI on the same GPU (SegResNet, the third, in 4.).
bench unet 110 --model unet --classes 2 --shape "${CT[@]}" "${GRID[@]}" --roi "${ROI[@]}" --network-only \
    --variants monai medseg medseg-fp32 medseg-bf16
bench dynunet 170 --model dynunet --classes 105 --shape "${MID[@]}" "${GRID[@]}" --roi "${BIG_ROI[@]}" \
    --network-only --variants monai medseg medseg-fp32 medseg-fp16
# 3. Memory: the 105-class model on a long CT resampled to 1.5 mm (the target is 7 GB of GPU memory); MedSeg alone,
#    one run each of the network part and file in, file out (REPEATS=0: no warm-up; it did not fit 200 s with one).
REPEATS=0 bench dynunet-long 240 --model dynunet --classes 105 --shape "${LARGE[@]}" --roi "${BIG_ROI[@]}" \
    --variants medseg
# 4. SegResNet, network part.
bench segresnet 120 --model segresnet --classes 2 --shape "${CT[@]}" "${GRID[@]}" --roi "${ROI[@]}" --network-only \
    --variants monai medseg medseg-fp32
# 5. End to end, file in and file out, against the tutorial-style pipeline on a CT that is resampled.
REPEATS=1 bench unet-e2e 150 --model unet --classes 2 --shape "${CT[@]}" --roi "${ROI[@]}" --variants tutorial medseg
# 6. Reading and writing compressed volumes against ITK's reader and writer, on this machine's cores.
step io 90 "$PYTHON" benchmarks/nifti_io.py --repeats 1 --shape "${CT[@]}"
echo "done; results in $OUT"
