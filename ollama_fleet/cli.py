"""`fleet`: the one command. `fleet up` (trial: broker + controller + local agent), `fleet controller`,
`fleet agent`, `fleet broker passwd`, `fleet settings`."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from typing import Callable

from ollama_fleet import __version__
from ollama_fleet import settings
from ollama_fleet import log as flog
from ollama_fleet.settings import AGENT, CONTROLLER, Config, ConfigError

log = logging.getLogger("fleet")

# Subcommands that other modules add (e.g. `fleet keys`), name -> (help, configure(parser), run(args))
EXTRA_COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {}

from ollama_fleet.controller.proxy import keys_cli  # noqa: E402  (light: imports the database layer only when run)

EXTRA_COMMANDS["keys"] = (keys_cli.HELP, keys_cli.configure, keys_cli.run)


def _service_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("service_args", nargs=argparse.REMAINDER, help="`install [--user U] [--unit-dir D]` or `print`")


def _service_run(args: argparse.Namespace) -> int:
    from ollama_fleet.agent.service_install import main as service_main

    return service_main(args.service_args)


EXTRA_COMMANDS["agent-service"] = ("Install the agent as a systemd service (restart on failure).",
                                   _service_args, _service_run)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fleet", description="ollama-fleet: one endpoint and one dashboard "
                                "for a fleet of machines running Ollama, coordinated over MQTT.")
    p.add_argument("--version", action="version", version=f"ollama-fleet {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str, help_: str, scopes: tuple[str, ...]) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help_, description=help_)
        sp.add_argument("--version", action="version", version=f"ollama-fleet {__version__}")
        settings.add_arguments(sp, scopes)
        return sp

    command("up", "Single-host trial: a loopback broker (unless --mqtt-url), the controller and an agent "
            "for the local Ollama.", (CONTROLLER, AGENT))
    command("controller", "Run the controller (HTTP API, proxy, dashboard, MQTT ingest).", (CONTROLLER,))
    command("agent", "Run an agent next to one Ollama.", (AGENT,))
    b = sub.add_parser("broker", help="Broker helpers: manage Mosquitto credentials.")
    b.add_argument("--version", action="version", version=f"ollama-fleet {__version__}")
    b.add_argument("broker_args", nargs=argparse.REMAINDER,
                   help="`passwd add USER [--password P|--password-stdin] [--file PATH]` or `passwd remove USER`")
    s = sub.add_parser("settings", help="Print every setting (as a Markdown table with --markdown).")
    s.add_argument("--markdown", action="store_true")
    s.add_argument("--version", action="version", version=f"ollama-fleet {__version__}")
    for name, (help_, configure, _) in EXTRA_COMMANDS.items():
        sp = sub.add_parser(name, help=help_, description=help_)
        sp.add_argument("--version", action="version", version=f"ollama-fleet {__version__}")
        configure(sp)
    return p


def run_controller(cfg: Config, with_local_agent: bool) -> int:
    from ollama_fleet.controller.app import create_app

    app = create_app(cfg, with_local_agent=with_local_agent)
    log.info("controller listening on http://%s:%s (dashboard /dashboard, API docs /docs)", cfg.host, cfg.port)
    from ollama_fleet.controller.edge.timeouts import DeadlineProtocol    # header and body deadlines for slow clients

    app.run(host=cfg.host, port=int(cfg.port), single_process=True, access_log=False, motd=False,
            protocol=DeadlineProtocol)
    return 0


def run_agent(cfg: Config) -> int:
    from ollama_fleet.agent.service import Agent

    async def main() -> None:
        agent = Agent(cfg)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, agent.stop)
        await agent.run()

    asyncio.run(main())
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "settings":
            if args.markdown:
                print(settings.markdown_table())
            else:
                cfg = settings.load([CONTROLLER, AGENT])
                for k, v in cfg.as_dict().items():
                    if k == "data_dir":  # the path actually used, not the empty "use the default"
                        v = str(cfg.data_path)
                    print(f"{k} = {v!r}  ({cfg.source(k)})")
            return 0
        if args.command == "broker":
            from ollama_fleet.broker.passwd import main as passwd_main

            rest = list(args.broker_args)
            if not rest or rest[0] != "passwd":
                print("usage: fleet broker passwd {add,remove} ...", file=sys.stderr)
                return 2
            return passwd_main(rest[1:])
        if args.command in EXTRA_COMMANDS:
            return EXTRA_COMMANDS[args.command][2](args)
        scopes = {"up": (CONTROLLER, AGENT), "controller": (CONTROLLER,), "agent": (AGENT,)}[args.command]
        cfg = settings.load(scopes, args)
        flog.setup(cfg.log_level, cfg.log_format)
        if args.command == "agent":
            return run_agent(cfg)
        return run_controller(cfg, with_local_agent=args.command == "up" and cfg.local_agent)
    except ConfigError as e:
        print(f"fleet: configuration error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
