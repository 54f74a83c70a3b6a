"""The typed settings object: generated from the one settings table, frozen, typed as the table says."""

from __future__ import annotations

import dataclasses
import typing

import pytest

from ollama_fleet import settings
from ollama_fleet._settings_fields import SettingsFields
from ollama_fleet.settings import AGENT, CONTROLLER, SETTINGS, ConfigError
from tests.update_readme import FIELDS, fields_module


def test_the_typed_fields_are_generated_from_the_settings_table():
    assert FIELDS.read_text() == fields_module(), "run `uv run python -m tests.update_readme`"


def test_fields_and_table_agree_in_names_order_types_and_defaults():
    fields = dataclasses.fields(SettingsFields)
    assert [f.name for f in fields] == [s.name for s in SETTINGS]
    hints = typing.get_type_hints(SettingsFields)
    for f, s in zip(fields, SETTINGS):
        assert f.default == s.default and type(f.default) is s.type, s.name
        assert f.repr is not s.secret, s.name
        if s.choices:
            assert typing.get_args(hints[s.name]) == s.choices, s.name
        else:
            assert (typing.get_origin(hints[s.name]) or hints[s.name]) is s.type, s.name


def test_loaded_values_have_the_table_types_from_every_source(tmp_path):
    conf = tmp_path / "fleet.toml"
    conf.write_text('stale_after = 4\nallowed_origins = ["http://a", "http://b"]\n')
    env = {"FLEET_PORT": "9000", "FLEET_TRUSTED_PROXIES": "10.0.0.1, 10.0.0.2", "FLEET_LOCAL_AGENT": "off"}
    cfg = settings.load([CONTROLLER, AGENT], {"config": str(conf), "heartbeat_interval": "2"}, env=env)
    assert (cfg.stale_after, cfg.port, cfg.heartbeat_interval, cfg.local_agent) == (4.0, 9000, 2.0, False)
    assert cfg.allowed_origins == ("http://a", "http://b") and cfg.trusted_proxies == ("10.0.0.1", "10.0.0.2")
    for s in SETTINGS:
        assert type(getattr(cfg, s.name)) is s.type, s.name


def test_config_is_frozen_and_replace_checks_like_a_file():
    cfg = settings.load([AGENT], {}, env={})
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.port = 1  # type: ignore[misc]
    changed = cfg.replace(heartbeat_interval=1, allowed_origins=["http://x"])
    assert (changed.heartbeat_interval, changed.allowed_origins) == (1.0, ("http://x",))
    assert type(changed.heartbeat_interval) is float and changed.source("heartbeat_interval") == "code"
    assert cfg.heartbeat_interval == 5.0 and cfg.source("heartbeat_interval") == "default"
    with pytest.raises(ConfigError, match="unknown setting 'heartbeat'"):
        cfg.replace(heartbeat=1)
    with pytest.raises(ConfigError, match="mqtt_protocol"):
        cfg.replace(mqtt_protocol="4")


def test_secrets_stay_out_of_repr_and_lists_show_as_lists():
    cfg = settings.load([CONTROLLER], {"admin_token": "s3cret", "mqtt_url": "mqtt://u:pw@h"},
                        env={"FLEET_ALLOWED_ORIGINS": "http://a"})
    assert "s3cret" not in repr(cfg) and "pw@" not in repr(cfg) and "heartbeat_interval=5.0" in repr(cfg)
    shown = cfg.as_dict()
    assert shown["admin_token"] == shown["mqtt_url"] == "***" and shown["allowed_origins"] == ["http://a"]
    assert shown["trusted_proxies"] == [] and list(shown) == [s.name for s in SETTINGS]
