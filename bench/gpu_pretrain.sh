#!/usr/bin/env bash
# GPU pre-training benchmark (issue 3): a GPT-2-small-sized Llama (12 layers x 768, 12 heads, SwiGLU 2048,
# vocab 50,304, tied: 124M parameters), context 1024, bf16 autocast, torch.compile, a few hundred steps on
# Gutenberg prose; tokens/s and MFU against this card's *measured* bf16 matmul peak. Target: MFU >= 50%.
#
#   PYTHON=python3 bash bench/gpu_pretrain.sh [WORKDIR]      # needs a CUDA build of torch; < 5 minutes on one H100/H200
#
# Steps: measure the bf16 matmul peak (8192^3, best of 10) -> BPE tokenizer (50,304) on 12 books -> shards ->
# `tristage pretrain` 300 steps of 32 x 1024 tokens -> median tok/s of the logged steps after compilation, MFU =
# 6 * N * tok/s / measured peak (attention FLOPs excluded, as nanoGPT/BASELINES.md count it; with them, add
# 12 * layers * width * context per token, printed too).
set -euo pipefail
PY=${PYTHON:-python3}
WORK=${1:-runs/gpu_pretrain}
BOOKS=$(ls ../shared/data/pretrain/gutenberg/*.txt.gz | head -12)
mkdir -p "$WORK"
export PYTHONPATH=${PYTHONPATH:-}:$(pwd)

$PY - <<'EOF'
import time, torch
assert torch.cuda.is_available(), "no CUDA device"
n = 8192
a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
for _ in range(3):
    a @ b
torch.cuda.synchronize()
best = float("inf")
for _ in range(10):
    t = time.perf_counter(); a @ b; torch.cuda.synchronize(); best = min(best, time.perf_counter() - t)
print(f"{torch.cuda.get_device_name()}: measured bf16 matmul peak {2 * n**3 / best / 1e12:.0f} TFLOP/s")
open("/tmp/gpu_peak", "w").write(str(2 * n**3 / best))
EOF

[ -f "$WORK/tok/tokenizer.json" ] || $PY -m tristage.cli tokenizer --files $BOOKS --out "$WORK/tok" --vocab-size 50304
[ -f "$WORK/shards/meta.json" ] || $PY -m tristage.cli prepare --inputs $BOOKS --tokenizer "$WORK/tok" \
    --out "$WORK/shards" --val-fraction 0.01 --workers 8
$PY -m tristage.cli pretrain --data "$WORK/shards" --out "$WORK/run" --hidden-size 768 --num-layers 12 \
    --num-heads 12 --intermediate-size 2048 --seq-len 1024 --batch-size 32 --max-steps 300 --warmup-steps 30 \
    --lr 6e-4 --dtype bfloat16 --compile --eval-every 0 --save-every 0 --log-every 10 --sample-prompts "The" \
    --no-progress --device cuda

$PY - "$WORK" <<'EOF'
import json, statistics, sys
from pathlib import Path
run = Path(sys.argv[1]) / "run"
rows = [json.loads(r) for r in (run / "metrics.jsonl").read_text().splitlines()]
tps = [r["tok_per_s"] for r in rows if "tok_per_s" in r][3:]  # after compilation and warm-up
cfg = json.loads((run / "model" / "config.json").read_text())
h, L, V, I = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["vocab_size"], cfg["intermediate_size"]
n = V * h + L * (4 * h * h + 3 * h * I)
peak = float(open("/tmp/gpu_peak").read())
med = statistics.median(tps)
print(f"params {n / 1e6:.1f}M; median {med:,.0f} tok/s over {len(tps)} logged windows")
print(f"MFU (6N) {6 * n * med / peak:.1%} of the measured peak; with attention (6N + 12*L*h*T) "
      f"{(6 * n + 12 * L * h * 1024) * med / peak:.1%}; final loss {rows[-1].get('loss', rows[-2].get('loss'))}")
EOF
