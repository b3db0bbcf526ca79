"""The IMDB archive: download (atomic, checksummed, size-capped, with progress), extract safely, reuse.

Nothing half-done survives: each download lands in its own temporary file renamed only after its
SHA-256 matches, and extraction happens in a staging directory renamed into place. Parallel jobs
on a cold cache take a lock: the first downloads and extracts, the others wait and reuse its work."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import http.client
import logging
import os
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

from omegaconf import DictConfig

from fp8exp.config import ConfigError
from fp8exp.data.cache import cache_root

log = logging.getLogger(__name__)
ARCHIVE = "aclImdb_v1.tar.gz"
LOCK = ".imdb.lock"
UNPACK_FACTOR = 4  # an archive may unpack to this many times data.max_download_bytes
ALTERNATIVES = ("set data.path to an extracted aclImdb directory, data.url to a reachable mirror, "
                "or use data=table / data=text_dir / data=synthetic")


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _too_big(what: str, limit: str) -> ConfigError:
    return ConfigError("data.max_download_bytes", f"{what}, over the limit of {limit}; no partial file was "
                       "kept. Check data.url, or raise data.max_download_bytes (null = no limit)")


def download(url: str, target: Path, sha256: str, max_bytes: int | None = None, timeout_s: float = 30.0) -> None:
    """Fetch `url` to `target`, or raise ConfigError and leave no file behind. Each call writes its
    own temporary file, so concurrent calls never truncate each other's download."""
    from tqdm import tqdm

    handle, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
    part = Path(name)
    try:
        with os.fdopen(handle, "wb") as out, urllib.request.urlopen(url, timeout=timeout_s) as response:
            expected = int(response.headers.get("Content-Length") or 0)
            if max_bytes is not None and expected > max_bytes:
                raise _too_big(f"{url} announces {expected} bytes", f"{max_bytes} bytes")
            received = 0
            with tqdm(total=expected or None, unit="B", unit_scale=True, desc=f"Downloading {target.name}",
                      disable=None) as progress:
                for block in iter(lambda: response.read(1 << 20), b""):
                    received += len(block)
                    if max_bytes is not None and received > max_bytes:
                        raise _too_big(f"{url} sent {received} bytes so far", f"{max_bytes} bytes")
                    out.write(block)
                    progress.update(len(block))
        if expected and received != expected:
            raise ConfigError("data.url", f"download of {url} was cut short ({received} of {expected} "
                              f"bytes); try again, or {ALTERNATIVES}")
        actual = sha256_of(part)
        if actual != sha256:
            raise ConfigError("data.sha256", f"{url} has SHA-256 {actual}, expected {sha256}; the file "
                              f"was deleted. Check data.url/data.sha256, or {ALTERNATIVES}")
        part.replace(target)
    except (urllib.error.URLError, http.client.HTTPException, OSError) as error:
        reason = getattr(error, "reason", None) or repr(error)
        raise ConfigError("data.url", f"cannot download {url} ({reason}); {ALTERNATIVES}") from None
    finally:
        part.unlink(missing_ok=True)


def extract(archive: Path, target: Path, max_download_bytes: int | None = None) -> None:
    """Extract with tarfile's `data` filter (no member escapes the target, no devices or
    absolute links), skipping the 50,000 unlabelled reviews in train/unsup, and refusing an
    archive that would unpack to more than UNPACK_FACTOR x `max_download_bytes`."""
    staging = Path(tempfile.mkdtemp(prefix=".extract-", dir=target.parent))
    try:
        with tarfile.open(archive) as tar:
            members = [m for m in tar if "/unsup/" not in m.name and not m.name.endswith("/unsup")]
            unpacked = sum(m.size for m in members if m.isfile())
            if max_download_bytes is not None and unpacked > UNPACK_FACTOR * max_download_bytes:
                raise _too_big(f"{archive.name} unpacks to {unpacked} bytes",
                               f"{UNPACK_FACTOR} x {max_download_bytes} bytes unpacked")
            tar.extractall(staging, members=members, filter="data")
        top = [p for p in staging.iterdir() if p.is_dir()]
        if len(top) != 1 or not (top[0] / "train").is_dir():
            raise ConfigError("data.url", f"{archive.name} does not hold an aclImdb/train directory; {ALTERNATIVES}")
        top[0].rename(target)
    except (tarfile.TarError, EOFError, OSError) as error:
        archive.unlink(missing_ok=True)
        raise ConfigError("data.url", f"{archive.name} is corrupt or truncated ({error}); it was deleted, "
                          f"run again to re-download, or {ALTERNATIVES}") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)


@contextlib.contextmanager
def _locked(root: Path):
    """Held while the archive is fetched and extracted; the lock file stays (deleting it would
    let a third job lock a new file while a second still holds the old one)."""
    with (root / LOCK).open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def dataset_dir(data: DictConfig) -> Path:
    """The extracted aclImdb directory: data.path, the cached copy, or a fresh download. The
    cached copy is named by the archive's SHA-256, so a new data.sha256 never reuses an old one."""
    if data.path:
        return Path(data.path).expanduser()
    root = cache_root(data.cache_dir)
    target = root / f"aclImdb-{data.sha256[:16]}"
    if target.is_dir():
        return target
    with _locked(root):
        if target.is_dir():  # another job extracted it while this one waited
            return target
        archive = root / ARCHIVE
        if not archive.is_file() or sha256_of(archive) != data.sha256:
            log.info("Downloading IMDB from %s into %s", data.url, root)
            download(data.url, archive, data.sha256, data.max_download_bytes)
        log.info("Extracting %s", archive)
        extract(archive, target, data.max_download_bytes)
    return target
