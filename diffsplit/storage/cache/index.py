"""One shard's index: a JSON document with one sample per line, so one sample's entry can be read alone.

Layout of ``shards/shard-<writer>-<seq>.json`` (format 2)::

    {"bytes":5120,"format":2,"sha256":"...","shard":"shard-r0-000000.safetensors","samples":[
    {"id":"3f..","row":0,"sha256":"..","tensors":{"latents":{"dtype":"bfloat16","offsets":[152,664],"shape":[4,8,8]}},"values":{..}},
    {"id":"7a..","row":5,"sha256":"..","tensors":{..},"values":{..}}
    ]}

The whole file parses as JSON (tools and people can read it). Each sample is one line of compact JSON (a JSON
string never holds a raw newline), so the cache's table (:mod:`diffsplit.storage.cache_table`) can record a
sample's line by byte offset and length, and a reader parses a few hundred bytes per sample instead of a
whole index. A tensor's ``offsets`` are its byte range in the shard file itself (safetensors header
included), so a reader fetches it with one positioned read, without parsing the shard's header.

A sample's ``sha256`` (:func:`sample_digest`: its tensors' bytes in the order they lie in the shard) lets a
reader of a cache on object storage check each sample it fetches by ranged reads without downloading whole
shards. It was added within format 2: an index without it is still read (such a shard is hashed whole).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any

FORMAT_VERSION: int = 2
"""Bump when the layout of the folder, the manifest, the shard index or the tables changes."""

_HEX64 = re.compile(r"[0-9a-f]{64}")
_SAMPLES_OPEN = b',"samples":['
_CLOSE = b"]}"


def tensor_offsets(safetensors_bytes: bytes) -> dict[str, tuple[int, int]]:
    """Each tensor's byte range ``(begin, end)`` in a serialized safetensors file (absolute file offsets).

    The file starts with an 8-byte little-endian header length, then the JSON header, then the data; the
    header's ``data_offsets`` count from the start of the data.
    """
    size = int.from_bytes(safetensors_bytes[:8], "little")
    header = json.loads(safetensors_bytes[8 : 8 + size])
    base = 8 + size
    return {
        name: (base + info["data_offsets"][0], base + info["data_offsets"][1])
        for name, info in header.items()
        if name != "__metadata__"
    }


def sample_digest(chunks: list[bytes]) -> str:
    """The sha256 hex digest of one sample's tensor bytes, ``chunks`` in ascending byte offset."""
    digest = hashlib.sha256()
    for chunk in chunks:
        digest.update(chunk)
    return digest.hexdigest()


def _compact(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def encode_index(header: dict[str, Any], samples: list[dict[str, Any]]) -> bytes:
    """The index file's bytes: ``header`` (format, shard, sha256, bytes) and one line per sample."""
    head = _compact(header)[:-1] + _SAMPLES_OPEN  # '{...' + ',"samples":['
    return head + b"\n" + b",\n".join(_compact(s) for s in samples) + b"\n" + _CLOSE + b"\n"


@dataclass
class ShardIndex:
    """A parsed index: its header fields, its samples and where each sample's line lies in the file.

    Attributes:
        header: ``format``, ``shard``, ``sha256``, ``bytes``.
        samples: one dict per sample (``id``, ``row``, ``tensors``, ``values``), in the shard's order.
        spans: ``(offset, length)`` of each sample's JSON object in the file, in the same order.
    """

    header: dict[str, Any]
    samples: list[dict[str, Any]]
    spans: list[tuple[int, int]]


class MalformedIndex(ValueError):
    """The bytes are not an index this format writes (the message says where they differ)."""


def parse_index(data: bytes) -> ShardIndex:
    """Parse an index file written by :func:`encode_index`, keeping each sample's byte span.

    The whole document is parsed at once (one ``json.loads``: several times faster than a parse per line),
    then the lines give the spans: line ``i + 1`` holds sample ``i``.

    Raises:
        MalformedIndex: not JSON, or not laid out one sample per line.
    """
    try:
        document = json.loads(data)
    except ValueError as err:
        raise MalformedIndex(f"not JSON ({err})") from None
    if not isinstance(document, dict) or not isinstance(document.get("samples"), list):
        raise MalformedIndex("no 'samples' list")
    samples = document.pop("samples")
    lines = data.split(b"\n")
    if (
        not samples
        or len(lines) != len(samples) + 3
        or not lines[0].endswith(_SAMPLES_OPEN)
        or lines[-2:] != [_CLOSE, b""]
    ):
        raise MalformedIndex("not laid out as one sample per line")
    spans = []
    offset = len(lines[0]) + 1
    for number, line in enumerate(lines[1:-2]):
        last = number == len(samples) - 1
        if not last and not line.endswith(b","):
            raise MalformedIndex(f"sample line {number + 1} does not end with ','")
        spans.append((offset, len(line) if last else len(line) - 1))
        offset += len(line) + 1
    return ShardIndex(document, samples, spans)


def sample_problem(sample: Any) -> str | None:
    """What is wrong with one sample entry of an index, or None."""
    if not isinstance(sample, dict):
        return "an entry is not an object"
    sample_id = sample.get("id")
    if not isinstance(sample_id, str) or not sample_id:
        return "an entry has no 'id'"
    tensors, values = sample.get("tensors"), sample.get("values")
    if not isinstance(tensors, dict) or not isinstance(values, dict):
        return f"sample {sample_id} has no 'tensors' or 'values'"
    digest = sample.get("sha256")  # optional: indexes written before it was added lack it
    if digest is not None and not (isinstance(digest, str) and _HEX64.fullmatch(digest)):
        return f"sample {sample_id} has the sha256 {digest!r}"
    for name, info in tensors.items():
        if not isinstance(info, dict) or not isinstance(info.get("dtype"), str):
            return f"sample {sample_id}: tensor '{name}' has no dtype"
        shape, offsets = info.get("shape"), info.get("offsets")
        if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
            return f"sample {sample_id}: tensor '{name}' has the shape {shape}"
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]
        ):
            return f"sample {sample_id}: tensor '{name}' has the offsets {offsets}"
    return None
