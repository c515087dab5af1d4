#!/usr/bin/env bash
# The GPU proof run (issue: the paper's configuration shown learning on a GPU), for ONE device call of
# about 9 minutes. Prepare the data here first (the device takes 64 MiB of working tree, ../shared does
# not travel; loading the copy at 256 px gives exactly the pixels the loader makes from the original):
#   echo /.gpu/ >> .git/info/exclude
#   python data.py resize --data ../shared/data/dagm/Class8 --out .gpu/dagm/Class8 --img-size 256
# then on the device:  bash docs/gpu_proof.sh        (carry: .gpu)
# Writes under $OUT: bench.txt, train.txt, metrics.json, log.csv, loss.png, panels.png.
# MINUTES: training budget (default 5); SKIP_BENCH=1 skips the bench; SPEED (default "--amp --compile")
# and EXTRA (more train flags) exist for a dry run on a CPU:
#   OUT=/tmp/gp MINUTES=0.3 SPEED= EXTRA="--preset cpu --device cpu" SKIP_BENCH=1 bash docs/gpu_proof.sh
set -euo pipefail
OUT=${OUT:-gpu_out}; MINUTES=${MINUTES:-5}; DATA=${DATA:-.gpu/dagm/Class8}; SPEED=${SPEED---amp --compile}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || echo "no GPU") | tee "$OUT/bench.txt"
python3 -c "import torch; print('torch', torch.__version__)" | tee -a "$OUT/bench.txt"
if [ "${SKIP_BENCH:-0}" != 1 ]; then  # the paper's configuration: 256 px, base 128, batch 6
  timeout 200 python3 diffusionad.py bench --data "$DATA" --n-images 32 --train-size 256 --eval-batch 16 \
    --train-steps 20 $SPEED 2>&1 | tee -a "$OUT/bench.txt" || echo "bench stopped (timeout or error)" | tee -a "$OUT/bench.txt"
fi
# The paper's configuration (defaults: 256 px whole images, base 128, batch 3 + 3, lr 1e-4) for a fixed
# wall-clock budget; the final model is evaluated on the whole Test split as always.
RUN=runs/gpu-dagm-$(date +%Y%m%d-%H%M%S)
python3 diffusionad.py train --data "$DATA" --max-minutes "$MINUTES" $SPEED --ckpt-every 2000 \
  --eval-batch 16 --log-every 30 --out "$RUN" ${EXTRA:-} 2>&1 | tee "$OUT/train.txt"
python3 diffusionad.py eval --run "$RUN" --save-maps ${SPEED/--compile/} --eval-batch 16 > /dev/null
cp "$RUN/metrics.json" "$RUN/log.csv" "$OUT/"
python3 docs/plot.py loss "$RUN/log.csv" "$OUT/loss.png"
python3 docs/figure.py "$OUT/panels.png" "$RUN"/eval_ckpt_*/
