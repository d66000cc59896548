"""diffsplit: two-stage split training for diffusion models.

Stage 1 runs the frozen part of a training step once per sample and stores it in a safe cache;
stage 2 trains from the cache without loading the frozen models. See README.md.
"""

__version__ = "0.1.0"
