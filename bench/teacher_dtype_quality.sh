#!/usr/bin/env bash
# What a cheaper teacher costs in quality: the same student distilled for the same steps from the
# fp32 teacher, its int8 and bf16 copies (--teacher-dtype), and with the student itself under bf16
# autocast (--precision bf16); validation perplexity side by side, with each run's training tokens/s. Shares bench/distil_books.sh's folder and settings, so a
# finished distil_books run is reused (its teacher, and its `distilled` run as the fp32 one).
#   bench/teacher_dtype_quality.sh                           # after (or instead of) distil_books.sh
#   TEACHER_STEPS=400 STUDENT_STEPS=200 OUT=runs/q bench/teacher_dtype_quality.sh   # a quicker look
set -euo pipefail
cd "$(dirname "$0")/.."
D=${DISTILLERY_SHARED_DATA:-../shared/data}
OUT=${OUT:-runs/books}
TEACHER_STEPS=${TEACHER_STEPS:-1500}
STUDENT_STEPS=${STUDENT_STEPS:-300}
BATCH=${BATCH:-16}
SEQ=${SEQ:-128}
X=${DISTILLERY:-.venv/bin/distillery}
mkdir -p "$OUT"
common=(--batch-size "$BATCH" --seq-len "$SEQ" --lr 1e-3 --warmup-steps 50 --eval-every 100 --save-every 100
        --eval-batches 20)

[ -f "$OUT/tokenizer/tokenizer.json" ] || \
  $X tokenizer train "$D"/text/books/*.txt --vocab-size 8192 --style gpt2 --out "$OUT/tokenizer"
[ -f "$OUT/data/meta.json" ] || \
  $X prepare "$D/text/books" --include '*.txt' --tokenizer "$OUT/tokenizer" --out "$OUT/data" --val-docs 4
[ -d "$OUT/teacher/model" ] || \
  $X train --model gpt2 --n-layer 6 --n-embd 256 --n-head 4 --n-positions 256 --tokenizer "$OUT/tokenizer" \
    --data "$OUT/data" --out "$OUT/teacher" --max-steps "$TEACHER_STEPS" "${common[@]}"
[ -d "$OUT/student-init" ] || $X student "$OUT/teacher/model" --out "$OUT/student-init"
# name: distill flags (the student trains in fp32 unless --precision says otherwise)
declare -A variants=([fp32]="--teacher-dtype fp32" [int8]="--teacher-dtype int8" [bf16]="--teacher-dtype bf16"
                     [bf16-autocast]="--teacher-dtype bf16 --precision bf16")
for name in fp32 int8 bf16 bf16-autocast; do
  run=$([ "$name" = fp32 ] && echo distilled || echo "distilled-$name")
  # shellcheck disable=SC2086  # the flags split on purpose
  [ -d "$OUT/$run/model" ] || \
    $X distill --teacher "$OUT/teacher/model" --student "$OUT/student-init" --data "$OUT/data" \
      --out "$OUT/$run" --max-steps "$STUDENT_STEPS" ${variants[$name]} "${common[@]}"
done

.venv/bin/python - "$OUT" <<'PY'
import json, math, sys
from pathlib import Path
out = Path(sys.argv[1])
print(f"{'variant':<14} {'steps':>6} {'student val ppl':>16} {'train tokens/s':>15}")
ppl = {}
names = {"fp32": "fp32 teacher", "int8": "int8 teacher", "bf16": "bf16 teacher",
         "bf16-autocast": "bf16 teacher, student under bf16 autocast"}
for dtype in names:
    run = "distilled" if dtype == "fp32" else f"distilled-{dtype}"
    summary = json.loads((out / run / "summary.json").read_text())
    records = [json.loads(line) for line in (out / run / "metrics.jsonl").read_text().splitlines()]
    speed = [r["tokens_per_s"] for r in records if "tokens_per_s" in r][-1]
    ppl[dtype] = summary["val_ppl"]
    print(f"{dtype:<14} {summary['steps']:>6} {summary['val_ppl']:>16.2f} {speed:>15,.0f}")
for dtype in list(names)[1:]:
    print(f"{names[dtype]}: student perplexity {100 * (ppl[dtype] / ppl['fp32'] - 1):+.2f} % against fp32")
PY
