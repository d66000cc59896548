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

from diffsplit.errors import UserError
from diffsplit.planner.graph import UnitGraph

OPTIONS = {
    "--w": "width",
    "--h": "height",
    "--s": "steps",
    "--d": "seed",
    "--l": "guidance",
    "--n": "negative",
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
        values: dict[str, Any] = dict(defaults, negative="")
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


def text_key(text: str) -> str:
    """The file name stem of a text's stored embeddings: its sha256, 32 hex characters."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


def prompt_units(graph: UnitGraph) -> list[str]:
    """The units of ``graph`` (in order) that compute from the prompt alone: what encoding a sample prompt
    runs (tokenize, the text encoder; not the image or noise units)."""
    known = {"prompt"}
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


def split_prompt_units(graph: UnitGraph, frozen: set[str], reads: Sequence[str]) -> PromptSplit:
    """Split the prompt-only units of ``graph`` into those in ``frozen`` and the rest; ``stored`` is what the
    rest read from the first (and the final versions of ``reads`` the first already make)."""
    units = prompt_units(graph)
    first = [u for u in units if u in frozen]
    second = [u for u in units if u not in frozen]
    made = {graph.key(v) for u in first for v in graph.writes(u).values()}
    made.add(graph.dataset_key("prompt"))
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
    texts: Sequence[str],
    keep: Sequence[str],
    context: Callable[[Any], Any],
) -> dict[str, dict[str, torch.Tensor]]:
    """Run ``units`` on each distinct text (as the value ``prompt``); return text -> the ``keep`` values (graph
    keys; tensors to the CPU), under no_grad."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for text in dict.fromkeys(texts):
        env: dict[str, Any] = {graph.dataset_key("prompt"): text}
        with torch.no_grad():
            graph.run(list(units), env, context)
        out[text] = {key: _to_cpu(env[key]) for key in keep}
    return out


def _to_cpu(value: Any) -> Any:
    return value.detach().to("cpu") if isinstance(value, torch.Tensor) else value


def store_texts(folder: Path, encoded: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
    """Write each text's values as ``folder/<text_key>.safetensors`` (the text in its metadata), atomically."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    for text, values in encoded.items():
        target = folder / f"{text_key(text)}.safetensors"
        if target.is_file():
            continue
        tmp = target.with_suffix(".tmp")
        save_file({k: v.contiguous() for k, v in values.items()}, str(tmp), metadata={"text": text})
        tmp.replace(target)


def load_texts(folder: Path, texts: Sequence[str], stage1_hint: str) -> dict[str, dict[str, torch.Tensor]]:
    """The stored values of ``texts``.

    Raises:
        UserError: one line for the first text without stored values, naming ``stage1_hint``.
    """
    from safetensors import safe_open

    out: dict[str, dict[str, torch.Tensor]] = {}
    for text in dict.fromkeys(texts):
        path = folder / f"{text_key(text)}.safetensors"
        if not path.is_file():
            raise UserError(f"no stored embedding for the sample prompt '{text[:60]}'; {stage1_hint}")
        with safe_open(str(path), framework="pt") as handle:
            out[text] = {k: handle.get_tensor(k) for k in handle.keys()}
    return out
