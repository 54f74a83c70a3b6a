"""Find Ollama, or download, verify and unpack an official release into a directory of our own.

Release facts (checked against ollama/ollama's release workflow and install.sh):
- assets live at `https://github.com/ollama/ollama/releases/download/v<version>/<asset>`;
- Linux assets are `ollama-linux-<amd64|arm64>.tgz` up to 0.13.x and `.tar.zst` from 0.14.0 on
  (ollama/ollama#13651), each holding `bin/ollama` and `lib/ollama/...`; macOS has `ollama-darwin.tgz`
  (CLI + libraries) next to the app bundle `Ollama-darwin.zip`;
- every release publishes `sha256sum.txt`, lines of `<sha256>  ./<asset>`.

Downloads go through the operator's proxy settings (httpx `trust_env=True`: HTTP(S)_PROXY, ALL_PROXY,
NO_PROXY, credentials in the proxy URL); this is the only client in the agent that does.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import json
import logging
import os
import platform
import re
import shutil
import subprocess
import tarfile
import time
import urllib.request
import zipfile
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import IO, Any

import httpx
from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt, wait_exponential

from ollama_fleet import __version__
from ollama_fleet.log import redact_url
from ollama_fleet.settings import Config

from ollama_fleet.agent.progress import Meter

log = logging.getLogger("fleet.agent.install")

# module level so tests can shrink them
CONNECT_TIMEOUT = 15.0
READ_TIMEOUT = 60.0  # a transfer that stalls this long counts as a timeout and is retried
SLEEP: Callable[[float], Awaitable[None]] = asyncio.sleep  # tenacity's sleep between retries
ZSTD_TOOL = "zstd"  # fallback decompressor for .tar.zst when the `zstandard` package is absent
ZST_SINCE = (0, 14, 0)  # first release whose Linux archives are .tar.zst
MARKER = ".fleet-install.json"  # written last: a version folder without it is incomplete
BINARY_CANDIDATES = ("bin/ollama", "ollama", "Ollama.app/Contents/Resources/ollama")


class InstallError(Exception):
    """Installing Ollama failed; the message is meant for the operator."""


class DiskFullError(InstallError):
    pass


class ChecksumError(InstallError):
    pass


class HttpStatusError(InstallError):
    def __init__(self, status: int, url: str) -> None:
        super().__init__(f"HTTP {status} from {redact_url(url)}")
        self.status = status


class IncompleteBody(Exception):
    """The server closed before Content-Length bytes arrived (retried with Range)."""


def is_retryable(exc: BaseException) -> bool:
    """Timeouts, connection errors and HTTP 5xx are retried; 4xx, disk full and checksum errors are not."""
    if isinstance(exc, HttpStatusError):
        return exc.status >= 500
    if isinstance(exc, httpx.ProxyError):
        # a CONNECT refused with 4xx (407: bad or missing proxy credentials) will not get better
        m = re.match(r"\s*(\d{3})\b", str(exc))
        return not (m and 400 <= int(m.group(1)) < 500)
    if isinstance(exc, httpx.UnsupportedProtocol):
        return False
    if isinstance(exc, httpx.ConnectError) and "CERTIFICATE_VERIFY_FAILED" in str(exc):
        return False  # a TLS trust problem (or interception) needs the operator, not another try
    if isinstance(exc, (httpx.TimeoutException, httpx.TransportError, IncompleteBody)):
        return True
    return False


def retry_wait(base: float, cap: float) -> wait_exponential:
    """base, 2*base, 4*base ... capped: 1, 2, 4, 8, 16 s with the defaults (R-O3)."""
    return wait_exponential(multiplier=base, exp_base=2, min=0, max=cap)


def backoff_schedule(retries: int, base: float, cap: float) -> list[float]:
    """The waits the downloader takes before retries 1..n (same wait object it uses)."""
    wait = retry_wait(base, cap)
    return [float(wait(SimpleNamespace(attempt_number=i))) for i in range(1, retries + 1)]  # type: ignore[arg-type]


# ---- what to download ----------------------------------------------------------------------------


def _version_tuple(version: str) -> tuple[int, ...]:
    nums = re.findall(r"\d+", version.split("-")[0])
    return tuple(int(n) for n in nums[:3])


def platform_names(system: str | None = None, machine: str | None = None) -> tuple[str, str]:
    system = (system or platform.system()).lower()
    machine = (machine or platform.machine()).lower()
    arch = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}.get(machine)
    if system not in ("linux", "darwin") or (system == "linux" and arch is None):
        raise InstallError(f"no Ollama release archive for {system}/{machine}: install Ollama yourself "
                           "and run the agent with manage_ollama")
    return system, arch or machine


def default_asset(version: str, system: str | None = None, machine: str | None = None) -> str:
    os_name, arch = platform_names(system, machine)
    if os_name == "darwin":
        return "ollama-darwin.tgz"
    ext = ".tar.zst" if _version_tuple(version) >= ZST_SINCE else ".tgz"
    return f"ollama-linux-{arch}{ext}"


@dataclass(frozen=True)
class Release:
    version: str
    asset: str
    url: str
    checksum_url: str
    sha256: str = ""  # given by the operator: wins over the published one
    allow_unverified: bool = False


def release_from_config(cfg: Config) -> Release:
    version = cfg.ollama_version.strip().lstrip("v")
    if not version:
        raise InstallError("ollama_version is empty")
    asset = cfg.ollama_asset or default_asset(version)
    os_name, arch = platform_names()
    fields = {"version": version, "asset": asset, "os": os_name, "arch": arch}
    try:
        url = cfg.ollama_download_url.format(**fields)
        checksum_url = cfg.ollama_checksum_url.format(**fields)
    except (KeyError, IndexError, ValueError) as e:
        raise InstallError(f"bad URL template: {e}") from None
    sha = cfg.ollama_sha256.strip().lower()
    if sha and not re.fullmatch(r"[0-9a-f]{64}", sha):
        raise InstallError("ollama_sha256 must be 64 hex digits")
    return Release(version, asset, url, checksum_url, sha, cfg.ollama_allow_unverified)


def install_root(cfg: Config) -> Path:
    configured = cfg.ollama_install_dir
    return Path(configured).expanduser() if configured else cfg.data_path / "ollama"


# ---- finding an existing Ollama -----------------------------------------------------------------


def find_binary_in(folder: Path) -> Path | None:
    for rel in BINARY_CANDIDATES:
        p = folder / rel
        if p.is_file() and os.access(p, os.X_OK):
            return p
    return None


def installed_binary(root: Path, version: str) -> Path | None:
    """The agent's own install of this version, if complete."""
    folder = root / version
    return find_binary_in(folder) if (folder / MARKER).is_file() else None


def path_binary() -> Path | None:
    found = shutil.which("ollama")
    return Path(found) if found else None


# ---- download ------------------------------------------------------------------------------------


def download_client() -> httpx.AsyncClient:
    """The one internet client: honours the proxy environment; identity encoding keeps Range offsets exact."""
    return httpx.AsyncClient(
        trust_env=True, follow_redirects=True,
        timeout=httpx.Timeout(READ_TIMEOUT, connect=CONNECT_TIMEOUT),
        headers={"User-Agent": f"ollama-fleet/{__version__}", "Accept-Encoding": "identity"},
    )


def proxy_in_use(url: str) -> str | None:
    """For the log: which proxy the environment routes this URL through (credentials hidden)."""
    host = httpx.URL(url).host
    proxies = urllib.request.getproxies()
    if urllib.request.proxy_bypass_environment(host, proxies):  # type: ignore[attr-defined]
        return None
    scheme = httpx.URL(url).scheme
    chosen = proxies.get(scheme) or proxies.get("all")
    return redact_url(chosen) if chosen else None


ProgressFn = Callable[[int, "int | None"], None]
RetryFn = Callable[[BaseException, float, int], None]


class Downloader:
    """GET with resume (HTTP Range into `<dest>.partial`) and tenacity retries."""

    def __init__(self, client: httpx.AsyncClient, retries: int = 5, backoff: float = 1.0,
                 backoff_max: float = 60.0, on_retry: RetryFn | None = None) -> None:
        self.client = client
        self.retries = max(0, retries)
        self.backoff, self.backoff_max = backoff, backoff_max
        self.on_retry = on_retry
        self.waits: list[float] = []  # waits actually taken, in order
        self.requests = 0

    def _retrying(self) -> AsyncRetrying:
        def before_sleep(state: Any) -> None:
            wait = float(state.next_action.sleep)
            self.waits.append(wait)
            exc = state.outcome.exception()
            log.warning("download failed (%s); retry %d/%d in %.3g s", _describe(exc),
                        state.attempt_number, self.retries, wait)
            if self.on_retry:
                self.on_retry(exc, wait, state.attempt_number)

        async def sleep(seconds: float) -> None:
            await SLEEP(seconds)

        return AsyncRetrying(
            stop=stop_after_attempt(self.retries + 1),
            wait=retry_wait(self.backoff, self.backoff_max),
            retry=retry_if_exception(is_retryable),
            before_sleep=before_sleep,
            sleep=sleep,
            reraise=True,
        )

    async def fetch_text(self, url: str, missing_ok: bool = True) -> str | None:
        """A small document (sha256sum.txt); 404 -> None when missing_ok."""
        async for attempt in self._retrying():
            with attempt:
                self.requests += 1
                resp = await self.client.get(url)
                if resp.status_code == 404 and missing_ok:
                    return None
                if resp.status_code >= 400:
                    raise HttpStatusError(resp.status_code, url)
                return resp.text
        return None  # pragma: no cover - reraise=True

    async def download(self, url: str, dest: Path, progress: ProgressFn | None = None) -> Path:
        partial = dest.with_name(dest.name + ".partial")
        async for attempt in self._retrying():
            with attempt:
                await self._fetch_once(url, partial, progress)
        os.replace(partial, dest)
        _meta_path(partial).unlink(missing_ok=True)
        return dest

    async def _fetch_once(self, url: str, partial: Path, progress: ProgressFn | None) -> None:
        offset = partial.stat().st_size if partial.exists() else 0
        meta = _load_meta(partial)
        headers = {}
        if offset:
            headers["Range"] = f"bytes={offset}-"
            if meta.get("url") == url and meta.get("validator"):
                headers["If-Range"] = meta["validator"]  # changed upstream -> full 200, not a spliced file
        self.requests += 1
        async with self.client.stream("GET", url, headers=headers) as resp:
            if resp.status_code == 416 and offset:
                log.info("server refused to resume at %d bytes: starting over", offset)
                partial.unlink(missing_ok=True)
                raise IncompleteBody("range not satisfiable")
            if resp.status_code >= 400:
                raise HttpStatusError(resp.status_code, url)
            if resp.status_code == 206 and offset:
                start, total = _content_range(resp.headers.get("content-range", ""))
                if start != offset:
                    partial.unlink(missing_ok=True)
                    raise IncompleteBody(f"server resumed at {start}, not {offset}")
                mode = "ab"
                log.info("resuming download at %d of %s bytes", offset, total)
            else:
                offset, mode = 0, "wb"
                length = resp.headers.get("content-length")
                total = int(length) if length and length.isdigit() else None
            validator = resp.headers.get("etag") or resp.headers.get("last-modified")
            _save_meta(partial, {"url": url, "validator": validator, "total": total})
            if total is not None:
                free = shutil.disk_usage(partial.parent).free
                if total - offset > free:
                    raise DiskFullError(f"disk full: {total - offset} bytes to download but only {free} free "
                                        f"in {partial.parent}")
            done = offset
            if progress:
                progress(done, total)
            try:
                with open(partial, mode) as f:
                    async for chunk in resp.aiter_raw():  # as received: a chunker would lose bytes on a drop
                        f.write(chunk)
                        done += len(chunk)
                        if progress:
                            progress(done, total)
            except OSError as e:
                if e.errno == errno.ENOSPC:
                    raise DiskFullError(f"disk full while writing {partial} ({done} bytes written): "
                                        "free some space and start again") from e
                raise
            if total is not None and done < total:
                raise IncompleteBody(f"got {done} of {total} bytes")


def _describe(exc: BaseException | None) -> str:
    if exc is None:
        return "?"
    text = str(exc) or exc.__class__.__name__
    return f"{exc.__class__.__name__}: {text}" if not isinstance(exc, InstallError) else text


def _content_range(value: str) -> tuple[int | None, int | None]:
    m = re.match(r"\s*bytes\s+(\d+)-(\d+)/(\d+|\*)", value)
    if not m:
        return None, None
    return int(m.group(1)), (int(m.group(3)) if m.group(3) != "*" else None)


def _meta_path(partial: Path) -> Path:
    return partial.with_name(partial.name + ".json")


def _load_meta(partial: Path) -> dict[str, Any]:
    try:
        doc = json.loads(_meta_path(partial).read_text())
        return doc if isinstance(doc, dict) else {}
    except (OSError, ValueError):
        return {}


def _save_meta(partial: Path, doc: dict[str, Any]) -> None:
    try:
        _meta_path(partial).write_text(json.dumps(doc))
    except OSError:
        pass  # only an optimisation for If-Range


# ---- checksums -----------------------------------------------------------------------------------


def parse_sha256sums(text: str, asset: str) -> str | None:
    """`<hash>  ./<asset>` (sha256sum output; `*` binary marker tolerated) -> hash of `asset`."""
    for line in text.splitlines():
        parts = line.strip().split()
        if len(parts) < 2 or not re.fullmatch(r"[0-9a-fA-F]{64}", parts[0]):
            continue
        name = parts[-1].lstrip("*")
        name = name.removeprefix("./")
        if name == asset or name.rsplit("/", 1)[-1] == asset:
            return parts[0].lower()
    return None


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1024 * 1024):
            h.update(block)
    return h.hexdigest()


# ---- unpacking -----------------------------------------------------------------------------------


def _extract_tar_stream(fileobj: IO[bytes], dest: Path) -> None:
    with tarfile.open(fileobj=fileobj, mode="r|*") as tf:
        tf.extractall(dest, filter="data")  # no absolute paths, no links out of dest, no setuid


def _extract_zst(archive: Path, dest: Path) -> None:
    try:
        import zstandard
    except ImportError:
        zstandard = None
    if zstandard is not None:
        with open(archive, "rb") as raw, zstandard.ZstdDecompressor().stream_reader(raw) as reader:
            _extract_tar_stream(reader, dest)
        return
    tool = shutil.which(ZSTD_TOOL)
    if tool is None:
        raise InstallError(f"{archive.name} is zstd-compressed: install the `zstd` tool "
                           "(apt-get install zstd) "
                           "or the Python package `zstandard`, or set ollama_asset to a .tgz release")
    proc = subprocess.Popen([tool, "-dcq", str(archive)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        _extract_tar_stream(proc.stdout, dest)
    finally:
        if proc.stdout:
            proc.stdout.close()
        rc = proc.wait()
        err = proc.stderr.read().decode(errors="replace").strip() if proc.stderr else ""
        if proc.stderr:
            proc.stderr.close()
    if rc != 0:
        raise InstallError(f"zstd failed on {archive.name} (exit {rc}): {err[:200]}")


def extract(archive: Path, dest: Path) -> None:
    name = archive.name.lower()
    dest.mkdir(parents=True, exist_ok=True)
    try:
        if name.endswith(".tar.zst") or name.endswith(".tzst"):
            _extract_zst(archive, dest)
        elif name.endswith((".tgz", ".tar.gz", ".tar")):
            with open(archive, "rb") as f:
                _extract_tar_stream(f, dest)
        elif name.endswith(".zip"):
            with zipfile.ZipFile(archive) as zf:
                for info in zf.infolist():
                    target = (dest / info.filename).resolve()
                    if not target.is_relative_to(dest.resolve()):
                        raise InstallError(f"{archive.name}: entry {info.filename!r} escapes the folder")
                    zf.extract(info, dest)
                    mode = (info.external_attr >> 16) & 0o755
                    if mode and not info.is_dir():
                        os.chmod(target, mode)
        else:
            raise InstallError(f"unknown archive type: {archive.name}")
    except (tarfile.TarError, zipfile.BadZipFile, EOFError) as e:
        raise InstallError(f"cannot unpack {archive.name}: {e}") from e
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise DiskFullError(f"disk full while unpacking {archive.name} into {dest}") from e
        raise


# ---- the whole install ---------------------------------------------------------------------------


class Reporter:
    """Where an install reports to; the agent's manager turns these into logs, MQTT jobs and events."""

    def phase(self, name: str) -> None: ...

    def progress(self, meter: Meter) -> None: ...

    def event(self, name: str, level: str, message: str, **fields: Any) -> None:
        getattr(log, "warning" if level == "warning" else "error" if level == "error" else "info")(message)


async def install(release: Release, root: Path, reporter: Reporter | None = None,
                  client: httpx.AsyncClient | None = None, retries: int = 5, backoff: float = 1.0,
                  backoff_max: float = 60.0) -> Path:
    """Download, verify and unpack `release` into `<root>/<version>/`; returns the `ollama` binary."""
    rep = reporter or Reporter()
    done = installed_binary(root, release.version)
    if done:
        return done
    downloads = root / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    archive = downloads / f"{release.version}-{release.asset}"
    own_client = client is None
    client = client or download_client()
    dl = Downloader(client, retries, backoff, backoff_max,
                    on_retry=lambda exc, wait, n: rep.event(
                        "ollama_download_retry", "warning",
                        f"Ollama download failed ({_describe(exc)}); retry {n} of {retries} in {wait:.3g} s",
                        attempt=n, wait=wait))
    try:
        via = proxy_in_use(release.url)
        log.info("installing Ollama %s from %s%s", release.version, redact_url(release.url),
                 f" via proxy {via}" if via else "")
        rep.phase("checksum")
        expected = await _expected_sha256(release, dl)
        if expected is None:
            if not release.allow_unverified:
                raise ChecksumError(
                    f"no checksum for {release.asset}: "
                    f"{redact_url(release.checksum_url) or 'no checksum URL'} does not list it. "
                    "Set ollama_sha256, or ollama_allow_unverified=true to install unverified")
            rep.event("ollama_unverified", "warning",
                      f"INSTALLING UNVERIFIED Ollama {release.version}: no checksum published for "
                      f"{release.asset} (ollama_allow_unverified is set)")
        for attempt in (1, 2):  # a mismatch earns one fresh download, then it is an error
            if not archive.exists():
                rep.phase("downloading")
                meter = Meter()

                def on_bytes(completed: int, total: int | None, meter: Meter = meter) -> None:
                    meter.update(completed, total)
                    rep.progress(meter)

                await dl.download(release.url, archive, on_bytes)
            if expected is None:
                break
            rep.phase("verifying")
            actual = await asyncio.to_thread(sha256_file, archive)
            if actual == expected:
                break
            archive.unlink(missing_ok=True)
            msg = (f"checksum mismatch for {release.asset}: expected {expected}, got {actual}; "
                   "the file was deleted")
            if attempt == 2:
                raise ChecksumError(msg)
            rep.event("ollama_checksum_mismatch", "warning", msg + ", downloading it again",
                      expected=expected, actual=actual)
        rep.phase("installing")
        binary = await asyncio.to_thread(_unpack, archive, root, release, expected)
        archive.unlink(missing_ok=True)
        return binary
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise DiskFullError(f"disk full under {root}: {e}") from e
        raise InstallError(f"{e.__class__.__name__}: {e}") from e
    except httpx.HTTPError as e:  # retries exhausted
        raise InstallError(f"download failed after {retries} retries: {_describe(e)}") from e
    except IncompleteBody as e:
        raise InstallError(f"download failed after {retries} retries: {e}") from e
    finally:
        if own_client:
            await client.aclose()


async def _expected_sha256(release: Release, dl: Downloader) -> str | None:
    if release.sha256:
        return release.sha256
    if not release.checksum_url:
        return None
    text = await dl.fetch_text(release.checksum_url)
    return parse_sha256sums(text, release.asset) if text else None


def _unpack(archive: Path, root: Path, release: Release, sha256: str | None) -> Path:
    final = root / release.version
    tmp = root / f".{release.version}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        extract(archive, tmp)
        binary = find_binary_in(tmp)
        if binary is None:
            raise InstallError(f"{release.asset} holds no ollama binary ({', '.join(BINARY_CANDIDATES)})")
        (tmp / MARKER).write_text(json.dumps({
            "version": release.version, "asset": release.asset, "url": redact_url(release.url),
            "sha256": sha256, "installed_at": time.time(), "agent": __version__}))
        if final.exists():  # an incomplete earlier attempt (no marker), never a good install
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    found = find_binary_in(final)
    assert found is not None
    return found
