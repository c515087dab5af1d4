#!/usr/bin/env bash
# The GPU proof run, for ONE device call of about 9 minutes: both DiffusionADs, the paper's (Alg. 1 and 2) and the
# authors' released variant (--variant authors), each (1) benched at the paper's configuration (256 px, base 128;
# the variant at its batch of 16: speed and peak GPU memory), (2) trained on DAGM Class8 for MINUTES and evaluated
# on the whole Test split. Prepare the data here first (the device takes 64 MiB of working tree, ../shared does
# not travel; loading the copy at 256 px gives exactly the pixels the loader makes from the original):
#   echo /.gpu/ >> .git/info/exclude
#   python diffusionad.py resize --data ../shared/data/dagm/Class8 --out .gpu/dagm/Class8 --img-size 256
# then on the device:  bash scripts/gpu_proof.sh        (carry: .gpu)
# Writes under $OUT: bench-{paper,authors}.txt, train-{paper,authors}.txt, metrics-*.json, log-*.csv,
# loss-*.png, panels-*.png. MINUTES: training budget of each (default 2.5); SKIP_BENCH=1 skips the benches;
# SPEED (default "--amp --compile") and EXTRA (more train flags) exist for a dry run on a CPU:
#   OUT=/tmp/gp MINUTES=0.2 SPEED= EXTRA="--preset cpu --device cpu" SKIP_BENCH=1 bash scripts/gpu_proof.sh
set -euo pipefail
OUT=${OUT:-gpu_out}; MINUTES=${MINUTES:-2.5}; DATA=${DATA:-.gpu/dagm/Class8}; SPEED=${SPEED---amp --compile}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || echo "no GPU") | tee "$OUT/info.txt"
python3 -c "import torch; print('torch', torch.__version__)" | tee -a "$OUT/info.txt"
for VARIANT in paper authors; do
  BATCH=$([ $VARIANT = authors ] && echo 16 || echo 6)
  if [ "${SKIP_BENCH:-0}" != 1 ]; then  # the paper's configuration: 256 px, base 128
    timeout 150 python3 diffusionad.py bench --data "$DATA" --variant $VARIANT --batch-size $BATCH --n-images 32 \
      --train-size 256 --eval-batch 16 --train-steps 10 $SPEED 2>&1 | tee "$OUT/bench-$VARIANT.txt" \
      || echo "bench stopped (timeout or error)" | tee -a "$OUT/bench-$VARIANT.txt"
  fi
  # the variant's configuration otherwise (defaults: 256 px whole images, base 128) for a fixed wall-clock budget;
  # the final model is evaluated on the whole Test split as always
  RUN=runs/gpu-dagm-$VARIANT-$(date +%Y%m%d-%H%M%S)
  python3 diffusionad.py train --data "$DATA" --variant $VARIANT --max-minutes "$MINUTES" $SPEED --ckpt-every 2000 \
    --eval-batch 16 --log-every 30 --out "$RUN" ${EXTRA:-} 2>&1 | tee "$OUT/train-$VARIANT.txt"
  python3 diffusionad.py eval --run "$RUN" --save-maps ${SPEED/--compile/} --eval-batch 16 > /dev/null
  cp "$RUN/metrics.json" "$OUT/metrics-$VARIANT.json"
  cp "$RUN/log.csv" "$OUT/log-$VARIANT.csv"
  python3 scripts/plot.py loss "$RUN/log.csv" "$OUT/loss-$VARIANT.png"
  python3 scripts/figure.py "$OUT/panels-$VARIANT.png" "$RUN"/eval_ckpt_*/
done
