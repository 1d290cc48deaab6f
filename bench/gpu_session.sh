#!/usr/bin/env bash
# Every GPU measurement comapoi still needs, in ONE device call (a session gets 15 minutes of the GPU
# machine in all, start-up included, and at most 10 per call). Rows are written to $OUT as they finish,
# so a call cut short still brings back what it measured.
#
# Here, once:   bash ../shared/gpu/make_site.sh            # .gpu/site.tgz: trl 1.15, unsloth, bitsandbytes, liger
# Device tool:  run(command="bash bench/gpu_session.sh", carry=[".gpu"], timeout_s=590)
#
# What it runs (in this order, the most wanted first, each stopped by the deadline):
#   1. the Qwen2.5-7B table: comapoi-trl and comapoi-unsloth as `comapoi train` runs them by default
#      (--fit plans micro-batch, checkpointing and 16-bit / 4-bit from the free memory), Unsloth as usually
#      run, the original recipe; then lever rows (length-grouped batches; LoRA dropout 0 for Unsloth's
#      fused LoRA path; checkpointing forced on; packing; Liger kernels); MFU against the bf16 matmul rate measured on the card;
#      each comapoi row records --fit's memory estimate next to the measured peak;
#   2. the Unsloth plugin trains the tiny model through the real CLI on the GPU and the adapter reloads
#      with plain PEFT and generates.
# A CPU dry run of the script itself (tiny model, Unsloth's CPU fallback):
#   PATH=$PWD/.venv-unsloth/bin:$PATH GPU_SESSION_PRESET=tiny OUT=/tmp/gs bash bench/gpu_session.sh
# Outputs in $OUT: machine.txt, 7b.json / 7b.md / 7b.log, logs/ (one log per row), unsloth-cli.log.
set -uo pipefail
cd "$(dirname "$0")/.."
SECONDS=0
BUDGET=${GPU_SESSION_SECONDS:-560}          # stop before the device tool's limit (pass timeout_s >= this + 20)
OUT=${OUT:-$PWD/.cache/gpu-session}
mkdir -p "$OUT"
if [ -f .gpu/site.tgz ]; then
  mkdir -p "$HOME/gpusite" && tar xzf .gpu/site.tgz -C "$HOME/gpusite"
  export PYTHONPATH="$HOME/gpusite/site:$PWD"
fi
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
SCRATCH=${GPU_SESSION_SCRATCH:-$HOME/comapoi-bench}

{ nvidia-smi; python - <<'EOF'
import importlib.metadata as m, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU visible")
for name in ("transformers", "trl", "peft", "datasets", "accelerate", "bitsandbytes", "unsloth", "liger-kernel"):
    try:
        print(name, m.version(name))
    except m.PackageNotFoundError:
        print(name, "not installed")
EOF
} > "$OUT/machine.txt" 2>&1

# 1. the 7B table (leave 100 s for part 2)
python bench/bench_gpu_train.py --preset "${GPU_SESSION_PRESET:-qwen2.5-7b}" --steps 6 --warmup 2 --measure-peak \
  --configs comapoi-trl,comapoi-unsloth,unsloth,original \
  --variant "trl-grouped=comapoi-trl:--group-by-length" \
  --variant "uns-nodrop=comapoi-unsloth:--lora-dropout 0" \
  --variant "trl-gc=comapoi-trl:--gradient-checkpointing" \
  --variant "trl-packing=comapoi-trl:--packing" \
  --variant "trl-liger=comapoi-trl:--liger" \
  --timeout 240 --deadline $((BUDGET - 100 - SECONDS)) --scratch "$SCRATCH" \
  --json "$OUT/7b.json" --markdown "$OUT/7b.md" > "$OUT/7b.log" 2>&1
echo "7b table: exit $? after ${SECONDS} s" >> "$OUT/machine.txt"
cp -r "$SCRATCH/logs" "$OUT/logs" 2>/dev/null

# 2. the Unsloth plugin through the real CLI on the GPU, and the adapter reloads with plain PEFT
if [ $((BUDGET - SECONDS)) -gt 60 ]; then
  (
    set -e
    work=$(mktemp -d)
    python -m comapoi_cli data synth --dataset nyc --data-dir "$work/data" -n 30 --min-checkins 4 --max-checkins 8
    timeout $((BUDGET - SECONDS - 10)) python -m comapoi_cli train --backend unsloth --model tiny --dataset nyc \
      --data-dir "$work/data" --type agent3 --max_steps 6 --save_freq 6 --seq_length 2048 --test-size 4 \
      --output_dir "$work/out" --json
    run=$(dirname "$(ls "$work"/out/*/sft-*/*/run.json)")
    python - "$run" <<'EOF'
import json, sys, torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer
run = sys.argv[1]
config = json.load(open(f"{run}/adapter_config.json"))
device = "cuda" if torch.cuda.is_available() else "cpu"
base = AutoModelForCausalLM.from_pretrained(config["base_model_name_or_path"]).to(device)
model = PeftModel.from_pretrained(base, run).eval()
tok = AutoTokenizer.from_pretrained(run)
ids = tok("<|im_start|>user\nNext POI?<|im_end|>\n<|im_start|>assistant\n", return_tensors="pt").to(device)
out = model.generate(**ids, max_new_tokens=8, do_sample=False)
print("adapter reloaded with plain PEFT on", torch.cuda.get_device_name(0) if device == "cuda" else "the CPU", "and generated", out.shape[1] - ids["input_ids"].shape[1], "tokens")
EOF
  ) > "$OUT/unsloth-cli.log" 2>&1
  echo "unsloth cli: exit $? after ${SECONDS} s" >> "$OUT/machine.txt"
fi
echo "done after ${SECONDS} s" >> "$OUT/machine.txt"
