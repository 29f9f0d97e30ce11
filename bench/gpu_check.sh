#!/usr/bin/env bash
# The GPU check: what only a CUDA machine can show, in at most ~8 minutes on one GPU.
#
#   bash bench/gpu_check.sh [OUT_DIR]        (default bench/results/gpu; needs one CUDA GPU)
#
# 1. the CUDA-marked tests (parts on one GPU in one process: fp32, bf16, compile, channels_last;
#    two ranks sharing the GPU over gloo; NCCL across two GPUs, skipped with one GPU since NCCL
#    refuses two ranks on one device);
# 2. the local executor with all parts on cuda:0 (fp32, bf16, bf16 + compile) for timm resnet18,
#    the CIFAR ResNet-56 and ResNet-101 at batch 128: images/s and each part's phase shares;
# 3. per-block GPU times fed to bench/speedup_model.py, so the modelled K=2..4 speedups come from
#    GPU measurements;
# 4. the distributed executor with two ranks sharing cuda:0 over gloo.
# Every result lands in OUT_DIR; paste the summary into docs/benchmarks.md with the date and GPU.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-bench/results/gpu}
mkdir -p "$out"
export HF_HUB_OFFLINE=1 WANDB_MODE=disabled
python -m pip install -q -e '.[test]' 2>&1 | tail -n 2
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$out/gpu.txt"

echo "== 1. CUDA-marked tests"
# -n 0: in one process, as the CUDA tests were written (the suite runs on xdist workers)
timeout 240 python -m pytest -q -n 0 -m cuda -rs tests 2>&1 | tee "$out/cuda_tests.txt" | tail -n 15

echo "== 2. local executor on cuda:0, batch 128"
summary() {  # name, then recipe overrides
  local name=$1; shift
  timeout 150 frzoo run "$@" train.progress=false logging.wandb=false \
      "run.out_dir=$out/runs/$name" >"$out/$name.log" 2>&1 || { echo "$name: FAILED"; tail -n 5 "$out/$name.log"; return; }
  python - "$out/runs/$name/summary.json" "$name" <<'PY' | tee -a "$out/summary.txt"
import json, sys
s = json.load(open(sys.argv[1]))
shares = "; ".join(", ".join(f"{k} {100 * v:.0f}%" for k, v in row.items()) for row in s["part_time_share"])
print(f"{sys.argv[2]}: {s['images_per_s']:.0f} img/s over {s['steps']} steps ({shares})")
PY
}
: >"$out/summary.txt"
for model in resnet18 cifar_resnet56 cifar_resnet101; do
  common=(model.name=$model data.name=synthetic data.num_train=2560 data.num_test=256
          data.image_size=32 data.batch_size=128 devices=[cuda:0,cuda:0] split.auto=flops
          train.epochs=1 train.log_every=5 train.eval_every=0)
  summary "$model-fp32" "${common[@]}"
  summary "$model-bf16" "${common[@]}" train.precision=bf16
  summary "$model-bf16-compile" "${common[@]}" train.precision=bf16 train.compile=true
done

echo "== 3. per-block GPU times -> modelled speedups"
timeout 120 python bench/speedup_model.py --device cuda --batch 128 \
    --models cifar_resnet56,cifar_resnet101 --out "$out/speedup_model_gpu.json" | tee "$out/speedup_model.txt"

echo "== 4. two ranks sharing cuda:0 over gloo"
summary resnet18-two-ranks-gloo model.name=resnet18 data.name=synthetic data.num_train=1280 \
    data.num_test=256 data.image_size=32 data.batch_size=128 devices=[cuda:0,cuda:0] \
    split.auto=flops executor=distributed distributed.backend=gloo train.epochs=1 train.eval_every=0

echo "== done: $out"
cat "$out/summary.txt"
