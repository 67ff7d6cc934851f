#!/usr/bin/env bash
# Issue 3's evidence: on the shared books, a GPT-2-style teacher, its distilled half-depth student,
# and the same student trained without the teacher for the same steps and tokens; perplexities on
# held-out books, WikiText-2 raw test and WikiText-103 test, side by side.
#   bench/distil_books.sh                 # ~45 min on a 2-core CPU (docs/results.md has its output)
#   TEACHER_STEPS=3000 STUDENT_STEPS=1500 bench/distil_books.sh
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
[ -d "$OUT/distilled/model" ] || \
  $X distill --teacher "$OUT/teacher/model" --student "$OUT/student-init" --data "$OUT/data" \
    --out "$OUT/distilled" --max-steps "$STUDENT_STEPS" "${common[@]}"
[ -d "$OUT/alone/model" ] || \
  $X train --model "$OUT/student-init" --data "$OUT/data" --out "$OUT/alone" --max-steps "$STUDENT_STEPS" \
    "${common[@]}"

for run in teacher distilled alone; do
  mkdir -p "$OUT/$run/eval"
  [ -f "$OUT/$run/eval/perplexity-wikitext2.json" ] || \
    $X eval perplexity "$OUT/$run/model" --data "$D/text/wikitext-2-raw/wiki.test.raw" --max-length 256 \
      --stride 128 --batch-size 16 --save "$OUT/$run/eval/perplexity-wikitext2.json" > /dev/null
  [ -f "$OUT/$run/eval/perplexity-wikitext103.json" ] || \
    $X eval perplexity "$OUT/$run/model" --data "$D/text/wikitext-103/wiki.test.tokens" --max-length 256 \
      --stride 128 --batch-size 16 --save "$OUT/$run/eval/perplexity-wikitext103.json" > /dev/null
done

.venv/bin/python - "$OUT" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
rows = []
for run in ("teacher", "distilled", "alone"):
    summary = json.loads((out / run / "summary.json").read_text())
    w2 = json.loads((out / run / "eval" / "perplexity-wikitext2.json").read_text())
    w103 = json.loads((out / run / "eval" / "perplexity-wikitext103.json").read_text())
    rows.append((run, summary["parameters"], summary["steps"], summary["tokens"], summary["val_ppl"],
                 w2["perplexity"], w103["perplexity"]))
print(f"{'model':<10} {'params':>10} {'steps':>6} {'tokens':>10} {'books val ppl':>14} {'wikitext-2':>11} {'wikitext-103':>13}")
for r in rows:
    print(f"{r[0]:<10} {r[1]:>10,} {r[2]:>6} {r[3]:>10,} {r[4]:>14.2f} {r[5]:>11.2f} {r[6]:>13.2f}")
(out / "results.json").write_text(json.dumps([dict(zip(
    ("model", "parameters", "steps", "tokens", "books_val_ppl", "wikitext2_ppl", "wikitext103_ppl"), r))
    for r in rows], indent=2))
PY
