"""Ollama install (R-O1..R-O5, R-O2 progress): real HTTP(S) release server, real forward proxy, real
`ollama serve` stand-in processes, real Mosquitto for the MQTT side. Retry waits are scaled down through
settings; the default schedule is checked on the very wait object the downloader uses."""

from __future__ import annotations

import errno
import hashlib
import itertools
import logging
import os
import select
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from ollama_fleet.agent import install as inst
from ollama_fleet.agent import progress as prog
from ollama_fleet.agent.install import ChecksumError, DiskFullError, InstallError, Release, backoff_schedule, default_asset
from ollama_fleet.agent.manager import OllamaManager
from ollama_fleet.agent.ollama import OllamaClient
from ollama_fleet import settings
from ollama_fleet.settings import AGENT
from tests.forward_proxy import ForwardProxy
from tests.mosquitto import MosquittoProcess
from tests.ollama_support import (
    ASSET,
    PROXY_VARS,
    VERSION,
    Collector,
    agent_cfg,
    path_without_ollama,
    pid_alive,
    running_agent,
    until,
)
from tests.release_server import FAKE_VERSION, ReleaseServer, make_archive, make_tls
from tests.support import clear_retained


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No proxy or CA settings leak in from the machine, and no `ollama` on PATH unless a test puts one."""
    for var in PROXY_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("PATH", path_without_ollama())


@pytest.fixture
def archive() -> bytes:
    return make_archive()


@pytest.fixture
def rs(archive: bytes) -> Iterator[ReleaseServer]:
    server = ReleaseServer().start()
    server.publish(VERSION, {ASSET: archive})
    try:
        yield server
    finally:
        server.stop()


class Recorder(inst.Reporter):
    def __init__(self) -> None:
        self.events: list[tuple[str, str, str, dict[str, Any]]] = []
        self.phases: list[str] = []
        self.last: prog.Meter | None = None

    def phase(self, name: str) -> None:
        self.phases.append(name)

    def progress(self, meter: prog.Meter) -> None:
        self.last = meter

    def event(self, name: str, level: str, message: str, **fields: Any) -> None:
        self.events.append((name, level, message, fields))

    def names(self) -> list[str]:
        return [e[0] for e in self.events]


@pytest.fixture
def tls(tmp_path: Path) -> tuple[Path, Any]:
    if inst.shutil.which("openssl") is None:
        pytest.skip("the openssl tool is needed to make a test CA")
    return make_tls(tmp_path)


def release(rs: ReleaseServer, **over: Any) -> Release:
    fields = dict(version=VERSION, asset=ASSET, url=rs.url_template().format(version=VERSION, asset=ASSET),
                  checksum_url=rs.checksum_template().format(version=VERSION))
    fields.update(over)
    return Release(**fields)  # type: ignore[arg-type]


# ---- retry schedule --------------------------------------------------------------------------------


def test_default_backoff_schedule_is_1_2_4_8_16_capped_at_60() -> None:
    cfg = settings.load([AGENT], {}, env={})
    assert (cfg.ollama_download_retries, cfg.ollama_retry_backoff, cfg.ollama_retry_backoff_max) == (5, 1.0, 60.0)
    assert backoff_schedule(5, 1.0, 60.0) == [1, 2, 4, 8, 16]
    assert backoff_schedule(8, 1.0, 60.0) == [1, 2, 4, 8, 16, 32, 60, 60]


async def test_503s_and_dropped_connections_recover_by_retry_and_range_resume(
        tmp_path: Path, rs: ReleaseServer, archive: bytes) -> None:
    rs.fail_first = 2  # two 503s, then...
    rs.drop_after, rs.drop_times = len(archive) // 3, 2  # ...two bodies cut a third of the way in
    rec = Recorder()
    base = 0.05
    started = time.monotonic()
    binary = await inst.install(release(rs), tmp_path / "ollama", rec, backoff=base)
    elapsed = time.monotonic() - started

    assert binary == tmp_path / "ollama" / VERSION / "bin" / "ollama"
    gets = rs.gets(ASSET)
    assert [g.status for g in gets] == [503, 503, 200, 206, 206]
    third = len(archive) // 3
    assert [g.range for g in gets] == [None, None, None, f"bytes={third}-", f"bytes={2 * third}-"]
    assert sum(g.sent for g in gets) == len(archive)  # resumed: no byte fetched twice
    waits = [e[3]["wait"] for e in rec.events if e[0] == "ollama_download_retry"]
    assert waits == backoff_schedule(4, base, 60.0) == [0.05, 0.1, 0.2, 0.4]
    assert elapsed >= sum(waits)  # the waits were really taken
    assert not list((tmp_path / "ollama" / "downloads").iterdir())  # archive and .partial cleaned up


async def test_stalled_transfer_times_out_and_resumes(tmp_path: Path, rs: ReleaseServer, archive: bytes,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(inst, "READ_TIMEOUT", 0.3)
    rs.stall_after, rs.stall_times = 50_000, 1
    rec = Recorder()
    await inst.install(release(rs), tmp_path / "ollama", rec, backoff=0.01)
    gets = rs.gets(ASSET)
    assert [g.range for g in gets] == [None, "bytes=50000-"]
    assert "ReadTimeout" in rec.events[0][2]


async def test_retries_give_up_after_the_configured_number(tmp_path: Path, rs: ReleaseServer) -> None:
    rs.fail_first = 100
    rec = Recorder()
    with pytest.raises(InstallError, match="503"):
        await inst.install(release(rs), tmp_path / "ollama", rec, retries=3, backoff=0.01)
    assert len(rs.gets(ASSET)) == 4  # first try + 3 retries
    assert [e[3]["wait"] for e in rec.events] == [0.01, 0.02, 0.04]


async def test_404_is_not_retried_and_reported_clearly(tmp_path: Path, rs: ReleaseServer) -> None:
    rs.status_for[f"/v{VERSION}/{ASSET}"] = 404
    cfg = agent_cfg(tmp_path, rs, install_ollama=True)
    manager = OllamaManager(cfg)
    manager.start()
    try:
        await until(lambda: manager.state == "install_failed", what="install_failed")
        assert len(rs.gets(ASSET)) == 1
        assert "HTTP 404" in (manager.error or "")
        job = next(iter(manager.jobs.values()))
        assert job["status"] == "failed" and "HTTP 404" in job["error"] and job["verb"] == "ollama.install"
        names = [e["event"] for e in manager.events]
        assert names == ["ollama_install_started", "ollama_install_failed"]
        assert manager.events[-1]["level"] == "error"
        assert manager.info()["state"] == "install_failed" and "404" in manager.info()["problem"]
    finally:
        await manager.stop()


async def test_checksum_mismatch_deletes_the_file_retries_once_then_fails(tmp_path: Path, archive: bytes) -> None:
    with ReleaseServer() as server:
        server.publish(VERSION, {ASSET: archive}, checksums="wrong")
        rec = Recorder()
        with pytest.raises(ChecksumError, match="checksum mismatch"):
            await inst.install(release(server), tmp_path / "ollama", rec, backoff=0.01)
        assert [g.status for g in server.gets(ASSET)] == [200, 200]  # one fresh download after the mismatch
    assert rec.names() == ["ollama_checksum_mismatch"]
    assert not list((tmp_path / "ollama" / "downloads").iterdir())  # deleted, partial included
    assert not (tmp_path / "ollama" / VERSION).exists()


async def test_corrupted_download_is_fetched_again_and_installs(tmp_path: Path, rs: ReleaseServer) -> None:
    rs.corrupt_times = 1
    rec = Recorder()
    binary = await inst.install(release(rs), tmp_path / "ollama", rec, backoff=0.01)
    assert binary.is_file()
    assert rec.names() == ["ollama_checksum_mismatch"]
    assert len(rs.gets(ASSET)) == 2


async def test_operator_checksum_wins_over_the_published_one(tmp_path: Path, archive: bytes) -> None:
    with ReleaseServer() as server:
        server.publish(VERSION, {ASSET: archive}, checksums="wrong")
        good = hashlib.sha256(archive).hexdigest()
        await inst.install(release(server, sha256=good), tmp_path / "ollama", Recorder())
        assert server.gets("sha256sum.txt") == []
        bad = hashlib.sha256(b"other").hexdigest()
        with pytest.raises(ChecksumError):
            await inst.install(release(server, sha256=bad, version="0.13.4",
                                       url=server.url_template().format(version=VERSION, asset=ASSET)),
                               tmp_path / "ollama2", Recorder())


async def test_no_checksum_fails_unless_unverified_installs_are_allowed(tmp_path: Path, archive: bytes) -> None:
    with ReleaseServer() as server:
        server.publish(VERSION, {ASSET: archive}, checksums="absent")
        with pytest.raises(ChecksumError, match="ollama_allow_unverified"):
            await inst.install(release(server), tmp_path / "ollama", Recorder())
        assert server.gets(ASSET) == []  # refused before spending a download
        rec = Recorder()
        binary = await inst.install(release(server, allow_unverified=True), tmp_path / "ollama", rec)
        assert binary.is_file()
        assert rec.events[0][0] == "ollama_unverified" and rec.events[0][1] == "warning"
        assert "UNVERIFIED" in rec.events[0][2]


async def test_disk_full_fails_at_once(tmp_path: Path, rs: ReleaseServer) -> None:
    if not os.path.exists("/dev/full"):
        pytest.skip("needs /dev/full (a real ENOSPC)")
    downloads = tmp_path / "ollama" / "downloads"
    downloads.mkdir(parents=True)
    (downloads / f"{VERSION}-{ASSET}.partial").symlink_to("/dev/full")  # every write: ENOSPC from the kernel
    rec = Recorder()
    with pytest.raises(DiskFullError, match="disk full") as info:
        await inst.install(release(rs), tmp_path / "ollama", rec, backoff=0.01)
    assert isinstance(info.value.__cause__, OSError) and info.value.__cause__.errno == errno.ENOSPC
    assert len(rs.gets(ASSET)) == 1 and rec.events == []  # no retry


async def test_tar_zst_release_unpacks_with_the_zstd_tool(tmp_path: Path) -> None:
    if inst.shutil.which("zstd") is None:
        pytest.skip("zstd tool not installed")
    asset = default_asset("0.20.0")
    assert asset.endswith(".tar.zst")
    with ReleaseServer() as server:
        server.publish("0.20.0", {asset: make_archive(compression="zst")})
        binary = await inst.install(release(server, version="0.20.0", asset=asset,
                                            url=server.url_template().format(version="0.20.0", asset=asset),
                                            checksum_url=server.checksum_template().format(version="0.20.0")),
                                    tmp_path / "ollama", Recorder())
    assert binary == tmp_path / "ollama" / "0.20.0" / "bin" / "ollama" and os.access(binary, os.X_OK)
    assert (tmp_path / "ollama" / "0.20.0" / "lib" / "ollama" / "libggml-base.so").is_file()


async def test_tar_zst_without_a_decompressor_fails_clearly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    try:
        import zstandard  # type: ignore[import-not-found]  # noqa: F401

        pytest.skip("the zstandard package is installed")
    except ImportError:
        pass
    if inst.shutil.which("zstd") is None:
        pytest.skip("zstd tool not installed (needed to build the test archive)")
    data = make_archive(compression="zst")
    monkeypatch.setattr(inst, "ZSTD_TOOL", "zstd-is-not-installed")
    asset = "ollama-linux-amd64.tar.zst"
    with ReleaseServer() as server:
        server.publish("0.20.0", {asset: data})
        with pytest.raises(InstallError, match="zstd") as info:
            await inst.install(release(server, version="0.20.0", asset=asset,
                                       url=server.url_template().format(version="0.20.0", asset=asset),
                                       checksum_url=server.checksum_template().format(version="0.20.0")),
                               tmp_path / "ollama", Recorder())
    assert "apt-get install zstd" in str(info.value)
    assert not (tmp_path / "ollama" / "0.20.0").exists()


def test_asset_names_follow_the_release_layout() -> None:
    assert default_asset("0.13.5", "Linux", "x86_64") == "ollama-linux-amd64.tgz"
    assert default_asset("0.14.0", "Linux", "aarch64") == "ollama-linux-arm64.tar.zst"
    assert default_asset("0.20.0", "Darwin", "arm64") == "ollama-darwin.tgz"
    with pytest.raises(InstallError, match="windows"):
        default_asset("0.20.0", "Windows", "AMD64")
    assert inst.parse_sha256sums("abc  ./x\n" + "a" * 64 + "  ./ollama-linux-amd64.tgz\n",
                                 "ollama-linux-amd64.tgz") == "a" * 64
    assert inst.parse_sha256sums("b" * 64 + " *dist/ollama-darwin.tgz\n", "ollama-darwin.tgz") == "b" * 64


# ---- proxies ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("var", ["HTTP_PROXY", "ALL_PROXY"])
async def test_download_through_an_authenticating_proxy_while_lan_traffic_bypasses_it(
        tmp_path: Path, rs: ReleaseServer, monkeypatch: pytest.MonkeyPatch, var: str) -> None:
    with ForwardProxy("fleet", "p@ss:w0rd") as proxy:  # credentials that need URL escaping
        monkeypatch.setenv(var, proxy.url())
        manager = OllamaManager(agent_cfg(tmp_path, rs, install_ollama=True))
        manager.start()
        try:
            await until(lambda: manager.state == "up", what="installed Ollama up")
            targets = [(r.method, r.target, r.authorized) for r in proxy.seen()]
            assert targets == [("GET", rs.base + f"/v{VERSION}/sha256sum.txt", True),
                               ("GET", rs.base + f"/v{VERSION}/{ASSET}", True)]
            # the manager's probes of Ollama (loopback, same as the release server) never used the proxy
            assert not any("/api/" in t for _, t, _ in targets)
        finally:
            await manager.stop()


async def test_https_download_tunnels_through_connect_with_credentials(
        tmp_path: Path, archive: bytes, monkeypatch: pytest.MonkeyPatch,
        tls: tuple[Path, Any]) -> None:
    ca, server_ctx = tls
    with ReleaseServer(tls=server_ctx) as server, ForwardProxy("agent", "s3cret") as proxy:
        server.publish(VERSION, {ASSET: archive})
        monkeypatch.setenv("HTTPS_PROXY", proxy.url())
        monkeypatch.setenv("SSL_CERT_FILE", str(ca))
        binary = await inst.install(release(server), tmp_path / "ollama", Recorder())
        assert binary.is_file()
        seen = proxy.seen()
        assert {(r.method, r.target, r.authorized) for r in seen} == {("CONNECT", f"127.0.0.1:{server.port}", True)}
        assert [g.status for g in server.gets()] == [200, 200]  # sha256sum.txt and the archive, inside the tunnel


async def test_proxy_refusing_credentials_is_not_retried(tmp_path: Path, archive: bytes,
                                                         monkeypatch: pytest.MonkeyPatch,
        tls: tuple[Path, Any]) -> None:
    ca, server_ctx = tls
    with ReleaseServer(tls=server_ctx) as server, ForwardProxy("agent", "s3cret") as proxy:
        server.publish(VERSION, {ASSET: archive})
        monkeypatch.setenv("HTTPS_PROXY", proxy.url(with_credentials=False))
        monkeypatch.setenv("SSL_CERT_FILE", str(ca))
        with pytest.raises(InstallError, match="407"):
            await inst.install(release(server), tmp_path / "ollama", Recorder(), backoff=0.01)
        assert [(r.method, r.authorized) for r in proxy.seen()] == [("CONNECT", False)]
        assert server.gets() == []


async def test_no_proxy_bypasses_the_proxy(tmp_path: Path, rs: ReleaseServer, monkeypatch: pytest.MonkeyPatch) -> None:
    with ForwardProxy() as proxy:
        monkeypatch.setenv("HTTP_PROXY", proxy.url())
        monkeypatch.setenv("NO_PROXY", "localhost,127.0.0.1")
        assert inst.proxy_in_use(rs.base + "/x") is None
        await inst.install(release(rs), tmp_path / "ollama", Recorder())
        assert proxy.seen() == []
        assert len(rs.gets(ASSET)) == 1
        monkeypatch.delenv("NO_PROXY")
        assert inst.proxy_in_use(rs.base + "/x") == proxy.url()


# ---- progress --------------------------------------------------------------------------------------


async def test_without_a_tty_progress_is_plain_log_lines_and_jobs_are_throttled(
        tmp_path: Path, rs: ReleaseServer, archive: bytes, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(prog, "LOG_INTERVAL", 0.2)
    monkeypatch.setattr(prog, "JOB_MIN_INTERVAL", 0.25)
    monkeypatch.setattr(prog, "JOB_MAX_INTERVAL", 0.5)
    rs.chunk_delay = 1.5 / (len(archive) / 16384)  # about 1.5 s for the whole archive
    rs.stall_after, rs.stall_times, rs.stall_seconds = len(archive) // 2, 1, 1.2  # a silent second mid-way
    sent: list[tuple[float, dict[str, Any]]] = []
    manager = OllamaManager(agent_cfg(tmp_path, rs, install_ollama=True))
    original = manager.emit_job
    manager.emit_job = lambda doc: (sent.append((time.monotonic(), doc)), original(doc))  # type: ignore[method-assign]
    caplog.set_level(logging.INFO, logger="fleet.agent.progress")
    manager.start()
    try:
        await until(lambda: manager.state in ("up", "install_failed"), what="install finished")
        assert manager.state == "up"
    finally:
        await manager.stop()
    lines = [r.getMessage() for r in caplog.records if r.name == "fleet.agent.progress"]
    assert len(lines) >= 3, lines
    assert all("\x1b" not in line and "\r" not in line for line in lines)
    assert any("%" in line and "/s" in line and "ETA" in line for line in lines)
    assert "\x1b" not in capsys.readouterr().err
    docs = [d for _, d in sent]
    assert [d["seq"] for d in docs] == list(range(1, len(docs) + 1))
    assert docs[-1]["status"] == "completed" and docs[-1]["progress"] == 1.0
    assert docs[-1]["completed"] == docs[-1]["total"] == len(archive)
    running = [t for t, d in sent if d["status"] == "in_progress"]
    gaps = [b - a for a, b in itertools.pairwise(running)]
    assert min(gaps) >= prog.JOB_MIN_INTERVAL * 0.9, gaps  # at most one per JOB_MIN_INTERVAL...
    assert max(gaps) <= prog.JOB_MAX_INTERVAL + 0.35, gaps  # ...and still one while the transfer stalls
    mid = [d for d in docs if d["status"] == "in_progress" and d["total"]]
    assert any(0 < d["progress"] < 1 and d["speed"] > 0 and d["eta"] is not None for d in mid)


def test_on_a_terminal_progress_is_a_bar_with_percent_speed_and_eta() -> None:
    master, slave = os.openpty()
    try:
        with os.fdopen(slave, "w", closefd=False) as stream:
            bar = prog.ConsoleProgress("ollama 0.20.0", stream=stream)
            assert bar.tty
            clock = [0.0]
            meter = prog.Meter(clock=lambda: clock[0])
            for i in range(1, 5):
                clock[0] = float(i)
                meter.update(i * 1_000_000, 10_000_000)
                bar.update(meter, force=True)
            bar.close(meter)
        raw, deadline = b"", time.monotonic() + 10
        while not raw.endswith(b"\n") and time.monotonic() < deadline:  # drain up to the final newline
            if select.select([master], [], [], 0.1)[0]:
                raw += os.read(master, 65536)
        out = raw.decode()
    finally:
        os.close(master)
        os.close(slave)
    assert "\r" in out and "\x1b[K" in out
    assert "[###" in out and "40.0%" in out and "1.0 MB/s" in out and "ETA 0:06" in out


# ---- end to end over MQTT --------------------------------------------------------------------------


async def test_fresh_install_end_to_end_over_mqtt(tmp_path: Path, rs: ReleaseServer,
                                                  mosquitto: MosquittoProcess) -> None:
    """download -> verify -> install -> start -> the agent reports Ollama up with its version."""
    cfg = agent_cfg(tmp_path, rs, install_ollama=True)
    node = cfg.node_id
    cfg = cfg.replace(mqtt_url=f"mqtt://{node}:{mosquitto.add_user(node)}@127.0.0.1:{mosquitto.port}")
    try:
        async with Collector("127.0.0.1", mosquitto.port, "controller", mosquitto.passwords["controller"], node) as c:
            async with running_agent(cfg) as agent:
                await until(lambda: any(hb["ollama"]["up"] for hb in c.kind("heartbeat")), 30,
                            "a heartbeat with Ollama up")
                await until(lambda: any(i["ollama"].get("version") == FAKE_VERSION and i["ollama"]["managed"]
                                        for i in c.kind("info")), 10, "info with the installed version")
                info = [i for i in c.kind("info") if i["ollama"].get("version") == FAKE_VERSION][-1]["ollama"]
                assert info["state"] == "up" and info["managed"] is True and info["source"] == "installed"
                assert info["binary"] == str(tmp_path / "ollama" / VERSION / "bin" / "ollama")
                pid = info["pid"]
                assert pid_alive(pid)
                hb = [h for h in c.kind("heartbeat") if h["ollama"]["up"]][-1]
                assert hb["ollama"]["state"] == "up"
                client = OllamaClient(cfg.ollama_url, 2)
                try:
                    status = await client.probe()
                finally:
                    await client.aclose()
                assert status.up and status.version == FAKE_VERSION
                await until(lambda: c.events("ollama_started"), 10, "ollama_started event")
                names = [e["event"] for e in c.events()]
                assert names.index("ollama_install_started") < names.index("ollama_installed") < names.index("ollama_started")
                jobs = c.jobs()
                assert {j["verb"] for j in jobs} == {"ollama.install"}
                assert jobs[-1]["status"] == "completed" and jobs[-1]["progress"] == 1.0 and jobs[-1]["error"] is None
                assert [j["seq"] for j in jobs] == sorted(j["seq"] for j in jobs)
                assert agent.manager.state == "up"
                assert c.contract_errors() == []
            assert not pid_alive(pid)  # the child did not outlive the agent
    finally:
        clear_retained("127.0.0.1", mosquitto.port, "controller", mosquitto.passwords["controller"],
                       prefix=f"fleet/v1/nodes/{node}")


async def test_missing_ollama_is_reported_and_the_agent_keeps_running(tmp_path: Path,
                                                                      mosquitto: MosquittoProcess) -> None:
    cfg = agent_cfg(tmp_path)  # no install_ollama: nothing answers, nothing on PATH, no own install
    node = cfg.node_id
    cfg = cfg.replace(mqtt_url=f"mqtt://{node}:{mosquitto.add_user(node)}@127.0.0.1:{mosquitto.port}")
    try:
        async with Collector("127.0.0.1", mosquitto.port, "controller", mosquitto.passwords["controller"], node) as c:
            async with running_agent(cfg) as agent:
                await until(lambda: c.events("ollama_missing"), 10, "ollama_missing event")
                event = c.events("ollama_missing")[0]
                assert event["level"] == "warning" and "--install-ollama" in event["message"]
                await until(lambda: any(i["ollama"].get("state") == "missing" for i in c.kind("info")), 10,
                            "info with state missing")
                await until(lambda: len([h for h in c.kind("heartbeat") if h["ollama"]["state"] == "missing"]) >= 3,
                            10, "heartbeats go on")
                assert agent.manager.supervisor is None  # nothing was started
                assert len(c.events("ollama_missing")) == 1  # said once, not every tick
                assert c.contract_errors() == []
    finally:
        clear_retained("127.0.0.1", mosquitto.port, "controller", mosquitto.passwords["controller"],
                       prefix=f"fleet/v1/nodes/{node}")


async def test_install_proceeds_while_the_broker_is_unreachable(tmp_path: Path, rs: ReleaseServer) -> None:
    from ollama_fleet.broker.local import free_loopback_port

    cfg = agent_cfg(tmp_path, rs, install_ollama=True, mqtt_url=f"mqtt://127.0.0.1:{free_loopback_port()}")
    async with running_agent(cfg) as agent:
        await until(lambda: agent.manager.state == "up", 30, "Ollama up without a broker")
        assert not agent.connected.is_set()
        waiting = agent.outbox.pending()
        assert [m.payload["event"] for m in waiting if m.kind == "events"][:2] == ["ollama_install_started",
                                                                                   "ollama_installed"]
        assert next(m.payload for m in waiting if m.kind == "jobs")["status"] == "completed"  # kept for the broker
        pid = agent.manager.supervisor.pid if agent.manager.supervisor else None
        assert pid and pid_alive(pid)
    assert not pid_alive(pid)


def test_agent_settings_block_reads_flags_env_and_file(tmp_path: Path) -> None:
    conf = tmp_path / "agent.toml"
    conf.write_text('[agent]\ninstall_ollama = true\nollama_version = "0.12.6"\n')
    cfg = settings.load([AGENT], {"config": str(conf), "ollama_download_retries": "7"},
                        env={"FLEET_OLLAMA_DOWNLOAD_URL": "http://mirror.lan/{version}/{asset}"})
    assert cfg.install_ollama is True and cfg.ollama_version == "0.12.6"
    assert cfg.ollama_download_retries == 7 and cfg.source("ollama_download_url") == "env"
    rel = inst.release_from_config(cfg)
    assert rel.url == f"http://mirror.lan/0.12.6/{default_asset('0.12.6')}"
    with pytest.raises(InstallError, match="64 hex"):
        inst.release_from_config(cfg.replace(ollama_sha256="abc"))


async def test_download_client_is_the_only_one_trusting_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HTTP_PROXY", "http://proxy.invalid:3128")
    dl = inst.download_client()
    lan = OllamaClient("http://192.168.1.20:11434", 1)
    try:
        assert dl._trust_env is True and lan.http._trust_env is False
        assert dl._mounts  # the environment proxy is mounted for internet downloads
        assert not lan.http._mounts
    finally:
        await dl.aclose()
        await lan.aclose()


def test_http_status_classification() -> None:
    assert inst.is_retryable(inst.HttpStatusError(503, "u")) and inst.is_retryable(inst.HttpStatusError(500, "u"))
    assert not inst.is_retryable(inst.HttpStatusError(404, "u")) and not inst.is_retryable(inst.HttpStatusError(403, "u"))
    assert inst.is_retryable(httpx.ConnectError("refused")) and inst.is_retryable(httpx.ReadTimeout("slow"))
    assert not inst.is_retryable(httpx.ProxyError("407 Proxy Authentication Required"))
    assert inst.is_retryable(httpx.ProxyError("502 Bad Gateway"))
    assert not inst.is_retryable(DiskFullError("disk full"))
