"""How a family describes one component of its pipeline (:class:`ComponentSpec`).

Storage (:mod:`diffsplit.storage.models`) recognises the model folders a user named as these components and
loads them lazily by name; a family only declares them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from diffsplit.planner.layers import LayerUse

MODEL, TOKENIZER, SCHEDULER = "model", "tokenizer", "scheduler"
"""The kinds of component: weights in a folder of their own, a tokenizer folder, a scheduler config."""


@dataclass(frozen=True, eq=False)
class ComponentSpec:
    """One component of a family's pipeline, as the family declares it.

    Attributes:
        name: the component's name in units and flags (``"dit"``, ``"text_encoder"``, ``"vae"``,
            ``"tokenizer"``, ``"scheduler"``).
        folder: its folder in the repository layout (``"transformer"`` for ``"dit"``).
        kind: :data:`MODEL`, :data:`TOKENIZER` or :data:`SCHEDULER`.
        library: ``"diffusers"`` or ``"transformers"``: where ``load_class`` lives.
        classes: the classes a model folder's ``config.json`` may name for this component (``_class_name``
            or ``architectures``); how the folder is recognised.
        load_class: the class loaded with ``from_pretrained`` (a tokenizer: ``AutoTokenizer`` when empty; a
            model: the class its config names when empty).
        default_config: a scheduler's config when the repository has no ``<folder>/scheduler_config.json``
            (the seed's commands download only the model folders).
        layers: for a layered model (a text encoder), its layer adapter and how much of it the pipeline
            reads (:class:`~diffsplit.planner.layers.LayerUse`).
        lora_key_prefix: the saved-weights format of a LoRA on this component: one ``.safetensors`` file with
            keys ``<prefix><module>.lora_A.weight`` (the denoiser, read by diffusers and ComfyUI), or, when
            None, a peft adapter folder.
        lora_alpha_keys: whether that file stores each module's ``.alpha`` (the scale ``alpha / rank``); when
            False the scale is folded into ``lora_B`` instead (for loaders that refuse ``.alpha`` keys, such as
            diffusers' FLUX.2 one): the same ``B @ A * scale`` either way.
        checkpoint_aliases: ``(module prefix, checkpoint prefix)`` pairs for a module part
            (``"text_encoder.model.visual"``) whose keys the files store under another spelling
            (``("model.visual.", "visual.")``: transformers 5 renames Qwen2.5-VL's keys when it loads them).
        lora_target_aliases: ``(name a user may write, module name it means)`` pairs for
            ``--lora_target_modules`` lists: the spellings of the model's original checkpoints that the
            seed's commands use (``("o", "to_out.0")``), for a model whose diffusers module names differ.
        lora_module_name: ``diffusers module path -> the path the saved LoRA file uses`` when the file's
            readers (ComfyUI, the pipeline's converting loader) expect the original checkpoint's names; None:
            the diffusers names.
        file_tag: the saved LoRA file's name after the step stem, ``epoch-N.<file_tag>.safetensors`` (a
            model's two denoisers: ``high_noise``, ``low_noise``); empty: ``epoch-N.safetensors``.
    """

    name: str
    folder: str
    kind: str = MODEL
    library: str = "diffusers"
    classes: tuple[str, ...] = ()
    load_class: str = ""
    default_config: Mapping[str, Any] | None = None
    layers: LayerUse | None = None
    lora_key_prefix: str | None = None
    lora_alpha_keys: bool = True
    checkpoint_aliases: tuple[tuple[str, str], ...] = ()
    lora_target_aliases: tuple[tuple[str, str], ...] = ()
    lora_module_name: Callable[[str], str] | None = None
    file_tag: str = ""
