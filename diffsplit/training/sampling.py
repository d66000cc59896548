"""Sample images during training: the prompts file, the prompts' embeddings, and when to render.

**The file** (``--sample_prompts FILE``): one prompt per line, blank lines and ``#`` comments skipped, options
after the prompt in the sd-scripts / musubi-tuner style::

    a red circle on a white background --w 512 --h 512 --s 20 --d 42 --l 4.0 --n blurry, low quality

``--w``/``--h`` size (pixels), ``--s`` steps, ``--d`` seed, ``--l`` guidance scale (each family maps it to its
pipeline's guidance argument), ``--n`` negative prompt (``""`` when absent). Missing options take the flags'
defaults (``--sample_steps``, ``--sample_guidance_scale``, ``--sample_width``/``--sample_height``, seed
``--seed``).

**Split-aware.** The prompts are preprocessing like the training prompts: the prompt-only units of the
family's graph (tokenize, encode the prompt) run in stage 1 and their results are stored in the cache
folder's ``samples/`` (one safetensors file per text, named by the text's sha256; the cache's identity covers
the encoder), so stage 2 renders with the transformer, the scheduler and the VAE's decoder only. A prompt the
cache has no embedding for is one line saying to run stage 1 with the file.
"""

from __future__ import annotations

import hashlib
import shlex
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageOps
from safetensors import safe_open
from safetensors.torch import save_file

from diffsplit.errors import UserError
from diffsplit.planner.graph import UnitGraph
from diffsplit.storage.cache import remote as objects
from diffsplit.storage.files import atomic_path
from diffsplit.storage.location import is_remote

OPTIONS = {
    "--w": "width",
    "--h": "height",
    "--s": "steps",
    "--d": "seed",
    "--l": "guidance",
    "--n": "negative",
    "--i": "images",
}


@dataclass(frozen=True)
class SamplePrompt:
    """One line of the prompts file, its options resolved."""

    index: int
    prompt: str
    negative: str
    width: int
    height: int
    steps: int
    seed: int
    guidance: float
    images: tuple[str, ...] = ()


def parse_sample_prompts(path: str | Path, defaults: Mapping[str, Any]) -> list[SamplePrompt]:
    """The prompts of ``path`` with ``defaults`` (``width``, ``height``, ``steps``, ``seed``, ``guidance``)
    for the options a line leaves out.

    Raises:
        UserError: one line naming the file and line, for an unreadable file, an unknown option, a value that
            is not a number or a line without a prompt.
    """
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8-sig").split("\n")
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"--sample_prompts {path}: cannot be read ({' '.join(str(err).split())})") from None
    prompts: list[SamplePrompt] = []
    for number, line in enumerate(lines, start=1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        where = f"--sample_prompts {path} line {number}"
        head, *rest = (" " + text).split(" --")
        values: dict[str, Any] = dict(defaults, negative="", images=())
        for option in rest:
            name, _, value = option.partition(" ")
            key = OPTIONS.get(f"--{name}")
            if key is None:
                known = ", ".join(OPTIONS)
                raise UserError(f"{where}: unknown option '--{name}' (known: {known})")
            value = value.strip()
            if key == "negative":
                values[key] = shlex.split(value)[0] if value.startswith(('"', "'")) and value else value
                continue
            if key == "images":  # reference images of an editing model, relative to the prompts file
                images = tuple(
                    str((path.parent / v.strip()).resolve()) for v in value.split(",") if v.strip()
                )
                missing = [i for i in images if not Path(i).is_file()]
                if not images or missing:
                    raise UserError(
                        f"{where}: --i names no image file ({missing[0] if missing else value!r})"
                    )
                values[key] = images
                continue
            try:
                values[key] = float(value) if key == "guidance" else int(value)
            except ValueError:
                raise UserError(f"{where}: --{name} needs a number, got '{value}'") from None
        prompt = head.strip()
        if not prompt:
            raise UserError(f"{where}: the line has options but no prompt")
        for key in ("width", "height", "steps"):
            if values[key] <= 0:
                raise UserError(f"{where}: {key} must be positive, got {values[key]}")
        prompts.append(SamplePrompt(len(prompts), prompt, **{k: values[k] for k in OPTIONS.values()}))
    if not prompts:
        raise UserError(f"--sample_prompts {path} holds no prompt")
    return prompts


def condition(text: str, images: Sequence[str] = ()) -> str:
    """What a sample's stored values are keyed by: the text, and the reference images' bytes when it has any."""
    if not images:
        return text
    digest = hashlib.sha256()
    for image in images:
        digest.update(Path(image).read_bytes())
    return f"{text}\x00{digest.hexdigest()[:32]}"


def text_key(text: str, salt: str = "") -> str:
    """The file name stem of a condition's stored values: the sha256 of the cache's fingerprint (``salt``) and
    the condition, 32 hex characters; values stored for a cache since rebuilt differently are never used."""
    return hashlib.sha256(f"{salt}\x00{text}".encode()).hexdigest()[:32]


def prompt_units(graph: UnitGraph, inputs: Sequence[str] = ("prompt",)) -> list[str]:
    """The units of ``graph`` (in order) that compute from the prompt (and the reference images ``inputs``
    names) alone: what encoding a sample prompt runs (tokenize, the text encoder; not the target image's or
    the noise's units)."""
    known = set(inputs)
    chosen = []
    for unit in graph.units:
        if unit.stochastic or not unit.inputs or not set(unit.inputs) <= known:
            continue
        chosen.append(unit.name)
        known |= set(unit.outputs)
    return chosen


@dataclass(frozen=True)
class PromptSplit:
    """The prompt-only units of a plan: ``first`` run once per text (stage 1, or at the start of an unsplit
    run), storing the values ``stored`` (graph keys); ``second`` run at every rendering on the stored values,
    with the trained models as they are (a trained text encoder, or its trained layers after a layer split)."""

    first: list[str]
    second: list[str]
    stored: list[str]


def split_prompt_units(
    graph: UnitGraph, frozen: set[str], reads: Sequence[str], inputs: Sequence[str] = ("prompt",)
) -> PromptSplit:
    """Split the prompt-only units of ``graph`` into those in ``frozen`` and the rest; ``stored`` is what the
    rest read from the first (and the final versions of ``reads`` the first already make)."""
    units = prompt_units(graph, inputs)
    # Only what the rendering's values come from (not, say, an editing model's reference latents).
    needed = {graph.key(graph.final(name)) for name in reads}
    for unit in reversed(units):
        if any(graph.key(v) in needed for v in graph.writes(unit).values()):
            needed |= {graph.key(v) for v in graph.reads(unit).values()}
    units = [u for u in units if any(graph.key(v) in needed for v in graph.writes(u).values())]
    first = [u for u in units if u in frozen]
    second = [u for u in units if u not in frozen]
    made = {graph.key(v) for u in first for v in graph.writes(u).values()}
    made |= {graph.dataset_key(name) for name in inputs if name == "prompt"}
    stored = {graph.key(v) for u in second for v in graph.reads(u).values() if graph.key(v) in made}
    stored |= {graph.key(graph.final(name)) for name in reads if graph.key(graph.final(name)) in made}
    return PromptSplit(first, second, sorted(stored))


def finish_texts(
    graph: UnitGraph,
    split: PromptSplit,
    stored: Mapping[str, Mapping[str, torch.Tensor]],
    reads: Sequence[str],
    context: Callable[[Any], Any],
) -> dict[str, dict[str, torch.Tensor]]:
    """Each text's ``reads`` from its stored values: ``split.second`` run on them (under no_grad)."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for text, values in stored.items():
        env: dict[str, Any] = dict(values)
        with torch.no_grad():
            graph.run(split.second, env, context)
        out[text] = {name: env[graph.key(graph.final(name))] for name in reads}
    return out


def encode_texts(
    graph: UnitGraph,
    units: Sequence[str],
    conditions: Mapping[str, tuple[str, Sequence[str]]],
    keep: Sequence[str],
    context: Callable[[Any], Any],
    image_input: str | None = None,
    references: Callable[[list[Any]], list[torch.Tensor]] | None = None,
) -> dict[str, dict[str, torch.Tensor]]:
    """Run ``units`` on each condition (its text as the value ``prompt``, its reference images, opened, as
    ``image_input``); return condition -> the ``keep`` values (graph keys; tensors to the CPU), and with
    ``references`` the images' latents as the pipeline encodes them (``reference_latent_<i>``), under no_grad."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, (text, paths) in conditions.items():
        env: dict[str, Any] = {graph.dataset_key("prompt"): text}
        images = [ImageOps.exif_transpose(Image.open(p)).convert("RGB") for p in paths]
        if image_input is not None:
            env[graph.dataset_key(image_input)] = images
        with torch.no_grad():
            graph.run(list(units), env, context)
            out[key] = {name: _to_cpu(env[name]) for name in keep}
            if references is not None and images:
                out[key].update(
                    {f"reference_latent_{i}": _to_cpu(t) for i, t in enumerate(references(images))}
                )
    return out


def _to_cpu(value: Any) -> Any:
    return value.detach().to("cpu") if isinstance(value, torch.Tensor) else value


def store_texts(folder: Path, encoded: Mapping[str, Mapping[str, torch.Tensor]], salt: str = "") -> None:
    """Write each text's values as ``folder/<text_key>.safetensors`` (the text in its metadata), atomically
    (on object storage, where ``folder`` is inside a remote cache, as one PUT each)."""
    objects.make_folder(folder)
    for text, values in encoded.items():
        target = folder / f"{text_key(text, salt)}.safetensors"
        if objects.is_file(target):
            continue
        if is_remote(target):
            objects.put_safetensors(target, {k: v.contiguous() for k, v in values.items()}, {"text": text})
            continue
        with atomic_path(target) as tmp:
            save_file({k: v.contiguous() for k, v in values.items()}, str(tmp), metadata={"text": text})


def load_texts(
    folder: Path, texts: Sequence[str], stage1_hint: str, salt: str = ""
) -> dict[str, dict[str, torch.Tensor]]:
    """The stored values of ``texts``.

    Raises:
        UserError: one line for the first text without stored values, naming ``stage1_hint``.
    """
    out: dict[str, dict[str, torch.Tensor]] = {}
    for text in dict.fromkeys(texts):
        path = folder / f"{text_key(text, salt)}.safetensors"
        if not objects.is_file(path):
            shown = text.split("\x00")[0][:60]
            raise UserError(f"no stored embedding for the sample prompt '{shown}'; {stage1_hint}")
        if is_remote(path):
            out[text] = objects.read_safetensors(path)[0]
            continue
        with safe_open(str(path), framework="pt") as handle:
            out[text] = {k: handle.get_tensor(k) for k in handle.keys()}
    return out
