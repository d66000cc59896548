"""The seed-style entry point for Wan: ``accelerate launch examples/wanvideo/model_training/train.py ...``.

A thin call into diffsplit's CLI (``diffsplit train`` takes the same flags; the family is recognised from the
model folders).
"""

from diffsplit.cli import train_script_main

if __name__ == "__main__":
    train_script_main()
