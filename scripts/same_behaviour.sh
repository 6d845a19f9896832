#!/usr/bin/env bash
# Prove a refactor changed no behaviour: run the default comparison on a reduced corpus
# (a few minutes) with the code of BASE (a commit) and with the working tree, each into its
# own run directory, then compare them with scripts/same_outputs.py: every safetensors and
# parquet file byte-identical, every JSON file the same numbers (timings aside).
#
#   bash scripts/same_behaviour.sh BASE [OUT]      e.g. bash scripts/same_behaviour.sh 13676bf
#
# KEYS (comma-separated) names JSON fields the working tree adds on purpose and BASE lacks
# (default: "digests,key", the done markers' file digests and the corpus manifest's key).
set -euo pipefail
cd "$(dirname "$0")/.."
base=${1:?usage: same_behaviour.sh BASE [OUT]}
out=${2:-/tmp/samesheep-same-behaviour}
keys=${KEYS:-digests,key}
python=.venv/bin/python
reduced=(
    --set corpus.max_tokens=12000 --set corpus.heldout_tokens=4000
    --set train.train_tokens=40000
    --set representations.units=400 --set representations.subsets=20
)
rm -rf "$out" && mkdir -p "$out"
git worktree add --detach "$out/base-src" "$base" >/dev/null
trap 'git worktree remove --force "$out/base-src"' EXIT
echo "base ($base) -> $out/base"
PYTHONPATH="$out/base-src/src" $python -m samesheep run --set "run_dir=\"$out/base\"" "${reduced[@]}" \
    2> "$out/base.log"
echo "working tree -> $out/tree"
$python -m samesheep run --set "run_dir=\"$out/tree\"" "${reduced[@]}" 2> "$out/tree.log"
$python scripts/same_outputs.py --allow-added "$keys" "$out/base" "$out/tree"
