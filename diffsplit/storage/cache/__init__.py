"""The stage-1 cache: named tensors and JSON values per sample, in safetensors shards on disk.

Layout of a cache folder::

    manifest.json                               small: format, fingerprint, identity, status, counts, and
                                                the tables' sizes and checksums
    table-samples.bin, table-shards.bin         written when the cache completes: where each sample lives
                                                (sorted by id) and what each shard hashes to (:mod:`.table`)
    shards/shard-<writer>-<seq>.safetensors     tensors of up to ``shard_samples`` samples
    shards/shard-<writer>-<seq>.json            its index: one line per sample with its id, row, JSON values
                                                and each tensor's dtype, shape and byte range (:mod:`.index`)

The cache is data, never code: tensors go through safetensors, everything else through JSON or the plain
binary tables, and nothing is ever pickled. Every file is written to a temporary name, fsynced and renamed,
the index after its shard, so a kill leaves at worst an orphan shard (no index) or a temporary file; both
are ignored by readers and removed when the same writer resumes. The manifest never lists samples and
writers never rewrite old shards, so a cache of millions of samples keeps a small manifest.

On object storage (an fsspec URL: ``s3://``, ``gs://``, ``memory://``; see
:mod:`diffsplit.storage.location`) the layout is the same. A single PUT is atomic there, so each file is one
object written under its final name (shard, then its index; at finalize the tables, then the manifest),
with no temporary name, rename or fsync; a folder is listed with one request (:mod:`.remote`). The writer
lock is a lease object made by an exclusive create (:mod:`.lease`). Readers fetch only what they read:
tables whole, a shard's index on first touch, a sample's tensors by ranged reads checked against the
per-sample sha256 each index line carries (:mod:`.reader`); nothing is written to the local disk.

Modules: :mod:`.identity` (fingerprint, mismatch messages), :mod:`.writer` (stage 1 writes, resumes,
finalizes), :mod:`.reader` (random access at any size), :mod:`.check` (``cache verify`` / ``inspect``),
:mod:`.index` and :mod:`.table` (the two on-disk formats), :mod:`.layout` (names and shared readers),
:mod:`.remote` (file operations on a local folder or on object storage), :mod:`.lease` (the lock there).

The cache knows nothing of model families or torch models. Callers describe what made the cache in an
``identity`` dict (family, plan, preprocessing arguments, frozen model hashes, ...); its fingerprint decides
whether an existing folder may be resumed, and :func:`check_identity` explains a mismatch.
"""

from diffsplit.storage.cache.check import inspect, status, verify
from diffsplit.storage.cache.identity import check_identity, fingerprint
from diffsplit.storage.cache.index import FORMAT_VERSION
from diffsplit.storage.cache.layout import LOCK, MANIFEST, SAMPLES, SHARDS, SKIPPED, VALIDATION, caches_in
from diffsplit.storage.cache.reader import CacheReader, CacheView
from diffsplit.storage.cache.table import SAMPLES_TABLE, SHARDS_TABLE
from diffsplit.storage.cache.writer import CacheWriter, check_cache_folder, writer_lock

__all__ = [
    "FORMAT_VERSION", "LOCK", "MANIFEST", "SAMPLES", "VALIDATION", "SAMPLES_TABLE", "SHARDS", "SHARDS_TABLE", "SKIPPED", "CacheReader",
    "CacheView", "CacheWriter", "caches_in", "check_cache_folder", "check_identity", "fingerprint", "inspect",
    "status", "verify", "writer_lock",
]  # fmt: skip
