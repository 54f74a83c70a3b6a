"""What the long-running commands start: `fleet controller`, `fleet up` and `fleet agent`.

`fleet up` is composed here: a controller whose event loop also runs an agent for this host's Ollama
(the controller starts it once its registry is up and stops it before its own parts). The controller
never imports agent code; this module is where the two meet. Imports are per command, so `fleet agent`
never loads the web framework and `fleet controller` never loads the agent.
"""

from __future__ import annotations

import asyncio
import logging
import signal

from ollama_fleet.settings import Config

log = logging.getLogger("fleet")


def run_controller(cfg: Config, local_agent: bool = False) -> int:
    """The controller in this process until SIGINT/SIGTERM; with `local_agent`, `fleet up`'s agent too."""
    from ollama_fleet.controller.app import create_app
    from ollama_fleet.controller.compose import CompanionFactory
    from ollama_fleet.controller.edge.timeouts import DeadlineProtocol  # header and body deadlines for slow clients

    companion: CompanionFactory | None = None
    if local_agent:
        from ollama_fleet.agent.service import Agent

        companion = Agent
    app = create_app(cfg, companion)
    log.info("controller listening on http://%s:%s (dashboard /dashboard, API docs /docs)", cfg.host, cfg.port)
    app.run(host=cfg.host, port=cfg.port, single_process=True, access_log=False, motd=False,
            protocol=DeadlineProtocol)
    return 0


def run_agent(cfg: Config) -> int:
    """One agent in this process until SIGINT/SIGTERM."""
    from ollama_fleet.agent.service import Agent

    async def main() -> None:
        agent = Agent(cfg)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, agent.stop)
        await agent.run()

    asyncio.run(main())
    return 0
