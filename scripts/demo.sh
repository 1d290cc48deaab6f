#!/usr/bin/env bash
# The main job on the embedded default, on the CPU: set-up (see bootstrap.sh), then the whole
# pipeline on generated sample data and a tiny model built offline (nothing is downloaded):
#
#   data synth -> clean -> split -> merge -> stats -> train (tiny Qwen2, LoRA, TRL + PEFT)
#   -> adapters list / show -> eval on the holdout -> eval score -> adapters export / merge
#
# Everything goes to ./demo/ (or $COMAPOI_DEMO_DIR); running it again starts the run afresh.
# 44 s on 2 idle CPU cores after the set-up (about 2 minutes when the cores are busy).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
comapoi=.venv/bin/comapoi
demo=${COMAPOI_DEMO_DIR:-demo}
export COMAPOI_DATA_DIR="$demo/data" COMAPOI_OUTPUT_DIR="$demo/output" COMAPOI_CACHE="$demo/cache"
steps=${COMAPOI_DEMO_STEPS:-40}
step() { printf '\n\033[1m== comapoi %s\033[0m\n' "$*"; "$comapoi" "$@"; }

step env
step plugins list
# Sample data: a simulated NYC in CoMaPOI's agent format (agent1/2/3 files, 2+2+1 records per trajectory).
step data synth --dataset nyc --trajectories 60 --min-checkins 4 --max-checkins 10
# Nothing lost: every line is kept or lands in a rejects file with its reason.
step data clean --dataset nyc --type merged
step data split --dataset nyc --type agent3 --test-size 0.2 --group-by user
step data merge --dataset nyc --shuffle
step data stats --dataset nyc --seq-length 2048 --plot "$demo/lengths.png"
# Fine-tune the Final_Predictor (agent3) on the tiny model built offline from the data.
step train --dataset nyc --type agent3 --model tiny --max_steps "$steps" --save_freq 20 \
  --batch_size 4 --seq_length 2048 --test-size 0.2 --run-tag demo --overwrite
run="$demo/output/demo/sft-nyc/bs4-gas1-ms$steps-agent3-lr0.005"
step adapters list
step eval --adapter "$run" --max-new-tokens 24
step eval score "$run/predictions.jsonl" --dataset nyc
step adapters show "$run"
# Hand over for serving: as a LoRA module (prints the vLLM command), or merged into a standalone model.
step adapters export "$run" --to "$demo/serve" --names agent3 --overwrite
step adapters merge "$run" --output "$demo/merged" --overwrite
echo
echo "Done. The adapter, its run.json, predictions and metrics are in $run"
echo "Try: $comapoi adapters list $demo/output   |   $comapoi train --help"
