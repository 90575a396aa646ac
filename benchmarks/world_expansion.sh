#!/usr/bin/env bash
# Issue-4 measurements in the portraits world, from the shipped recipes, on two CPU lanes:
#   lane A: 10 NADA domains jointly, then the same without replay regularization (ablation);
#   lane B: three successive add-domain calls, 3 SDS domains with / without the directional
#           regularizer, and one MyStyle subject.
# Every result is measured with `expander eval` (JSON in $OUT/*.json, grids in $OUT/*.png);
# benchmarks/world_expansion_report.py turns them into the tables of the README.
#   bash benchmarks/world_expansion.sh [OUT=runs/world-expansion] [N_EVAL=256] [PART...]   (PART: a, add, sds, mystyle)
# EVAL_SEED (default: expander eval's, 1000) picks the evaluation latents; EVAL_SEED=0 reproduces the
# README rows filed before 2026-12-07.
# About 40-60 minutes on a 2-core CPU (lane B is the longer one).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/world-expansion}
N_EVAL=${2:-256}
EVAL_SEED=${EVAL_SEED:-1000}
mkdir -p "$OUT"
export EXPANDER_HOME="$OUT/home" OMP_NUM_THREADS=1 EXPANDER_THREADS=1

evaluate() {  # evaluate MODEL NAME
  expander eval --model "$1" --parent expander/world/weights/portraits --num "$N_EVAL" --seed "$EVAL_SEED" --classifier-samples 0 --out "$OUT/$2.json" --grid "$OUT/$2.png" > "$OUT/$2.txt" 2>/dev/null
}

timed() {  # timed NAME command...: wall seconds into $OUT/NAME.seconds
  local name=$1 start
  shift
  start=$(date +%s)
  "$@" > "$OUT/$name.log" 2>&1
  echo $(( $(date +%s) - start )) > "$OUT/$name.seconds"
}

lane_a() {
  timed nada10 expander expand recipes/world-nada-10.yaml --out "$OUT/nada10"
  evaluate "$OUT/nada10" nada10
  # --set overrides the recipe's own value of a setting, which a line inserted into the YAML would not
  # (a recipe may set these keys itself); with --out, the result is not registered under the recipe's name.
  timed nada10-noreplay expander expand recipes/world-nada-10.yaml --out "$OUT/nada10-noreplay" \
      --set lambda_replay_l2=0.0 --set lambda_replay_perceptual=0.0 --set lambda_gan=0.0
  evaluate "$OUT/nada10-noreplay" nada10-noreplay
}

lane_add() {
  timed add1 expander add-domain "a portrait of a person with glasses" --name glasses --out "$OUT/add"
  evaluate "$OUT/add" add1
  timed add2 expander add-domain "a portrait of a zombie" --name zombie --model "$OUT/add"
  timed add3 expander add-domain "a portrait of a person wearing a hat" --name hat --model "$OUT/add"
  evaluate "$OUT/add" add3
}

lane_sds() {
  timed sds3 expander expand recipes/world-sds-3.yaml --out "$OUT/sds3"
  evaluate "$OUT/sds3" sds3
  timed sds3-nodir expander expand recipes/world-sds-3-nodir.yaml --out "$OUT/sds3-nodir"
  evaluate "$OUT/sds3-nodir" sds3-nodir
}

lane_mystyle() {
  timed mystyle expander expand recipes/world-mystyle.yaml --out "$OUT/mystyle"
  evaluate "$OUT/mystyle" mystyle  # the report's "subjects" holds the identity match
}

if [ $# -gt 2 ]; then  # named parts only, one after the other: ... OUT N_EVAL sds mystyle
  for part in "${@:3}"; do "lane_$part"; done
  exit 0
fi

lane_a &
(lane_add; lane_sds; lane_mystyle) &
wait
echo "done: $OUT"
