"""A training run's ``--output_path`` on object storage (``s3://bucket/prefix``, any fsspec URL): written into a
local staging folder, and each file uploaded once it is complete.

The run writes exactly as it writes a local ``--output_path`` (:mod:`diffsplit.training.outputs`, accelerate's
``project_dir``, the trackers), but into :func:`staging_folder`: ``$DIFFSPLIT_STAGING_DIR`` (else the system
temp folder's ``diffsplit-staging/``), then a folder keyed by the URL, named as the URL's last part. The same
URL gives the same folder in every process of the run, so they agree on it without talking.

When the uploads happen (main process only, unless said otherwise):

* at the first checkpoint, ``training_args.json`` first (a prefix with checkpoints but no flags would look
  like another run's), after ``--overwrite_output`` removed the earlier run's objects;
* at every checkpoint: the checkpoint's files (``epoch-<i>.safetensors``, ``<stem>.<component>/``), then the
  small files (``training_args.json``, ``loss.csv``, samples, ...); at every resumable state, the whole
  ``state-<n>/`` folder with ``diffsplit_state.json`` last, so a state is usable (:func:`read_state
  <diffsplit.training.outputs.read_state>`) only once every other file of it is there (with several
  processes each uploads its own random state first: another machine's is in that machine's staging folder);
* at the run's end, whatever else the staging folder holds (the trackers' logs, closed by then); a run that
  fails after its first checkpoint uploads its trackers' logs only.

One PUT is atomic on object storage (a multipart upload appears whole when it completes), so a reader never
sees half a file; a file is uploaded only after it was written whole, and hidden names (every temporary
name diffsplit writes) never. Checkpoints and states leave the staging folder once uploaded (they can be
tens of gigabytes); the rest goes at the run's end. Nothing is uploaded before the run's first checkpoint,
so a run that fails early leaves the prefix as it was (the up-front write check's object is removed at once).

``--resume_from_state <URL>`` is downloaded first (:func:`download`) into its own staging folder
(:func:`local_state`), on each machine's first process; a resumed run also downloads the output's
``loss.csv`` whose rows it keeps.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path, PurePosixPath

from diffsplit.errors import UserError
from diffsplit.storage.location import Location, is_url, location
from diffsplit.training.config import TrainConfig

STAGING_ENV = "DIFFSPLIT_STAGING_DIR"
"""The environment variable naming the folder remote outputs are staged under (default: the temp folder)."""


def staging_folder(url: str) -> Path:
    """The local folder a run stages the remote location ``url`` in (the same for every process)."""
    root = Path(os.environ.get(STAGING_ENV) or Path(tempfile.gettempdir()) / "diffsplit-staging")
    key = url.rstrip("/")
    digest = hashlib.sha256(key.encode("utf-8")).hexdigest()[:16]
    # Named as the URL's last part: what names the run (wandb) is the same as for a local folder.
    return root / digest / (PurePosixPath(key.split("://", 1)[-1]).name or "output")


def output_folder(config: TrainConfig) -> Path:
    """The local folder the run writes its outputs into: ``--output_path``, or its staging folder."""
    if is_url(config.output_path):
        return staging_folder(config.output_path)
    return Path(location(config.output_path))


def local_state(folder: str) -> Path:
    """The local folder the state ``--resume_from_state folder`` is loaded from (its download if remote)."""
    return staging_folder(folder) if is_url(folder) else Path(location(folder))


@contextlib.contextmanager
def store_errors(what: str) -> Iterator[None]:
    """Whatever the store's client raises (network, credentials, no bucket, quota) as one line: ``what``
    and the error; a :class:`UserError` passes as it is."""
    try:
        yield
    except UserError:
        raise
    except Exception as err:  # noqa: BLE001 - each filesystem's client has exceptions of its own
        message = " ".join(str(err).split())[:200]
        raise UserError(f"{what} ({type(err).__name__}: {message})") from None


def remove_staged(folder: Path) -> None:
    """Remove a staging folder, and its URL's folder above it once empty."""
    shutil.rmtree(folder, ignore_errors=True)
    with contextlib.suppress(OSError):  # another URL's name under the same digest: kept
        folder.parent.rmdir()


def download(remote: Location, folder: Path, flag: str = "--resume_from_state") -> None:
    """Copy every object under ``remote`` into ``folder`` (emptied first)."""
    shutil.rmtree(folder, ignore_errors=True)
    fs, root = remote.fs, remote.path.rstrip("/")
    with store_errors(f"{flag} {remote}: download failed"):
        fs.invalidate_cache()
        for key in sorted(fs.find(root)):
            target = folder / PurePosixPath(key[len(root) :].lstrip("/"))
            target.parent.mkdir(parents=True, exist_ok=True)
            fs.get_file(key, str(target))


class RemoteOutput:
    """The uploads of one remote ``--output_path``: files of its staging folder go to the same names under
    the URL.

    Args:
        url: ``--output_path``.
        last: file names a folder's upload sends after all its other files (the file that marks it complete).
    """

    def __init__(self, url: str, last: Iterable[str] = ()) -> None:
        self.url = url.rstrip("/")
        self.remote = location(url, "--output_path")
        self.staging = staging_folder(url)
        self.last = frozenset(last)
        self._sent: dict[Path, tuple[int, int]] = {}  # file -> (size, mtime) when last uploaded

    def prepare(self, fetch: Iterable[str] = ()) -> None:
        """Empty the staging folder (an earlier run's leftovers are not this run's), then download the files
        ``fetch`` names that the URL holds (a resumed run's loss rows).

        Raises:
            UserError: naming ``--output_path``, when the store cannot be read.
        """
        shutil.rmtree(self.staging, ignore_errors=True)
        self.staging.mkdir(parents=True, exist_ok=True)
        fs = self.remote.fs
        with store_errors(f"--output_path {self.url}: download failed"):
            fs.invalidate_cache()
            for name in fetch:
                key = self._key(PurePosixPath(name))
                if fs.isfile(key):
                    fs.get_file(key, str(self.staging / name))

    def remove(self, matches: Callable[[str], bool]) -> None:
        """Remove the entries directly under the URL whose names ``matches`` (``--overwrite_output``)."""
        fs = self.remote.fs
        with store_errors(
            f"--output_path {self.url} --overwrite_output: removing the earlier run's files failed"
        ):
            fs.invalidate_cache()
            for entry in fs.ls(self.remote.path, detail=False) if fs.isdir(self.remote.path) else []:
                if matches(PurePosixPath(entry.rstrip("/")).name):
                    fs.rm(entry, recursive=True)

    def where(self, path: Path) -> str:
        """The URL of a staged file or folder."""
        return f"{self.url}/{path.relative_to(self.staging).as_posix()}"

    def upload(self, path: Path, keep: bool = True, to: str | None = None) -> str:
        """Upload a staged file, or every file of a staged folder (the :attr:`last` names last); returns its
        URL. ``keep=False`` removes the staged copy once it is uploaded; ``to`` names a file's (not a
        folder's) place under the URL when it is not its staged name.

        Raises:
            UserError: naming ``--output_path`` and the file, when the store refuses it.
        """
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        files.sort(key=lambda p: p.name in self.last)  # stable: the rest keep their sorted order
        for file in files:
            self._put(file, to)
        if not keep:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
            self._sent = {p: s for p, s in self._sent.items() if p.exists()}
        return f"{self.url}/{to}" if to else self.where(path)

    def sync(self, under: Iterable[str] | None = None) -> None:
        """Upload every staged file not uploaded since it last changed (the end of a run: the trackers'
        logs); with ``under``, only the files in those top-level folders. Hidden names are left out: every
        temporary name diffsplit writes starts with a dot (``.state-<n>.tmp/``, ``.<file>.tmp-<pid>``)."""
        for file in sorted(p for p in self.staging.rglob("*") if p.is_file()):
            parts = file.relative_to(self.staging).parts
            if any(part.startswith(".") for part in parts):
                continue
            if under is not None and parts[0] not in under:
                continue
            stat = file.stat()
            if self._sent.get(file) != (stat.st_size, stat.st_mtime_ns):
                self._put(file)

    def discard(self) -> None:
        """Remove the staging folder (after the run's last upload)."""
        remove_staged(self.staging)

    def _key(self, relative: PurePosixPath) -> str:
        return f"{self.remote.path.rstrip('/')}/{relative.as_posix()}"

    def _put(self, file: Path, to: str | None = None) -> None:
        relative = PurePosixPath(to or file.relative_to(self.staging).as_posix())
        stat = file.stat()
        with store_errors(f"--output_path {self.url}: uploading {relative} failed"):
            self.remote.fs.put_file(str(file), self._key(relative))
        self._sent[file] = (stat.st_size, stat.st_mtime_ns)
