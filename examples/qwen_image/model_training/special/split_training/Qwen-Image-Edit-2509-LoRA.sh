#!/usr/bin/env bash
# Two-stage split LoRA training of Qwen-Image-Edit-2509, in the seed's style: stage 1 runs the frozen
# vision-language encoder (with the reference images) and the VAE (targets and references) once; stage 2 trains
# the edit transformer's LoRA from the stored results. For 2511, use Qwen/Qwen-Image-Edit-2511 and add
# --zero_cond_t to both commands. Run from the repository root; extra arguments ("$@") go to both commands.
set -euo pipefail

TARGETS="to_q,to_k,to_v,add_q_proj,add_k_proj,add_v_proj,to_out.0,to_add_out,img_mlp.net.2,img_mod.1,txt_mlp.net.2,txt_mod.1"

# Stage 1: the text encoder and VAE of Qwen-Image (the same as the edit model's); the image processor comes from
# the edit repository's processor/ folder.
accelerate launch examples/qwen_image/model_training/train.py \
  --dataset_base_path data/edit \
  --dataset_metadata_path data/edit/metadata.json \
  --data_file_keys "image,edit_image" \
  --extra_inputs "edit_image" \
  --max_pixels 1048576 \
  --dataset_repeat 1 \
  --model_id_with_origin_paths "Qwen/Qwen-Image:text_encoder/model*.safetensors,Qwen/Qwen-Image:vae/diffusion_pytorch_model.safetensors" \
  --processor_path "Qwen/Qwen-Image-Edit-2509:processor/" \
  --learning_rate 1e-4 \
  --num_epochs 5 \
  --remove_prefix_in_ckpt "pipe.dit." \
  --output_path "./models/train/Qwen-Image-Edit-2509_lora_cache" \
  --lora_base_model "dit" \
  --lora_target_modules "$TARGETS" \
  --lora_rank 32 \
  --use_gradient_checkpointing \
  --dataset_num_workers 8 \
  --find_unused_parameters \
  --task "sft:data_process" \
  "$@"

# Stage 2: the edit transformer's LoRA, without the text encoder, the vision tower or the VAE.
accelerate launch examples/qwen_image/model_training/train.py \
  --dataset_base_path "./models/train/Qwen-Image-Edit-2509_lora_cache" \
  --extra_inputs "edit_image" \
  --max_pixels 1048576 \
  --dataset_repeat 50 \
  --model_id_with_origin_paths "Qwen/Qwen-Image-Edit-2509:transformer/diffusion_pytorch_model*.safetensors" \
  --learning_rate 1e-4 \
  --num_epochs 5 \
  --remove_prefix_in_ckpt "pipe.dit." \
  --output_path "./models/train/Qwen-Image-Edit-2509_lora" \
  --lora_base_model "dit" \
  --lora_target_modules "$TARGETS" \
  --lora_rank 32 \
  --use_gradient_checkpointing \
  --dataset_num_workers 8 \
  --find_unused_parameters \
  --task "sft:train" \
  "$@"
