"""The seed's entry point: ``accelerate launch examples/qwen_image/model_training/train.py --task ...``.

A thin call into diffsplit's CLI (``diffsplit train`` takes the same flags).
"""

from diffsplit.cli import train_script_main

if __name__ == "__main__":
    train_script_main()
