#!/usr/bin/env bash
# One prepared run on a lent GPU machine (see README "GPU"): proves the CUDA path (model fixture,
# loss and sampler tests on cuda), measures the paper-size and small networks, then trains the
# shipped small network for TRAIN_SECONDS and samples every snapshot for the learning curve.
# Needs: the repo, .gpu/qm9 (train/val shards + stats + manifest), .whl (pydantic wheels for py3.12).
# Locally (CPU smoke test):  OUT=/tmp/gpu_out ACCEL=cpu TRAIN_SECONDS=20 DATA=data/qm9 bash tools/gpu_session.sh
set -uo pipefail
OUT=${OUT:-/tmp/gpu_out}
ACCEL=${ACCEL:-gpu}
DEV=$([ "$ACCEL" = gpu ] && echo cuda || echo cpu)
TRAIN_SECONDS=${TRAIN_SECONDS:-390}
DATA=${DATA:-.gpu/qm9}
SNAP=${SNAP:-1500}
INIT_FROM=${INIT_FROM:-}   # e.g. qm9_small: continue the shipped model instead of training from scratch
BENCH_REPS=${BENCH_REPS:-3}
BENCH_TASKS=${BENCH_TASKS:-train32,train128,fwd100,sample100}
TESTS=${TESTS:-tests/flowmol_ext/model tests/flowmol_ext/test_sampler.py}
mkdir -p "$OUT"
exec > >(tee "$OUT/session.log") 2>&1
export PYTHONUNBUFFERED=1
if [ "$ACCEL" = gpu ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}
PY=${PY:-python3}
date; nvidia-smi -L 2>/dev/null; $PY -c "import torch, pytorch_lightning, pydantic; print('torch', torch.__version__, 'lightning', pytorch_lightning.__version__, 'pydantic', pydantic.__version__, 'cuda', torch.cuda.is_available())"

echo "== 1. CUDA-path tests (fixtures, loss, CTMC step, equivariance, sampler) on $DEV"
$PY -m pytest -q -p no:cacheprovider $TESTS --device "$DEV" 2>&1 | tail -15

echo "== 2. speed: paper-size and small networks on $DEV"
$PY bench/bench_model.py --config paper --device "$DEV" --reps "$BENCH_REPS" --tasks "$BENCH_TASKS" --sample-steps 100
$PY bench/bench_model.py --config small --device "$DEV" --reps "$BENCH_REPS" --tasks "$BENCH_TASKS" --sample-steps 100

echo "== 3. pretrain the small network for ${TRAIN_SECONDS}s${INIT_FROM:+ from $INIT_FROM}"
rm -rf /tmp/gpu_run
$PY - <<PYEOF
import datetime
from flowmol_ext.config import load_config
from flowmol_ext.lightning import PretrainConfig, pretrain
t = str(datetime.timedelta(seconds=int("$TRAIN_SECONDS")))
h, m, s = t.split(":")
train = {"run_dir": "/tmp/gpu_run", "max_time": f"00:{int(h):02d}:{int(m):02d}:{int(s):02d}", "accelerator": "$ACCEL"}
if "$INIT_FROM":
    train["init_from"] = "$INIT_FROM"
cfg = load_config(PretrainConfig, "configs/flowmol_qm9_small_gpu.yaml", {"train": train, "data": {"data_dir": "$DATA"}})
pretrain(cfg, snapshot_every_n_steps=int("$SNAP"))
PYEOF
mkdir -p "$OUT/model"
cp /tmp/gpu_run/model_last/config.yaml /tmp/gpu_run/model_last/model.pt "$OUT/model/"
cp /tmp/gpu_run/checkpoints/last.ckpt "$OUT/last.ckpt"
cp /tmp/gpu_run/logs/v0/metrics.csv "$OUT/metrics.csv"

echo "== 4. sample 1000 molecules x 100 steps from each snapshot"
$PY tools/sample_snapshots.py /tmp/gpu_run "$OUT/snapshot_samples.pt" --n 1000 --steps 100 --device "$DEV" --max-snapshots 6
date; ls -la "$OUT" "$OUT/model"
