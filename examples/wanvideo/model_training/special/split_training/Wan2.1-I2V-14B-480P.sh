#!/usr/bin/env bash
# Two-stage split LoRA training of Wan2.1-I2V-14B-480P, the seed trainer's script with the -Diffusers
# repository in place of the original checkpoints (diffsplit loads safetensors only, never a pickled .pth):
# stage 1 runs the frozen UMT5 text encoder, the VAE and the CLIP image encoder once (the first frame of each
# clip is the image condition), stage 2 trains the transformer's LoRA from the stored results.
# Run from the repository root. Extra arguments ("$@") are appended to both commands (later flags win).
set -euo pipefail

MODEL="Wan-AI/Wan2.1-I2V-14B-480P-Diffusers"
DIT="$MODEL:transformer/diffusion_pytorch_model*.safetensors"
FROZEN="$MODEL:text_encoder/*.safetensors,$MODEL:vae/diffusion_pytorch_model.safetensors,$MODEL:image_encoder/*.safetensors"

# Stage 1: the frozen preprocessing once (--offload_models is the seed's; the transformer is never loaded).
accelerate launch examples/wanvideo/model_training/train.py \
  --dataset_base_path data/example_video_dataset \
  --dataset_metadata_path data/example_video_dataset/metadata.csv \
  --height 480 \
  --width 832 \
  --dataset_repeat 1 \
  --model_id_with_origin_paths "$DIT,$FROZEN" \
  --learning_rate 1e-4 \
  --num_epochs 5 \
  --remove_prefix_in_ckpt "pipe.dit." \
  --output_path "./models/train/Wan2.1-I2V-14B-480P_lora_split_cache" \
  --lora_base_model "dit" \
  --lora_target_modules "q,k,v,o,ffn.0,ffn.2" \
  --lora_rank 32 \
  --extra_inputs "input_image" \
  --task "sft:data_process" \
  --offload_models "$DIT" \
  "$@"

# Stage 2: the transformer's LoRA from the stored results; the text, image and video encoders never load.
accelerate launch examples/wanvideo/model_training/train.py \
  --dataset_base_path "./models/train/Wan2.1-I2V-14B-480P_lora_split_cache" \
  --height 480 \
  --width 832 \
  --dataset_repeat 100 \
  --model_id_with_origin_paths "$DIT,$FROZEN" \
  --learning_rate 1e-4 \
  --num_epochs 5 \
  --remove_prefix_in_ckpt "pipe.dit." \
  --output_path "./models/train/Wan2.1-I2V-14B-480P_lora_split" \
  --lora_base_model "dit" \
  --lora_target_modules "q,k,v,o,ffn.0,ffn.2" \
  --lora_rank 32 \
  --extra_inputs "input_image" \
  --task "sft:train" \
  --offload_models "$FROZEN" \
  "$@"
