"""The wheel is the product: built from an sdist (no symlinks there, so hatch's `sources` mapping of
the top-level broker/ controller/ agent/ web/ is what puts them under `ollama_fleet`), installed in a
clean venv and run from outside the checkout, it serves `fleet up` (templates and static files found
as package data) and a second `fleet agent` joins it. Needs `uv` (and PyPI or uv's cache) only."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from ollama_fleet import __version__
from ollama_fleet.broker.local import free_loopback_port
from tests.fake_ollama import FakeOllamaProcess, start_fake_ollama
from tests.support import ROOT, wait_until

pytestmark = pytest.mark.skipif(shutil.which("uv") is None, reason="needs uv to build and install the wheel")

UV = shutil.which("uv") or "uv"
OLD_TOP_LEVEL = ("fleet", "controller", "agent", "broker", "web")
PACKAGE_DATA = (  # read at run time through importlib.resources
    "ollama_fleet/web/templates/base.html",
    "ollama_fleet/web/static/charts.js",
    "ollama_fleet/web/static/vendor/htmx.LICENSE",
    "ollama_fleet/controller/jobs/catalogue.json",
    "ollama_fleet/model_tiers.json",
    "ollama_fleet/agent/systemd/ollama-fleet-agent.service",
)


def _uv(*args: str, cwd: Path) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "UV_PROJECT_ENVIRONMENT")}
    out = subprocess.run([UV, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120,
                         check=False)
    assert out.returncode == 0, f"uv {' '.join(args)}:\n{out.stdout}\n{out.stderr}"
    return out.stdout


def _names(wheel: Path) -> set[str]:
    with zipfile.ZipFile(wheel) as z:
        return set(z.namelist())


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A clean venv with the wheel built from the sdist installed; returns the venv's directory."""
    tmp = tmp_path_factory.mktemp("wheel")
    _uv("build", "--quiet", "-o", str(tmp / "dist"), cwd=ROOT)  # sdist, then the wheel from the sdist
    _uv("build", "--quiet", "--wheel", "-o", str(tmp / "direct"), cwd=ROOT)  # pip install . / Dockerfile
    [wheel] = (tmp / "dist").glob("*.whl")
    [direct] = (tmp / "direct").glob("*.whl")
    names = _names(wheel)
    assert names == _names(direct), "the wheel differs when built from the sdist instead of the checkout"
    assert {n.split("/", 1)[0] for n in names} == {"ollama_fleet", wheel.name.split("-py3")[0] + ".dist-info"}
    assert set(PACKAGE_DATA) <= names, set(PACKAGE_DATA) - names
    assert len([n for n in names if n.startswith("ollama_fleet/web/templates/")]) >= 20

    _uv("venv", "--quiet", "--python", sys.executable, str(tmp / "venv"), cwd=tmp)
    _uv("pip", "install", "--quiet", "--python", str(tmp / "venv"), str(wheel), cwd=tmp)
    return tmp / "venv"


def _env(tmp: Path, **extra: str) -> dict[str, str]:
    """No PYTHONPATH, no FLEET_* from the caller, no venv of the checkout: only the installed wheel."""
    drop = ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEET_") and k not in drop}
    return {**env, "PYTHONUNBUFFERED": "1", "NO_PROXY": "*", "FLEET_DATA_DIR": str(tmp / "data"),
            "FLEET_AUTO_DISTRIBUTE": "0", "FLEET_HEARTBEAT_INTERVAL": "0.5", "FLEET_MODELS_DIR": str(tmp),
            **extra}


class _Fleet:
    """`<venv>/bin/fleet ...` in `cwd`, its output in a log file."""

    def __init__(self, venv: Path, args: list[str], cwd: Path, env: dict[str, str]) -> None:
        self.log_path = cwd / f"fleet-{'-'.join(args)}.log"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen([str(venv / "bin" / "fleet"), *args], cwd=cwd, env=env, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def running(self) -> bool:
        assert self.proc.poll() is None, f"exited with {self.proc.returncode}:\n{self.log()[-3000:]}"
        return True

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
            raise AssertionError(f"ignored SIGTERM:\n{self.log()[-3000:]}") from None


@pytest.fixture
def fake() -> Iterator[FakeOllamaProcess]:
    with start_fake_ollama("wheel") as f:
        yield f


def test_the_wheel_installs_one_namespace_with_its_package_data(venv: Path, tmp_path: Path) -> None:
    py = str(venv / "bin" / "python")
    probe = ("import importlib.util, json, ollama_fleet.web, ollama_fleet.cli\n"
             "from importlib.resources import files\n"
             f"print(json.dumps({{'old': [n for n in {OLD_TOP_LEVEL!r} if importlib.util.find_spec(n)],\n"
             "  'pkg': ollama_fleet.__file__,\n"
             "  'base': str(files('ollama_fleet.web') / 'templates' / 'base.html')}))")
    out = subprocess.run([py, "-I", "-c", probe], cwd=tmp_path, capture_output=True, text=True, timeout=60,
                         check=False)
    assert out.returncode == 0, out.stderr
    found = json.loads(out.stdout)
    assert found["old"] == [], f"top-level packages installed: {found['old']}"
    site = venv.resolve()
    assert Path(found["pkg"]).resolve().is_relative_to(site) and Path(found["base"]).is_file(), found
    version = subprocess.run([str(venv / "bin" / "fleet"), "--version"], cwd=tmp_path, capture_output=True,
                             text=True, timeout=60, env=_env(tmp_path), check=False)
    assert (version.returncode, version.stdout.strip()) == (0, f"ollama-fleet {__version__}"), version.stderr


def test_fleet_up_and_fleet_agent_from_the_installed_wheel(venv: Path, tmp_path: Path,
                                                           fake: FakeOllamaProcess) -> None:
    port = free_loopback_port()
    up = _Fleet(venv, ["up"], tmp_path, _env(tmp_path, FLEET_PORT=str(port), FLEET_OLLAMA_URL=fake.url,
                                               FLEET_NODE_ID="wheel-up"))
    joined: _Fleet | None = None
    http = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=5, trust_env=False)

    def agents() -> set[str]:
        return {a["id"] for a in http.get("/api/agents").json()["agents"]}

    try:
        wait_until(lambda: up.running() and http.get("/healthz").status_code == 200, 30,
                   what="fleet up /healthz")
        page = http.get("/dashboard")
        assert page.status_code == 200 and "<html" in page.text.lower() and "/dashboard/static/" in page.text
        static = http.get("/dashboard/static/charts.js")
        assert static.status_code == 200 and len(static.content) > 100
        wait_until(lambda: "wheel-up" in agents(), 30, what="the local agent of fleet up")

        broker = re.search(r"--mqtt-url (mqtt://127\.0\.0\.1:\d+)", up.log())
        assert broker, up.log()[-3000:]
        protocol = "311" if re.search(r"Trial MQTT broker \(embedded amqtt", up.log()) else "5"
        joined = _Fleet(venv, ["agent"], tmp_path, _env(
            tmp_path, FLEET_MQTT_URL=broker.group(1), FLEET_MQTT_PROTOCOL=protocol, FLEET_OLLAMA_URL=fake.url,
            FLEET_NODE_ID="wheel-joined"))
        wait_until(lambda: joined.running() and "wheel-joined" in agents(), 30, what="fleet agent joining")
    finally:
        http.close()
        codes = {"agent": joined.stop() if joined else 0, "up": up.stop()}
    assert codes == {"agent": 0, "up": 0}, up.log()[-3000:]
    for proc in (up, joined):
        assert proc is not None and "Traceback" not in proc.log(), proc.log()[-3000:]
