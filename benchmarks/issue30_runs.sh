#!/usr/bin/env bash
# Issue 30's long training runs: start (or resume) them in the background, one process per row, one
# thread each, each from a git worktree of the fixed commit its checkpoints were made with (a later
# commit may change the code, and a checkpoint is bound to every setting of its run).
#
#   bash benchmarks/issue30_runs.sh            # resume every unfinished row
#   bash benchmarks/issue30_runs.sh status     # one progress line per row
#   bash benchmarks/issue30_runs.sh save       # copy checkpoints and results into benchmarks/results/ (commit them)
#
# Work folders: /work/runs/<table>/ (outputs), /work/runs-wt-<commit>/ (worktrees), /work/runs-venv-<commit>/.
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
DATA="${ROBUST_SURGERY_DATA:-$REPO/../shared/data}"
RUNS=/work/runs
# table | commit | rows | command (ROW and OUT are filled in)
TABLES=(
  "tiny-resnet18|b06ccf4|paradigm-3 paradigm-2 adversarial-training|benchmarks/paradigms_full.py --model tiny-resnet18 --out OUT --rows ROW --train-only --threads 1 --epochs 3 --train-eps 0.03137254901960784 --train-steps 7 --train-alpha 0.00784313725490196 --adv-weight 1.0 --optimizer sgd --schedule cosine --lr-all 0.01 --lr-lambda 0.1 --batch-size 128 --val-n 1000 --checkpoint-every 25"
  "mnist-cnn|cac53c3|at clean|benchmarks/mnist_cnn.py --row ROW --out OUT"
)
SAVED="$REPO/benchmarks/results/issue30"

worktree() {  # the worktree and venv of a commit, made once
  local c=$1 wt=/work/runs-wt-$1 venv=/work/runs-venv-$1
  if [ ! -d "$wt" ]; then git -C "$REPO" worktree add -q "$wt" "$c" --detach; fi
  if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
    (cd "$wt" && "$venv/bin/pip" install -q -e ".[test]" && "$venv/bin/pip" install -q --no-deps "torchattacks==3.5.1")
  fi
}

case "${1:-run}" in
  status)
    for t in "${TABLES[@]}"; do IFS='|' read -r name _ rows _ <<<"$t"
      for r in $rows; do printf '%s/%s: ' "$name" "$r"
        if [ -f "$RUNS/$name/$r.safetensors" ]; then echo done; else tail -n 1 "$RUNS/$name/$r.err" 2>/dev/null || echo "not started"; fi
      done; done ;;
  save)
    for t in "${TABLES[@]}"; do IFS='|' read -r name _ _ _ <<<"$t"
      [ -d "$RUNS/$name" ] || continue
      mkdir -p "$SAVED/$name"
      (cd "$RUNS/$name" && find . \( -name '*.pt' -o -name '*.json' -o -name '*.safetensors' -o -name '*.out' \) \
         -exec cp --parents {} "$SAVED/$name" \;)
    done; git -C "$REPO" add -f "$SAVED"/*/ckpt-*/finetune-last.pt  # ckpt-*/ and *.safetensors are ignored elsewhere
    for f in "$SAVED"/*/*.safetensors; do [ -f "$f" ] && git -C "$REPO" add -f "$f"; done
    du -sh "$SAVED"/* ;;
  run)
    for t in "${TABLES[@]}"; do IFS='|' read -r name commit rows cmd <<<"$t"
      mkdir -p "$RUNS/$name"
      # a checkpoint saved by an earlier session comes back from the repository
      [ -d "$SAVED/$name" ] && cp -rn "$SAVED/$name/." "$RUNS/$name/"
      for r in $rows; do
        [ -f "$RUNS/$name/$r.safetensors" ] && continue
        if pgrep -af -- "--out $RUNS/$name" | grep -qw -- "$r"; then echo "$name/$r already running"; continue; fi
        worktree "$commit"
        c=${cmd//OUT/$RUNS/$name}; c=${c//ROW/$r}
        (cd /work/runs-wt-$commit && ROBUST_SURGERY_DATA="$DATA" OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 \
          nohup /work/runs-venv-$commit/bin/python $c >"$RUNS/$name/$r.out" 2>>"$RUNS/$name/$r.err" &)
        echo "started $name/$r from $commit"
      done; done ;;
esac
