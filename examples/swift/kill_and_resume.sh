#!/usr/bin/env bash
# ms-swift + safepoint, end to end, offline on a CPU (about a minute):
#   1. an uninterrupted 30-step LoRA run of a tiny local Qwen2 (10 steps an epoch);
#   2. the same run SIGKILLed while safepoint commits checkpoint-16;
#   3. the same command again: it resumes from v0-*/checkpoint-12 into v1-*, across an epoch boundary;
#   4. the final weights of 3 and 1 are compared bit for bit.
# Needs ms-swift (pip install "safepoint[swift]"). Usage: examples/swift/kill_and_resume.sh [WORK_DIR]
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
work="${1:-$(mktemp -d)}"
python="${PYTHON:-python}"
export PYTHONPATH="$root/src${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 MODELSCOPE_OFFLINE=1 OMP_NUM_THREADS=1

"$python" "$here/make_tiny.py" "$work/tiny" > /dev/null 2>&1
sft() {  # the wrapper: adds the safepoint plugin and resumes from the newest committed checkpoint
  "$python" -m safepoint.integrations.swift sft --model "$work/tiny/model" --model_type qwen2 --template qwen \
    --tuner_type lora --check_model false --gradient_accumulation_steps 1 --dataset "$work/tiny/data.jsonl" \
    --max_steps 30 --save_steps 4 --per_device_train_batch_size 4 --seed 0 --report_to none "$@"
}

echo "1. uninterrupted run"
sft --output_dir "$work/ref" > "$work/ref.log" 2>&1
echo "2. SIGKILL while committing checkpoint-16"
KILL_IN_SAVE=16 sft --output_dir "$work/run" --external_plugins "$here/fault_plugin.py" \
  --callbacks kill_in_save > "$work/killed.log" 2>&1 && { echo "expected a SIGKILL"; exit 1; }
ls "$work"/run/v0-*/
echo "3. the same command again"
sft --output_dir "$work/run" > "$work/resumed.log" 2>&1
grep "safepoint: resuming from" "$work/resumed.log"
echo "4. compare"
"$python" - "$work" <<'PY'
import glob, sys, torch
from safetensors.torch import load_file
work = sys.argv[1]
ref = load_file(glob.glob(f"{work}/ref/v0-*/checkpoint-30/adapter_model.safetensors")[0])
got = load_file(glob.glob(f"{work}/run/v1-*/checkpoint-30/adapter_model.safetensors")[0])
same = ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)
print("final weights bitwise equal to the uninterrupted run:", same)
sys.exit(0 if same else 1)
PY
