#!/usr/bin/env bash
# Issue 5's evidence: a small RoBERTa-style masked LM pre-trained here on the shared books, its
# distilled half-depth student, GLUE dev scores of both on the five shared tasks with the
# student/teacher ratio, and the student's generated model card.
#   bench/glue_roberta.sh                  # about an hour on a 2-core CPU
# Masking is uniform (--mlm-smoothing 0, as BERT and RoBERTa pre-train) for the teacher and the
# student alike, so that their validation perplexities compare; DistilBERT's count^-0.7 smoothing
# favours rare tokens, which made a from-scratch teacher learn far slower here.
set -euo pipefail
cd "$(dirname "$0")/.."
D=${DISTILLERY_SHARED_DATA:-../shared/data}
OUT=${OUT:-runs/glue}
TEACHER_STEPS=${TEACHER_STEPS:-1200}
STUDENT_STEPS=${STUDENT_STEPS:-400}
GLUE_EXAMPLES=${GLUE_EXAMPLES:-1000}
GLUE_LR=${GLUE_LR:-3e-4}  # small models fine-tune best at a higher rate than roberta-base's 1e-5-3e-5
GLUE_EPOCHS=${GLUE_EPOCHS:-5}
TASKS=${TASKS:-"sst2 mrpc cola stsb rte"}
X=${DISTILLERY:-.venv/bin/distillery}
mkdir -p "$OUT"
common=(--batch-size 16 --seq-len 128 --lr 7e-4 --warmup-steps 100 --eval-every 100 --save-every 100
        --eval-batches 10 --mlm-smoothing 0)

[ -f "$OUT/tokenizer/tokenizer.json" ] || \
  $X tokenizer train "$D"/text/books/*.txt --vocab-size 8192 --style roberta --out "$OUT/tokenizer"
[ -f "$OUT/data/meta.json" ] || \
  $X prepare "$D/text/books" --include '*.txt' --tokenizer "$OUT/tokenizer" --out "$OUT/data" --val-docs 4
[ -d "$OUT/teacher/model" ] || \
  $X train --model roberta-base --n-layer 6 --n-embd 256 --n-head 4 --n-positions 128 \
    --tokenizer "$OUT/tokenizer" --data "$OUT/data" --out "$OUT/teacher" --max-steps "$TEACHER_STEPS" "${common[@]}"
[ -d "$OUT/student-init" ] || $X student "$OUT/teacher/model" --out "$OUT/student-init"
[ -d "$OUT/distilled/model" ] || \
  $X distill --teacher "$OUT/teacher/model" --student "$OUT/student-init" --data "$OUT/data" \
    --out "$OUT/distilled" --max-steps "$STUDENT_STEPS" "${common[@]}"

for run in teacher distilled; do
  mkdir -p "$OUT/$run/eval"
  for task in $TASKS; do
    folder=$(ls -d "$D"/glue/* | grep -i -E "/(${task}|$(echo "$task" | sed 's/sst2/sst-2/;s/stsb/sts-b/'))$" | head -1)
    [ -f "$OUT/$run/eval/glue-$task.json" ] || \
      $X glue "$task" "$OUT/$run/model" --data "$folder" --epochs "$GLUE_EPOCHS" --lr "$GLUE_LR" --batch-size 32 --max-length 128 \
        --max-train-examples "$GLUE_EXAMPLES" --save "$OUT/$run/eval/glue-$task.json" > /dev/null
  done
done
[ -f "$OUT/distilled/eval/bias.json" ] || \
  $X eval bias "$OUT/distilled/model" --data "$D/bias" --save "$OUT/distilled/eval/bias.json" > /dev/null
[ -f "$OUT/distilled/eval/speed.json" ] || \
  $X eval speed "$OUT/distilled/model" "$OUT/teacher/model" --save "$OUT/distilled/eval/speed.json" > /dev/null
$X card "$OUT/distilled" --teacher-eval "$OUT/teacher/eval" --out "$OUT/distilled/README.md"

.venv/bin/python - "$OUT" $TASKS <<'PY'
import json, sys
from pathlib import Path
out, tasks = Path(sys.argv[1]), sys.argv[2:]
print(f"{'task':<6} {'teacher':>8} {'student':>8} {'ratio':>6}   (dev, the cards' metric x100)")
for task in tasks:
    t = json.loads((out / "teacher" / "eval" / f"glue-{task}.json").read_text())["card_score"]
    s = json.loads((out / "distilled" / "eval" / f"glue-{task}.json").read_text())["card_score"]
    print(f"{task:<6} {t:>8.1f} {s:>8.1f} {s / t if t else float('nan'):>6.2f}")
PY
