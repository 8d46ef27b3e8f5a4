#!/usr/bin/env bash
# The :full configs on an accelerator, in one short run (docs/scale.md, "On a GPU"):
#   1. the :full curriculum for a few minutes (fewer steps per phase), on the built-in
#      corpus: its LM report gives training tokens/s and MFU in the real loop;
#   2. each :full train step alone (experiments/compile_full.py --run_steps): compile
#      time, ms per step, throughput, MFU and peak memory, codec / lm / joint.
#
#   OUT=/tmp/gpu_check bash experiments/gpu_full_check.sh
#
# Everything lands in $OUT: env.txt, curriculum.log (with a time stamp per phase line),
# full_run.tgz (the run's reports and metrics, no checkpoints), steps_*.json, steps.md.
# Each part runs under its own time limit, so a part that hangs (e.g. a slow compile)
# leaves the others their time. Environment knobs, with their defaults:
#   PLATFORM=cuda,cpu SIZE=full CURRICULUM_S=270 CODEC_STEP_S=60 LM_STEP_S=130 JOINT_STEP_S=110
#   CODEC_STEPS=2000 LM_STEPS=600 JOINT_STEPS=100 RUN_STEPS=20
# (at most 570 s in all: one device call of 10 minutes).
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export JAX_PLATFORMS="${PLATFORM:-cuda,cpu}"  # cpu: first states are made on the host (sharding.init_on_mesh)
OUT="${OUT:-/tmp/gpu_check}"; mkdir -p "$OUT"
SIZE="${SIZE:-full}"; CODEC="${CODEC_STEPS:-2000}"; LM="${LM_STEPS:-600}"
WORK="$(mktemp -d)"

# Progress bars to lines; the same line once; a time stamp on each, as it comes.
stamp() {
  python3 -u -c '
import os, re, time
seen, rest = set(), b""
while chunk := os.read(0, 1 << 16):
  *lines, rest = re.split(rb"[\r\n]", rest + chunk)
  for line in lines:
    text = line.decode("utf-8", "replace").rstrip()
    if text and text not in seen:
      seen.add(text)
      print(time.strftime("%H:%M:%S"), text, flush=True)
if rest.strip():
  print(time.strftime("%H:%M:%S"), rest.decode("utf-8", "replace").rstrip(), flush=True)'
}

{ date; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null
  python3 -c "import sys, jax, flax, optax; print(sys.version.split()[0], 'jax', jax.__version__, jax.devices(), 'flax', flax.__version__, 'optax', optax.__version__)"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

timeout "${CURRICULUM_S:-270}" python3 experiments/train.py \
  --config="configs/curriculum.py:$SIZE" --workdir="$WORK/run" \
  --config.train.num_steps="$CODEC" --config.train.eval_every="$CODEC" \
  --config.train.checkpoint_every="$CODEC" \
  --config.lm.train.num_steps="$LM" --config.lm.train.eval_every="$LM" \
  --config.lm.train.checkpoint_every="$LM" --config.lm.train.log_every=50 \
  --config.joint.num_steps="${JOINT_STEPS:-100}" 2>&1 | stamp > "$OUT/curriculum.log"
echo "curriculum: exit ${PIPESTATUS[0]}" | tee -a "$OUT/curriculum.log"
grep -v -E ':\s+[0-9]{1,2}%\|' "$OUT/curriculum.log" | tail -20
(cd "$WORK/run" 2>/dev/null && find . -path '*checkpoints*' -prune -o -path ./lm_data -prune -o \
   \( -name '*.json' -o -name '*.jsonl' -o -name '*.md' \) -size -4M -print \
   | tar czf "$OUT/full_run.tgz" -T -)

declare -A LIMIT=([codec]="${CODEC_STEP_S:-60}" [lm]="${LM_STEP_S:-130}" [joint]="${JOINT_STEP_S:-110}")
for phase in codec lm joint; do
  timeout "${LIMIT[$phase]}" python3 experiments/compile_full.py --config_arg="$SIZE" \
    --devices=1 --shardings=replicated --phases="$phase" --run_steps="${RUN_STEPS:-20}" \
    --json_out="$OUT/steps_$phase.json" 2>&1 | stamp | grep -E '\||compiled|rror' \
    | tee -a "$OUT/steps.md"
  echo "$phase: exit ${PIPESTATUS[0]}" | tee -a "$OUT/steps.md"
done
rm -rf "$WORK"
