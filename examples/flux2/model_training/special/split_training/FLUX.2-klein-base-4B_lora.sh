#!/usr/bin/env bash
# Two-stage split LoRA training of FLUX.2-klein-base-4B, in the seed's style: stage 1 runs the frozen text
# encoder and VAE of FLUX.2-klein-4B once, stage 2 trains the base transformer's LoRA from the stored results.
# Run from the repository root. Extra arguments ("$@") are appended to both commands (later flags win).
set -euo pipefail

TARGETS="to_q,to_k,to_v,to_out.0,add_q_proj,add_k_proj,add_v_proj,to_add_out,linear_in,linear_out,to_qkv_mlp_proj,single_transformer_blocks.0.attn.to_out"

# Stage 1: the frozen preprocessing (text encoder, VAE) once.
accelerate launch examples/flux2/model_training/train.py \
  --dataset_base_path data/example_image_dataset \
  --dataset_metadata_path data/example_image_dataset/metadata.csv \
  --max_pixels 1048576 \
  --dataset_repeat 1 \
  --model_id_with_origin_paths "black-forest-labs/FLUX.2-klein-4B:text_encoder/*.safetensors,black-forest-labs/FLUX.2-klein-4B:vae/diffusion_pytorch_model.safetensors" \
  --tokenizer_path "black-forest-labs/FLUX.2-klein-4B:tokenizer/" \
  --learning_rate 1e-4 \
  --num_epochs 5 \
  --remove_prefix_in_ckpt "pipe.dit." \
  --output_path "./models/train/FLUX.2-klein-base-4B_lora_cache" \
  --lora_base_model "dit" \
  --lora_target_modules "$TARGETS" \
  --lora_rank 32 \
  --use_gradient_checkpointing \
  --task "sft:data_process" \
  "$@"

# Stage 2: the transformer's LoRA from the stored results, without the text encoder or the VAE.
accelerate launch examples/flux2/model_training/train.py \
  --dataset_base_path "./models/train/FLUX.2-klein-base-4B_lora_cache" \
  --max_pixels 1048576 \
  --dataset_repeat 50 \
  --model_id_with_origin_paths "black-forest-labs/FLUX.2-klein-base-4B:transformer/*.safetensors" \
  --learning_rate 1e-4 \
  --num_epochs 5 \
  --remove_prefix_in_ckpt "pipe.dit." \
  --output_path "./models/train/FLUX.2-klein-base-4B_lora" \
  --lora_base_model "dit" \
  --lora_target_modules "$TARGETS" \
  --lora_rank 32 \
  --use_gradient_checkpointing \
  --task "sft:train" \
  "$@"
