"""The options of an image family's units: a frozen dataclass whose every field is the flag of the same name.

A family whose units read nothing else uses :class:`ImageOptions` as its ``Family.options``; one that needs
more subclasses it (and adds the flags). Each unit declares which of these it reads (``Unit.options``).
"""

from __future__ import annotations

from dataclasses import dataclass

from diffsplit.families.common.flow_match import TIMESTEP_WEIGHTINGS

LATENT_SAMPLES = ("mode", "sample")


@dataclass(frozen=True)
class ImageOptions:
    """What the units of an image family may read.

    Attributes:
        max_pixels: ``--max_pixels``: larger images are scaled down to about this many pixels (None when a
            fixed ``--height/--width`` is given: the fixed size wins, so the budget means nothing).
        height, width: ``--height/--width``: a fixed training size.
        resolution_buckets: ``--resolution_buckets``: ``auto`` or ``WxH,...``, the finite set of training
            sizes images are sorted into (None: each image at its own size).
        latent_sample: ``--latent_sample``: ``"mode"`` trains on the VAE posterior's mode, ``"sample"`` draws
            from the posterior afresh every step.
        timestep_weighting: ``--timestep_weighting``: ``"bell"`` (DiffSynth-Studio's per-timestep loss
            weight) or ``"none"``.
        rand_device: ``--rand_device``: the device of the generator of seeded noise (direct distillation
            starts from the noise the teacher started from, drawn as the pipeline draws it for ``generator=
            torch.Generator(rand_device).manual_seed(seed)``).
    """

    max_pixels: int | None = None
    height: int | None = None
    width: int | None = None
    resolution_buckets: str | None = None
    latent_sample: str = "mode"
    timestep_weighting: str = "bell"
    rand_device: str = "cpu"

    def __post_init__(self) -> None:
        if self.height is not None:
            object.__setattr__(self, "max_pixels", None)
        if self.latent_sample not in LATENT_SAMPLES:
            raise ValueError(f"latent_sample must be one of {LATENT_SAMPLES}, got {self.latent_sample!r}")
        if self.timestep_weighting not in TIMESTEP_WEIGHTINGS:
            raise ValueError(
                f"timestep_weighting must be one of {TIMESTEP_WEIGHTINGS}, got {self.timestep_weighting!r}"
            )
