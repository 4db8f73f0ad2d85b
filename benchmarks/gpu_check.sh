#!/usr/bin/env bash
# GPU check of issue 14 ("Training on many GPUs and many machines"), in one go and under
# 8 minutes, on a machine with an NVIDIA GPU, python3 (3.12) and torch, and no network:
#
#   benchmarks/gpu_check.sh [WHEELS_DIR]      (from anywhere; it works in the repo root)
#
# 1. installs the wheels carried in WHEELS_DIR (offline, one at a time: a missing or broken
#    one is skipped and named), 2. `pytest -m gpu` (bf16 autocast step, channels_last,
#    torch.compile, the out-of-memory fallback), 3. pretrain on the CIFAR-10 JPEG tree
#    (../shared/data/cifar10-jpg.tar.gz, all 10 classes) with bf16 + channels_last: images/s, MFU
#    and the time to 90% / 94% val accuracy when reached, 4. the same with DDP over every GPU
#    (when there are 2 or more), 5. ONNX Runtime's CUDA provider vs PyTorch latency, 6.
#    airbench94 on the same images when an airbench wheel is carried.
# Everything lands in $OUT (default /tmp/imagepipe-gpu-check), with summary.txt. Each step has its own
# `timeout` inside the total budget (BUDGET_S, default 470 s); a step that fails or runs out
# of time is reported and the next one runs.
#
# Written without a GPU to try it on (none was available to the team): prepared, not yet run.
set -uo pipefail

cd "$(dirname "$0")/.."
WHEELS=${1:-}
PY=${PYTHON:-python3}
OUT=${OUT:-${TMPDIR:-/tmp}/imagepipe-gpu-check}
BUDGET_S=${BUDGET_S:-470}
TARBALL=${CIFAR_TARBALL:-../shared/data/cifar10-jpg.tar.gz}
EPOCHS=${EPOCHS:-16}
WIDTH=${WIDTH:-64}
DEVICE=${DEVICE:-cuda} # cpu only for a dry run of the script itself
START=$(date +%s)
mkdir -p "$OUT"
SUMMARY="$OUT/summary.txt"
: >"$SUMMARY"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" IMAGEPIPE_TRACKING=0 DVC_NO_ANALYTICS=1 \
  MLFLOW_DISABLE_TELEMETRY=true ORT_DISABLE_TELEMETRY=1 PREFECT_SERVER_ANALYTICS_ENABLED=false

say() { echo "== $*" | tee -a "$SUMMARY"; }
left() { echo $((BUDGET_S - ($(date +%s) - START))); }

# step NAME SECONDS CMD...: run CMD under `timeout`, at most SECONDS and never past the budget.
step() {
  local name=$1 limit=$2 rest code t0
  shift 2
  rest=$(left)
  ((rest < limit)) && limit=$rest
  if ((limit < 15)); then
    say "$name: SKIPPED (the 8-minute budget is spent)"
    return 124
  fi
  t0=$(date +%s)
  # bash -c: `timeout` runs programs, and most steps are this script's (exported) functions.
  timeout -k 5 "$limit" bash -c '"$@"' step "$@" >"$OUT/$name.log" 2>&1
  code=$?
  say "$name: exit $code in $(($(date +%s) - t0)) s (limit $limit s; log $OUT/$name.log)"
  ((code == 124)) && say "$name: TIMED OUT"
  return $code
}

install_wheels() {
  [[ -n $WHEELS && -d $WHEELS ]] || { say "wheels: no folder given: using what is installed"; return 0; }
  local w ok=0 bad=0
  for w in "$WHEELS"/*.whl; do
    [[ -e $w ]] || continue
    # --no-deps: one wheel whose dependency is not carried must not stop the others.
    if "$PY" -m pip install -q --no-index --no-deps --find-links "$WHEELS" "$w" 2>/dev/null ||
      "$PY" -m pip install -q --user --break-system-packages --no-index --no-deps "$w" 2>/dev/null; then
      ok=$((ok + 1))
    else
      bad=$((bad + 1)); echo "skipped $(basename "$w")" >>"$OUT/wheels.log"
    fi
  done
  say "wheels: $ok installed, $bad skipped (see wheels.log)"
}

say "imagepipe GPU check, $(date -u +%FT%TZ), budget ${BUDGET_S}s"
export PY OUT WHEELS TARBALL EPOCHS WIDTH DEVICE SUMMARY START BUDGET_S DATA="$OUT/data"
export -f say left install_wheels
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee -a "$SUMMARY"
step wheels 150 install_wheels
"$PY" - <<'EOF' 2>&1 | tee -a "$SUMMARY"
import torch
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.device_count()} GPU(s), "
      f"bf16 {torch.cuda.is_available() and torch.cuda.is_bf16_supported()}")
for m in ("onnxruntime", "torchvision", "pydantic", "pytest", "airbench"):
    try:
        print(f"  {m} {__import__(m).__version__}")
    except Exception as e:
        print(f"  {m}: missing ({type(e).__name__})")
EOF
NGPU=$("$PY" -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)

# 2. The tests marked gpu (skipped without CUDA; here they must run).
step pytest_gpu 120 "$PY" -m pytest -m gpu -q -p no:cacheprovider -o addopts="-ra" \
  tests/integration/test_distributed.py tests/unit/test_train.py
tail -n 3 "$OUT/pytest_gpu.log" | tee -a "$SUMMARY"

# 3. CIFAR-10 from the JPEG tree: ingest (all 10 classes as the source), then pretrain.
prepare_cifar() {
  mkdir -p "$OUT/raw" && tar -xzf "$TARBALL" -C "$OUT/raw" || return 1
  local root
  root=$(dirname "$(dirname "$(find "$OUT/raw" -type d -path '*/train/airplane' | head -n 1)")")
  "$PY" - "$root" "$OUT/params.yaml" "$EPOCHS" "$WIDTH" "$DEVICE" <<'EOF' || return 1
import sys, yaml
root, path, epochs, width, device = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
p = yaml.safe_load(open("params/cifar10.yaml"))
p["data"]["source"] = {"uri": f"imagefolder:{root}"}                 # all 10 classes
p["data"]["target"] = {"uri": f"imagefolder:{root}", "classes": ["cat", "dog"],
                       "train_per_class": 50}                          # unused here
p["data"].update(val_fraction=0.1, allow_leakage=True)              # 5,000 val images
p["augment"]["copies"] = 0
# A GPU-sized run: wider net, bigger batch, bf16 + channels_last (what CUDA gets by default).
p["pretrain"].update(width=width, epochs=epochs, batch_size=512, lr=0.2, warmup_epochs=1,
                     label_smoothing=0.2, device=device, precision="bf16", devices=1,
                     checkpoint_every_steps=0, compile=False)
yaml.safe_dump(p, open(path, "w"), sort_keys=False)
EOF
  "$PY" -m stages.ingest --params "$OUT/params.yaml" --out "$DATA" &&
    "$PY" -m stages.augment --params "$OUT/params.yaml" --source "$DATA/source" \
      --out "$DATA/augmented" --metrics "$OUT/augment.json" --preview "$OUT/preview.png"
}

pretrain() { # pretrain OUTDIR [KEY=VALUE for params.pretrain ...]
  local dir=$1
  shift
  "$PY" - "$OUT/params.yaml" "$dir/params.yaml" "$@" <<'EOF' || return 1
import sys, yaml
p = yaml.safe_load(open(sys.argv[1]))
for kv in sys.argv[3:]:
    k, v = kv.split("=", 1)
    p["pretrain"][k] = yaml.safe_load(v)
yaml.safe_dump(p, open(sys.argv[2], "w"), sort_keys=False)
EOF
  "$PY" -m stages.pretrain --params "$dir/params.yaml" --data "$DATA/augmented" \
    --model "$dir/pretrained.pt" --checkpoints "$dir/ck" --metrics "$dir/pretrain.json" \
    --plot "$dir/pretrain.csv"
}

report_run() { # report_run OUTDIR LABEL
  "$PY" - "$1" "$2" <<'EOF' 2>&1 | tee -a "$SUMMARY"
import csv, json, sys
from pathlib import Path
d, label = Path(sys.argv[1]), sys.argv[2]
m = json.loads((d / "pretrain.json").read_text())
rows = list(csv.DictReader(open(d / "pretrain.csv")))
from stages.core.history import speed
seconds, rate = speed(rows)  # the figure of the stage's own log line, from its plots table
print(f"{label}: {rate:.0f} images/s (world size {m.get('world_size')}), "
      f"{m['epochs']} epochs in {seconds:.1f} s, val accuracy {m['val_accuracy']}")
# MFU: the model's training FLOPs (3 x forward, counted by torch at the stored size) times the
# epochs' images/s, over the GPUs' dense bf16 peak (PEAK_TFLOPS, else a table by GPU name).
# The epoch time includes its validation pass, so this slightly understates the step's MFU.
try:
    import os, torch
    from torch.utils.flop_counter import FlopCounterMode
    from stages.core.models import load_model_file
    model, mf = load_model_file(d / "pretrained.pt")
    x = torch.zeros(1, mf.spec.in_channels, mf.spec.image_size, mf.spec.image_size)
    with FlopCounterMode(display=False) as fc:
        model.eval()(x)
    train_flops = 3 * fc.get_total_flops()
    name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    table = {"H200": 989, "H100": 989, "A100": 312, "L40S": 362, "L4": 121, "A10": 125}
    peak = float(os.environ.get("PEAK_TFLOPS") or next(
        (v for k, v in table.items() if k in name), 0)) * 1e12 * max(1, int(m.get("world_size") or 1))
    achieved = train_flops * rate
    mfu = f"{achieved / peak:.1%} of {peak / 1e12:.0f} TFLOP/s" if peak else "no peak known"
    print(f"  MFU {mfu} ({train_flops / 1e6:.1f} MFLOP a training image, "
          f"{achieved / 1e12:.2f} TFLOP/s on {name})")
except Exception as err:  # a figure missing must not hide the others
    print(f"  MFU: not computed ({type(err).__name__}: {err})")
for goal in (0.90, 0.94):
    spent = 0.0
    for r in rows:
        spent += float(r["seconds"])
        if r["val_acc"] and float(r["val_acc"]) >= goal:
            print(f"  {goal:.0%} val accuracy after {spent:.1f} s of training (epoch {r['epoch']})")
            break
    else:
        print(f"  {goal:.0%} val accuracy: not reached in {len(rows)} epochs")
EOF
}

export -f prepare_cifar pretrain
if [[ -f $TARBALL ]]; then
  if step cifar_ingest 150 prepare_cifar; then
    mkdir -p "$OUT/bf16"
    step pretrain_bf16 150 pretrain "$OUT/bf16" && report_run "$OUT/bf16" "pretrain bf16 + channels_last, 1 GPU"
    if ((NGPU >= 2)); then
      mkdir -p "$OUT/ddp"
      step pretrain_ddp 90 pretrain "$OUT/ddp" devices=auto epochs=4 &&
        report_run "$OUT/ddp" "pretrain DDP over $NGPU GPUs (4 epochs)"
    else
      say "ddp: $NGPU GPU visible: DDP over GPUs not measured (the CPU/gloo tests cover the logic)"
    fi
  fi
else
  say "cifar: $TARBALL not found: pretrain, DDP and airbench steps skipped"
fi

# 5. ONNX Runtime CUDA provider vs PyTorch, on the pretrained model (or an untrained one).
latency() {
  "$PY" - "$OUT/bf16/pretrained.pt" <<'EOF'
import statistics, sys, time
from pathlib import Path
import numpy as np, torch
import onnxruntime as ort
from stages.core.models import ModelFile, ModelSpec, build_model, load_model_file
from stages.core.served import Served
from stages.export import export_onnx
path = Path(sys.argv[1])
if path.exists():
    model, mf = load_model_file(path)
else:  # no CIFAR run: an untrained model of the same shape times the same
    spec = ModelSpec("resnet_small", 10, 3, 32, 64, 0.0)
    model, mf = build_model(spec), ModelFile(spec, [str(i) for i in range(10)], [0.5] * 3, [0.25] * 3)
model = model.eval()
proto = export_onnx(model, mf, 18)
gpu = torch.cuda.is_available()  # False only in a dry run of this script without a GPU
provider = "CUDAExecutionProvider" if gpu else "CPUExecutionProvider"
print("ORT providers available:", ort.get_available_providers())
sess = ort.InferenceSession(proto.SerializeToString(), providers=[provider])
print("ORT session providers:", sess.get_providers())
name = sess.get_inputs()[0].name
dev = torch.device("cuda" if gpu else "cpu")
served = Served(model, mf.mean, mf.std).eval().to(dev)
sync = torch.cuda.synchronize if gpu else (lambda: None)
def timed(fn, n=30):
    for _ in range(3): fn()
    out = []
    for _ in range(n):
        t = time.perf_counter(); fn(); out.append(time.perf_counter() - t)
    return statistics.median(out) * 1e3
for batch in (1, 64, 512):
    x = np.random.default_rng(0).integers(0, 256, (batch, 32, 32, 3), dtype=np.uint8)
    xt = torch.from_numpy(x).to(dev)
    def torch_fp32():
        with torch.inference_mode(): served(xt); sync()
    def torch_bf16():
        with torch.inference_mode(), torch.autocast(dev.type, torch.bfloat16): served(xt); sync()
    ort_ms = timed(lambda: sess.run(None, {name: x}))
    print(f"batch {batch}: ORT {provider} {ort_ms:.3f} ms, torch fp32 {timed(torch_fp32):.3f} ms, "
          f"torch bf16 autocast {timed(torch_bf16):.3f} ms (medians; ORT's include the copies "
          f"to and from the host, as a server's do)")
EOF
}
export -f latency
step ort_vs_torch 60 latency
grep -E "^batch|providers" "$OUT/ort_vs_torch.log" | tee -a "$SUMMARY"

# 6. airbench94 (KellerJordan/cifar10-airbench) on the same JPEG-decoded images, when carried.
airbench() {
  mkdir -p "$OUT/airbench/cifar10" && cd "$OUT/airbench" || return 1
  # airbench's loader reads cifar10/{train,test}.pt when present instead of downloading.
  "$PY" - "$DATA/source" <<'EOF' || return 1
import sys, numpy as np, torch
from stages.core.dataset import load_dataset
ds = load_dataset(sys.argv[1])
for name, splits in (("train", ("train", "val")), ("test", ("test",))):
    idx = np.sort(np.concatenate([ds.indices(s) for s in splits]))
    torch.save({"images": torch.from_numpy(np.asarray(ds.images[idx])),
                "labels": torch.from_numpy(np.asarray(ds.labels[idx]).astype(np.int64)),
                "classes": ds.classes}, f"cifar10/{name}.pt")
    print(name, len(idx), "images")
EOF
  "$PY" -c "import airbench; airbench.train94()"
}
if ls "${WHEELS:-/nonexistent}"/airbench*.whl >/dev/null 2>&1 && [[ -d $DATA/source ]]; then
  export -f airbench
  step airbench94 90 airbench
  tail -n 5 "$OUT/airbench94.log" | tee -a "$SUMMARY"
else
  say "airbench94: no airbench wheel carried (or no CIFAR data): skipped"
fi

say "done in $(($(date +%s) - START)) s; summary in $SUMMARY"
