"""The IMDB archive: download (atomic, checksummed, with progress), extract safely, reuse.

Nothing half-done survives: the download lands in a `.part` file renamed only after its
SHA-256 matches, and extraction happens in a staging directory renamed into place."""

from __future__ import annotations

import hashlib
import http.client
import logging
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
ALTERNATIVES = ("set data.path to an extracted aclImdb directory, data.url to a reachable mirror, "
                "or use data=table / data=text_dir / data=synthetic")


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def download(url: str, target: Path, sha256: str, timeout_s: float = 30.0) -> None:
    """Fetch `url` to `target`, or raise ConfigError and leave no file behind."""
    from tqdm import tqdm

    part = target.with_name(target.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response, part.open("wb") as out:
            expected = int(response.headers.get("Content-Length") or 0)
            with tqdm(total=expected or None, unit="B", unit_scale=True, desc=f"Downloading {target.name}",
                      disable=None) as progress:
                for block in iter(lambda: response.read(1 << 20), b""):
                    out.write(block)
                    progress.update(len(block))
        received = part.stat().st_size
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


def extract(archive: Path, target: Path) -> None:
    """Extract with tarfile's `data` filter (no member escapes the target, no devices or
    absolute links), skipping the 50,000 unlabelled reviews in train/unsup."""
    staging = Path(tempfile.mkdtemp(prefix=".extract-", dir=target.parent))
    try:
        with tarfile.open(archive) as tar:
            members = [m for m in tar if "/unsup/" not in m.name and not m.name.endswith("/unsup")]
            tar.extractall(staging, members=members, filter="data")
        top = [p for p in staging.iterdir() if p.is_dir()]
        if len(top) != 1 or not (top[0] / "train").is_dir():
            raise ConfigError("data.url", f"{archive.name} does not hold an aclImdb/train directory; {ALTERNATIVES}")
        try:
            top[0].rename(target)
        except OSError:
            if not target.is_dir():  # else a concurrent job extracted it first
                raise
    except (tarfile.TarError, EOFError, OSError) as error:
        archive.unlink(missing_ok=True)
        raise ConfigError("data.url", f"{archive.name} is corrupt or truncated ({error}); it was deleted, "
                          f"run again to re-download, or {ALTERNATIVES}") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def dataset_dir(data: DictConfig) -> Path:
    """The extracted aclImdb directory: data.path, the cached copy, or a fresh download."""
    if data.path:
        return Path(data.path).expanduser()
    root = cache_root(data.cache_dir)
    target = root / "aclImdb"
    if target.is_dir():
        return target
    archive = root / ARCHIVE
    if not archive.is_file() or sha256_of(archive) != data.sha256:
        log.info("Downloading IMDB from %s into %s", data.url, root)
        download(data.url, archive, data.sha256)
    log.info("Extracting %s", archive)
    extract(archive, target)
    return target
