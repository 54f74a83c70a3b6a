"""The URL the controller uses for an agent's Ollama (pure function; addresses of this machine are real)."""

from __future__ import annotations

from ollama_fleet.controller.registry.reach import effective_url, local_addresses


def test_remote_agent_on_loopback_is_reached_on_its_lan_address():
    assert effective_url("http://127.0.0.1:11434", ["203.0.113.7", "2001:db8::7"]) == "http://203.0.113.7:11434"
    assert effective_url("http://localhost:11500/", ["203.0.113.7"]) == "http://203.0.113.7:11500"
    assert effective_url("http://127.0.0.1:11434", ["2001:db8::7"]) == "http://[2001:db8::7]:11434"


def test_agent_on_this_machine_keeps_loopback():
    mine = sorted(a for a in local_addresses() if not a.startswith("127."))
    assert effective_url("http://127.0.0.1:11434", mine or ["127.0.0.1"]) == "http://127.0.0.1:11434"


def test_lan_urls_and_advertised_urls_are_kept():
    assert effective_url("http://10.1.2.3:11434", ["203.0.113.7"]) == "http://10.1.2.3:11434"
    assert effective_url("http://127.0.0.1:11434", ["203.0.113.7"], "https://gpu7.lan/ollama/") == \
        "https://gpu7.lan/ollama"
    assert effective_url("http://127.0.0.1:11434", []) == "http://127.0.0.1:11434"
