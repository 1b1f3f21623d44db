#!/usr/bin/env bash
# The seed's scripts/run_7b_cpt.sh in cptkit terms: QLoRA continued pretraining of Meta-Llama-3-8B on a
# folder of domain text, on every GPU of this machine with DeepSpeed ZeRO-1, then the LoRA merge,
# then the measurements the seed did not have (held-out perplexity before/after, and a report).
#
#   bash examples/run_7b_cpt.sh /data/med_qa_textbook [/data/general_text]
#
# What it needs: on GPUs (CUDA), `pip install "cptkit[gpu]"` (bitsandbytes for QLoRA, DeepSpeed for
# ZeRO-1, liger-kernel) and access to the base model (`huggingface-cli login` for Meta-Llama-3-8B); the
# script checks the packages before it starts. Without a GPU it runs the same stages on the CPU as one
# `cptkit run`, with LoRA on a small model (CPTKIT_BASE_MODEL, default SmolLM2-135M) for
# CPTKIT_MAX_STEPS steps (default 20): a check of the pipeline and the data, not the seed's training.
#
# Every value of the seed's parameter table (its section 4.2) is passed explicitly below, so that this
# script reads like the original; the same values are the defaults of the preset it starts from
# (src/cptkit/presets/seed-llama3-8b-qlora.yaml).
set -euo pipefail

domain_dir=${1:?usage: run_7b_cpt.sh DOMAIN_TEXT_FOLDER [GENERAL_TEXT_FOLDER]}
general_dir=${2:-}

if python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  on_gpu=1
  default_model='meta-llama/Meta-Llama-3-8B'
else
  on_gpu=0
  default_model='HuggingFaceTB/SmolLM2-135M'
fi

# === paths (seed: base_model_path, deepspeed_config_name, output_path) ===
base_model_path=${CPTKIT_BASE_MODEL:-$default_model}  # seed: base_model_path
output_path='./output'                              # seed: output_path
preset=seed-llama3-8b-qlora                         # every other value of the seed's recipe

# seed: one dataset. With a second folder, the seed's own best practice (its section 5.3): 70% domain
# text, 30% general text against forgetting (both are measured on held-out documents after training).
sources="[{name: domain, path: '${domain_dir}', role: domain, weight: 1.0}]"
if [[ -n "$general_dir" ]]; then
  sources="[{name: domain, path: '${domain_dir}', role: domain, weight: 0.7},
            {name: general, path: '${general_dir}', role: general, weight: 0.3}]"
fi

# seed parameter table -> cptkit config keys (each one a KEY=VALUE override on the command line)
args=(
  "run_dir=${output_path}"                          # seed: output_path; adapter in output/train (seed: pretrained_lora)
  "model.name_or_path=${base_model_path}"           # seed: --model_name=${base_model_path}
  "data.tokenizer=${base_model_path}"               # seed: AutoTokenizer.from_pretrained(model_name)
  "data.sources=${sources}"                         # seed: --dataset_name (text_book.py's folder_path)
  "data.chunking=chars"                             # seed: text_book.py chunk_mode=True
  "data.chunk_chars=512"                            # seed: text_book.py chunk_size=512 (characters)
  "data.seq_length=512"                             # seed: --seq_length=512 (tokens)
  "train.hf.per_device_train_batch_size=4"          # seed: --batch_size=4
  "train.mode=qlora"                                # seed: --use_QLora=True
  "model.attention=auto"                            # seed: --use_flash_attention_2=True (auto: flash/varlen/flex
                                                    #   when present, each keeping packed documents apart)
  "train.hf.num_train_epochs=1"                     # seed: --num_train_epochs=1
  "train.lora.r=32"                                 # seed: create_peft r=32
  "train.lora.alpha=8"                              # seed: create_peft alpha=8
  "train.hf.learning_rate=2.0e-5"                   # seed: learning_rate=2e-5
  "train.schedule.type=cosine"                      # seed: lr_scheduler_type='cosine'
  "train.schedule.warmup=0.1"                       # seed: warmup_ratio=0.1
  "train.hf.logging_steps=1"                        # seed: logging_steps=1
)

if [[ $on_gpu == 0 ]]; then
  # No GPU: QLoRA (bitsandbytes' 4-bit kernels) and DeepSpeed need CUDA, so the same recipe trains LoRA in
  # float32 for a few steps, every stage in one process: prepare -> train -> merge -> eval -> report.
  cpu_args=(
    "train.mode=lora"                               # QLoRA needs a CUDA GPU
    "model.dtype=float32"
    "train.hf.bf16=false"
    "train.hf.max_steps=${CPTKIT_MAX_STEPS:-20}"
    "merge.dtype=float32"
  )
  echo "no CUDA GPU: LoRA on ${base_model_path} for ${CPTKIT_MAX_STEPS:-20} steps on the CPU" >&2
  cptkit run "$preset" "${args[@]}" "${cpu_args[@]}"
  echo "report: ${output_path}/report/report.md"
  exit 0
fi

# GPUs: what the launch needs, checked before anything starts (accelerate would stop at "DeepSpeed is
# not installed" only once launched)
python -m cptkit.train.optional bitsandbytes deepspeed
# seed: deepspeed_config_name=./config/ds.json (ZeRO-1) -> the shipped accelerate + DeepSpeed ZeRO-1 config
accelerate_config=$(python -m cptkit.presets.accelerate zero1)
num_gpus=$(python -c "import torch; print(max(torch.cuda.device_count(), 1))")

# === Stage 0: data preparation (seed: prepare_dataset.sh -> text_book.py) ===
# Once, on one process: tokenized, chunked, packed, held-out split; rerunning with the same inputs is a no-op.
cptkit prepare "$preset" "${args[@]}"

# === Stage 1: continued pretraining (seed: deepspeed ./ma-rlhf/pretrained.py ...) ===
accelerate launch --config_file "$accelerate_config" --num_processes "$num_gpus" \
  -m cptkit train "$preset" "${args[@]}"

# === Stage 2: merge the LoRA adapter (seed: python ./ma-rlhf/merge_adapter.py ...) ===
# base + output/train -> output/merged (seed: pretrained_full), loadable by plain from_pretrained.
cptkit merge "$preset" "${args[@]}"

# === Stage 3 (cptkit): held-out perplexity of base vs merged model, and the report ===
cptkit eval "$preset" "${args[@]}"
cptkit report "$output_path"
echo "report: ${output_path}/report/report.md"

# Appendix A step 4 (SFT on the merged model) is `cptkit sft` with an `sft:` section, e.g.
#   cptkit sft "$preset" "${args[@]}" sft.data=instructions.jsonl sft.template=seed
