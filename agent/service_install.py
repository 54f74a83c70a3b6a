"""Install the agent as a systemd service: write the unit (and an environment file template), print the
`systemctl` steps. Runs nothing privileged itself, so it can be reviewed before it is applied.

    fleet agent-service install [--unit-dir /etc/systemd/system] [--user ollama-fleet] ...
    fleet agent-service print      # the unit on stdout
"""

from __future__ import annotations

import argparse
import os
import pwd
import re
import shlex
import shutil
import sys
from importlib.resources import files
from pathlib import Path

UNIT_NAME = "ollama-fleet-agent.service"
TEMPLATE = Path(str(files(__package__ or "") / "systemd" / UNIT_NAME))
DEFAULT_UNIT_DIR = "/etc/systemd/system"
DEFAULT_ENV_FILE = "/etc/ollama-fleet/agent.env"
DEFAULT_USER = "ollama-fleet"
DEFAULT_DATA_DIR = "/var/lib/ollama-fleet"

ENV_TEMPLATE = """\
# ollama-fleet agent settings: one FLEET_<SETTING>=value per line (`fleet settings` lists them all).
FLEET_MQTT_URL=mqtt://{user}:change-me@broker.example:1883
#FLEET_NODE_ID=
#FLEET_OLLAMA_URL=http://127.0.0.1:11434
# Install Ollama into the data directory when missing, run and supervise it:
#FLEET_INSTALL_OLLAMA=true
# ...or supervise an Ollama that is already installed (on PATH):
#FLEET_MANAGE_OLLAMA=true
#FLEET_PULL_DEFAULT_MODEL=true
# Proxies for the Ollama download (Ollama's own model pulls use them too). LAN traffic never does.
#HTTPS_PROXY=http://user:password@proxy.example:3128
#NO_PROXY=localhost,127.0.0.1,.lan
"""


def default_exec() -> str:
    found = shutil.which("fleet")
    return found if found else f"{shlex.quote(sys.executable)} -m ollama_fleet.cli"


def render_unit(user: str = DEFAULT_USER, exec_cmd: str | None = None, env_file: str = DEFAULT_ENV_FILE,
                data_dir: str = DEFAULT_DATA_DIR) -> str:
    text = TEMPLATE.read_text()
    exec_cmd = exec_cmd or default_exec()
    replacements = {
        r"^User=.*$": f"User={user}",
        r"^Group=.*$": f"Group={user}",
        r"^EnvironmentFile=.*$": f"EnvironmentFile={env_file}",
        r"^ExecStart=.*$": f"ExecStart={exec_cmd} agent",
        r"^Environment=FLEET_DATA_DIR=.*$": f"Environment=FLEET_DATA_DIR={data_dir} HOME={data_dir}",
    }
    for pattern, line in replacements.items():
        text, n = re.subn(pattern, line.replace("\\", "\\\\"), text, count=1, flags=re.MULTILINE)
        if n != 1:
            raise ValueError(f"unit template lacks a line matching {pattern}")
    if data_dir != DEFAULT_DATA_DIR:  # StateDirectory= only manages folders under /var/lib
        text = re.sub(r"^StateDirectory=.*\n", "", text, flags=re.MULTILINE)
    return text


def _user_exists(user: str) -> bool:
    try:
        pwd.getpwnam(user)
        return True
    except KeyError:
        return False


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="fleet agent-service",
                                description="Install the agent as a systemd service.")
    p.add_argument("action", nargs="?", default="install", choices=("install", "print"))
    p.add_argument("--unit-dir", default=DEFAULT_UNIT_DIR, help=f"where the unit goes [{DEFAULT_UNIT_DIR}]")
    p.add_argument("--user", default=DEFAULT_USER, help=f"dedicated system user [{DEFAULT_USER}]")
    p.add_argument("--exec", dest="exec_cmd", default=None, help="the `fleet` command [found on PATH]")
    p.add_argument("--env-file", default=DEFAULT_ENV_FILE, help=f"EnvironmentFile [{DEFAULT_ENV_FILE}]")
    p.add_argument("--data-dir", default=DEFAULT_DATA_DIR,
                   help=f"agent data and Ollama install [{DEFAULT_DATA_DIR}]")
    p.add_argument("--no-env-file", action="store_true", help="do not create the environment file template")
    args = p.parse_args(argv)
    unit = render_unit(args.user, args.exec_cmd, args.env_file, args.data_dir)
    if args.action == "print":
        sys.stdout.write(unit)
        return 0
    try:
        unit_path = Path(args.unit_dir) / UNIT_NAME
        unit_path.parent.mkdir(parents=True, exist_ok=True)
        unit_path.write_text(unit)
        print(f"wrote {unit_path}")
        env_path = Path(args.env_file)
        if not args.no_env_file and not env_path.exists():
            env_path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(env_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # it will hold a password
            with os.fdopen(fd, "w") as f:
                f.write(ENV_TEMPLATE.format(user=args.user))
            print(f"wrote {env_path} (mode 600): set FLEET_MQTT_URL and the other settings there")
    except OSError as e:
        print(f"fleet agent-service: {e} (run as root, or choose --unit-dir/--env-file)", file=sys.stderr)
        return 1
    print("\nthen, as root:")
    if not _user_exists(args.user):
        print(f"  useradd --system --home-dir {args.data_dir} --shell /usr/sbin/nologin {args.user}")
    print(f"  chown root:{args.user} {args.env_file} && chmod 640 {args.env_file}")
    print("  systemctl daemon-reload")
    print(f"  systemctl enable --now {UNIT_NAME}")
    print(f"  journalctl -u {UNIT_NAME} -f")
    return 0


if __name__ == "__main__":
    sys.exit(main())
