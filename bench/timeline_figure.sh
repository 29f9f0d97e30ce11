#!/usr/bin/env bash
# The example timelines of docs/timeline.md and docs/schedules.md: fr, bp, 1f1b and zb1 (M=2
# micro-batches) at K=2 on a tiny model (timm's test_resnet, 32x32 synthetic images, batch 32),
# one process per part, steps 8..10 traced; then `frzoo report` draws fr and bp into
# docs/figures/timeline_fr_bp.png and all four into docs/figures/timeline_schedules.png.
#
#   bash bench/timeline_figure.sh /tmp/frzoo-timeline
#
# FRZOO names the command (default `frzoo`; from a checkout: FRZOO="python -m frzoo.cli").
set -euo pipefail
out=${1:-/tmp/frzoo-timeline}
frzoo=${FRZOO:-frzoo}
common=(model.name=test_resnet data.name=synthetic data.num_train=512 data.batch_size=32
        data.image_size=32 "split.points=[layer3]" "devices=[cpu,cpu]" executor=distributed
        train.threads=1 train.max_steps=12 train.log_every=4 train.eval_every=0
        train.progress=false train.trace.start=8 train.trace.steps=3)
for algo in fr bp 1f1b zb1; do
  rm -rf "$out/$algo"
  $frzoo run "${common[@]}" algorithm.name=$algo run.out_dir="$out/$algo"
done
rm -rf "$out/report" "$out/report4"
$frzoo report "$out/fr" "$out/bp" -o "$out/report"
cp "$out/report/timeline.png" "$(dirname "$0")/../docs/figures/timeline_fr_bp.png"
$frzoo report "$out/fr" "$out/bp" "$out/1f1b" "$out/zb1" -o "$out/report4"
cp "$out/report4/timeline.png" "$(dirname "$0")/../docs/figures/timeline_schedules.png"
