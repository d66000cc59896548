"""The writer lock of a cache on object storage: a lease object, since there is no ``flock`` on a bucket.

The lock is the object ``<cache>/.lock``, created with an exclusive create (S3's ``If-None-Match: *``; the
same on GCS and fsspec's memory filesystem), so of two stage 1s only one creates it. Its JSON body names the
holder (host, pid), a random token and when the lease expires (wall-clock seconds since the epoch, so the
machines' clocks must roughly agree). The holder renews it from a heartbeat thread every third of the lease
and checks at each renewal that the object still carries its token; a writer that lost its lease (paused
past the expiry and taken over) stops with one line at its next shard or at finalize, never finalizes over
the new holder. A waiter polls and takes over a stale lease: at once when its holder ran on this host and
its process is gone, otherwise once the lease expired. A clean end deletes the object.

On S3 every later write of the lease is a compare-and-swap (``If-Match`` on the ETag the writer last saw):
a renewal goes through only while the object is still the holder's own last write, and a waiter replaces a
stale lease only while it is still the version judged stale, so of two waiters one wins and a holder that
stalled past its lease cannot overwrite its successor. Elsewhere (GCS, memory) renewal reads, compares the
token, then writes, and a takeover deletes the stale version it read: a window of one request remains.

Only protocols known to honour an exclusive create can lock (:data:`EXCLUSIVE_PROTOCOLS`); on others the
run needs ``--cache_lock none`` and a single writer.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from diffsplit.errors import UserError
from diffsplit.storage.location import Location, fs_path, protocol

LEASE_SECONDS = float(os.environ.get("DIFFSPLIT_CACHE_LEASE_SECONDS", "60"))
"""How long a lease lasts without renewal; a waiter takes over a lease of another host after this."""
POLL_SECONDS = 1.0
"""How often a waiter looks at the lease (one GET each)."""
EXCLUSIVE_PROTOCOLS = frozenset({"s3", "s3a", "gs", "gcs", "memory"})
"""Protocols whose filesystem's ``pipe_file(mode="create")`` is an atomic create-if-absent."""
SWAP_PROTOCOLS = frozenset({"s3", "s3a"})
"""Protocols whose ``pipe_file(..., IfMatch=etag)`` writes only over that very version (S3 conditional PUT)."""


def _etag(response: Any) -> str | None:
    """The ETag of the object a ``pipe_file`` wrote (s3fs returns the PUT's response; others return None)."""
    return response.get("ETag") if isinstance(response, dict) else None


def lock_problem(folder: Location, mode: str, flag: str) -> str | None:
    """Why ``--cache_lock mode`` cannot lock the remote ``folder`` (None when it can, or need not)."""
    kind = protocol(folder)
    if mode == "none" or kind in EXCLUSIVE_PROTOCOLS:
        return None
    return (
        f"{flag} {folder}: {kind}:// cannot hold a writer lock (no atomic create); run with "
        "--cache_lock none and make sure a single stage 1 writes it"
    )


def _alive(pid: int) -> bool:
    """Whether process ``pid`` of this host still runs (a zombie, killed but not yet reaped, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


class Lease:
    """The lease on ``folder/name``: :meth:`acquire`, then :meth:`check` as often as wanted, :meth:`release`."""

    def __init__(self, folder: Location, name: str) -> None:
        self.path = folder / name
        self.fs, self.key = folder.fs, fs_path(self.path)
        self.token = secrets.token_hex(16)
        self._swap = protocol(folder) in SWAP_PROTOCOLS
        self._etag: str | None = None  # the version this holder last wrote (compare-and-swap protocols)
        self.host, self.pid = socket.gethostname(), os.getpid()
        self._lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _body(self) -> bytes:
        expires = time.time() + LEASE_SECONDS
        return json.dumps(
            {"host": self.host, "pid": self.pid, "token": self.token, "expires": expires}
        ).encode()

    def _read(self) -> dict[str, Any] | None:
        """The lease's body; None when there is none; ``{}`` when it is not a lease this code wrote."""
        try:
            body = json.loads(self.fs.cat_file(self.key))
        except FileNotFoundError:
            return None
        except ValueError:
            return {}
        return body if isinstance(body, dict) else {}

    def _versioned(self) -> tuple[dict[str, Any] | None, str | None]:
        """The lease's body and the ETag of that version or an older one (read first: a put over it then
        fails when the body read is newer); ``(None, None)`` when there is none."""
        try:
            self.fs.invalidate_cache(self.key)
            etag = self.fs.info(self.key).get("ETag")
        except FileNotFoundError:
            return None, None
        return self._read(), etag

    def _create(self) -> bool:
        try:
            self._etag = _etag(self.fs.pipe_file(self.key, self._body(), mode="create"))
        except FileExistsError:
            return False
        return True

    def _replace(self, etag: str | None) -> bool:
        """Put this holder's lease over the version ``etag`` names, only if the object still is that version."""
        if etag is None:
            return False
        try:
            self._etag = _etag(self.fs.pipe_file(self.key, self._body(), IfMatch=etag))
        except (OSError, FileNotFoundError):  # 412: replaced meanwhile (or the request failed): look again
            return False
        return True

    def _stale(self, body: dict[str, Any], first_seen: float) -> bool:
        if body.get("host") == self.host and isinstance(body.get("pid"), int) and not _alive(body["pid"]):
            return True
        expires = body.get("expires")
        if not isinstance(expires, (int, float)):  # unreadable: give it one lease from when it was seen
            expires = first_seen + LEASE_SECONDS
        return time.time() > expires

    def acquire(self, waiting: Callable[[str], None] | None = None) -> None:
        """Create the lease, waiting (``waiting(message)`` told once) while another holds it; take over a
        stale one."""
        told = False
        seen: dict[str, float] = {}  # token of a lease seen -> when first seen
        while not self._create():
            body, etag = self._versioned() if self._swap else (self._read(), None)
            if body is None:
                continue  # released between our create and our read: try again at once
            token = str(body.get("token"))
            first_seen = seen.setdefault(token, time.time())
            if self._stale(body, first_seen):
                if self._swap:
                    if self._replace(etag):  # over the very version judged stale, or not at all
                        break
                    continue
                # Delete only the lease judged stale: another waiter may have taken it over meanwhile.
                if self._read() == body:
                    try:
                        self.fs.rm_file(self.key)
                    except FileNotFoundError:
                        pass
                continue
            if not told and waiting is not None:
                holder = f"{body.get('host')}, pid {body.get('pid')}"
                waiting(
                    f"another stage 1 ({holder}) is writing the cache at {self.path.parent}; waiting for it "
                    "to finish (its lease lets another take over once it stops renewing it)"
                )
                told = True
            time.sleep(POLL_SECONDS)
        self._thread = threading.Thread(target=self._heartbeat, name="cache-lease", daemon=True)
        self._thread.start()

    def _heartbeat(self) -> None:
        while not self._stop.wait(LEASE_SECONDS / 3):
            try:
                self._renew()
            except Exception:  # a failed request (network, throttling): try again at the next beat, of
                pass  # the two left before the lease expires; a lease lost meanwhile is found at its check
            if self._lost is not None:
                return

    def _renew(self) -> None:
        if self._swap and self._replace(self._etag):
            return
        # Not swapped (another protocol), or the swap failed: the lease is another's now, or the request failed.
        body, etag = self._versioned() if self._swap else (self._read(), None)
        if body is None or body.get("token") != self.token:
            holder = "nobody" if body is None else f"{body.get('host')}, pid {body.get('pid')}"
            self._lost = (
                f"this stage 1 lost the writer lock of the cache at {self.path.parent} (it was not renewed "
                f"within {LEASE_SECONDS:.0f}s; now held by {holder}); rerun stage 1: it resumes"
            )
            return
        if self._swap:
            self._etag = etag  # still ours (the request failed): swap over this version at the next beat
            return
        self.fs.pipe_file(self.key, self._body())

    def check(self, fresh: bool = False) -> None:
        """Raise :class:`UserError` (one line) when the lease was lost; ``fresh`` reads it now (before a
        finalize) instead of trusting the last heartbeat."""
        if fresh and self._lost is None:
            self._renew()
        if self._lost is not None:
            raise UserError(self._lost)

    def release(self) -> None:
        """Stop renewing and delete the lease if it is still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        body = self._read()
        if body is not None and body.get("token") == self.token:
            try:
                self.fs.rm_file(self.key)
            except FileNotFoundError:
                pass
