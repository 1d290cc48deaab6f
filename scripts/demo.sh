#!/usr/bin/env bash
# The main job on the embedded default, on the CPU: set-up (see bootstrap.sh), then the whole
# pipeline on generated sample data and ONE tiny base model built offline (nothing is downloaded):
#
#   data synth -> clean -> split -> merge -> stats -> build (the teacher pass, template teacher)
#   -> train agent1, agent2, agent3 (LoRA, TRL + PEFT) on the one tiny base of the dataset
#   -> adapters list / show -> eval agent3 on its holdout -> eval score
#   -> adapters export of the three agents (one vLLM command) / merge
#   -> the chain of the three agents on the test trajectories (pipeline run / score)
#
# Sizes, chosen so that no record is lost and the demo stays short: 60 simulated trajectories of
# 3 to 6 check-ins give records of at most 1,308 tokens of the tiny tokenizer (longest agent1
# 828, agent2 1,308, agent3 1,045; measured with the synth defaults), so --seq_length 1536
# keeps every record whole; the script checks after training that no record was rejected.
# Steps: 10 each for agent1 and agent2, 30 for agent3 (the one evaluated), 4 records a step.
#
# Everything goes to ./demo/ (or $COMAPOI_DEMO_DIR); running it again starts the runs afresh.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
comapoi=.venv/bin/comapoi
demo=${COMAPOI_DEMO_DIR:-demo}
export COMAPOI_DATA_DIR="$demo/data" COMAPOI_OUTPUT_DIR="$demo/output" COMAPOI_CACHE="$demo/cache"
steps=${COMAPOI_DEMO_STEPS:-30}            # agent3's steps
role_steps=${COMAPOI_DEMO_ROLE_STEPS:-10}  # agent1's and agent2's steps
seq_length=1536
step() { printf '\n\033[1m== comapoi %s\033[0m\n' "$*"; "$comapoi" "$@"; }

step env
step plugins list
# Sample data: a simulated NYC in CoMaPOI's agent format (agent1/2/3 files, 2+2+1 records per trajectory).
step data synth --dataset nyc --trajectories 60 --min-checkins 3 --max-checkins 6
# Nothing lost: every line is kept or lands in a rejects file with its reason.
step data clean --dataset nyc --type merged
step data split --dataset nyc --type agent3 --test-size 0.2 --group-by user
step data merge --dataset nyc --shuffle
step data stats --dataset nyc --seq-length "$seq_length" --plot "$demo/lengths.png"
# The teacher pass (CoMaPOI's inverse pass without its defects) over the plain training trajectories,
# here with the no-model template teacher (--teacher transformers --model DIR or openai --url ... for an
# LLM): agent records whose prompts are exactly the chain's, the label at a sampled rank, DPO pairs.
step data build --dataset nyc --train "$demo/data/nyc/nyc_train.jsonl" --teacher template --pairs \
  --output-dir "$demo/build" --overwrite
# Fine-tune the three agents. The first run builds the dataset's tiny base (its tokenizer trained
# on all three agents' data); the other runs reuse it, so the three adapters share one base model.
for type in agent1 agent2 agent3; do
  n=$([ "$type" = agent3 ] && echo "$steps" || echo "$role_steps")
  step train --dataset nyc --type "$type" --model tiny --max_steps "$n" --save_freq "$n" \
    --batch_size 4 --seq_length "$seq_length" --test-size 0.2 --run-tag demo --overwrite
done
runs="$demo/output/demo/sft-nyc"
run1="$runs/bs4-gas1-ms$role_steps-agent1-lr0.005"
run2="$runs/bs4-gas1-ms$role_steps-agent2-lr0.005"
run3="$runs/bs4-gas1-ms$steps-agent3-lr0.005"
# No record lost: every rejects file that cleaning wrote is empty.
lost=$(find "$demo/data/nyc" -name '*reject*' -size +0 | head -n 5)
if [ -n "$lost" ]; then echo "records were rejected: $lost" >&2; exit 1; fi
step adapters list
step eval --adapter "$run3" --max-new-tokens 24
step eval score "$run3/predictions.jsonl" --dataset nyc
step adapters show "$run3"
# Hand over for serving: the three agents as LoRA modules of their one base (prints the vLLM
# command), or one merged into a standalone model.
step adapters export "$run1" "$run2" "$run3" --output-dir "$demo/serve" --overwrite
step adapters merge "$run3" --output-dir "$demo/merged" --overwrite
# -- the chain: Profiler -> Forecaster -> Final_Predictor on the test trajectories ------------------
# One base model with the three adapters switched per agent; the POI table and the training
# trajectories (history, retrieval) are found beside the test file. Short answers keep it quick
# on a CPU (CoMaPOI allows 256 new tokens per agent).
step pipeline run --dataset nyc --test "$demo/data/nyc/nyc_test.jsonl" \
  --agent1 "$run1" --agent2 "$run2" --agent3 "$run3" --max-new-tokens 32 \
  --output-dir "$demo/chain" --overwrite --compat comapoi
step pipeline score "$demo/chain/predictions.jsonl" --compat comapoi
echo
echo "Done. The adapters, their run.json, predictions and metrics are in $runs"
echo "Try: $comapoi adapters list $demo/output   |   $comapoi train --help"
