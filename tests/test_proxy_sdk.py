"""The controller driven by the official `ollama` and `openai` SDKs, against two fake-Ollama agents
(real agent processes, so the registry knows their models). One fleet for the whole module."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import ollama
import openai
import pytest

from tests.conftest import FleetFactory
from tests.fake_ollama import DEFAULT_MODELS
from tests.proxy_support import wait_routable
from tests.support import Controller, wait_until

EMBED = "all-minilm"
LLAMA = "llama3.2:latest"


@pytest.fixture(scope="module")
def sdk(tmp_path_factory: pytest.TempPathFactory, mosquitto: Any) -> Iterator[Controller]:
    factory = FleetFactory(tmp_path_factory.mktemp("proxy-sdk"), mosquitto)
    try:
        c = factory.controller()
        a = factory.fake_ollama("sdk-a")  # llama3.2, qwen2.5:0.5b, all-minilm
        b = factory.fake_ollama("sdk-b", models={LLAMA: DEFAULT_MODELS[LLAMA]}, tokens=4)  # same digest
        factory.agent("sdk-a", a.url)
        factory.agent("sdk-b", b.url)
        wait_routable(c, "sdk-a", "sdk-b")
        yield c
    finally:
        factory.close()


@pytest.fixture
def oll(sdk: Controller) -> Iterator[ollama.Client]:
    with ollama.Client(host=sdk.url, trust_env=False, timeout=30) as client:
        yield client


@pytest.fixture
def oai(sdk: Controller) -> Iterator[openai.OpenAI]:
    http = httpx.Client(trust_env=False, timeout=30)
    with openai.OpenAI(base_url=sdk.url + "/v1", api_key="unused", http_client=http, max_retries=0) as client:
        yield client


# ---- native API, ollama SDK ---------------------------------------------------------------------
def test_chat_non_stream(oll: ollama.Client):
    r = oll.chat(model="llama3.2", messages=[{"role": "user", "content": "hello"}])
    assert r.message.role == "assistant" and r.message.content.startswith("fake-sdk-")
    assert r.done and r.done_reason == "stop" and r.eval_count and r.eval_count >= 4


def test_chat_stream(oll: ollama.Client):
    parts = list(oll.chat(model="llama3.2", messages=[{"role": "user", "content": "hello"}], stream=True))
    assert len(parts) >= 5 and parts[-1].done and not parts[0].done
    text = "".join(p.message.content for p in parts)
    assert text.startswith("fake-sdk-") and "tok1" in text


def test_generate_stream_and_not(oll: ollama.Client):
    r = oll.generate(model="qwen2.5:0.5b", prompt="why")  # only on sdk-a
    assert r.response == "fake-sdk-a tok1 tok2 tok3 tok4" and r.done
    parts = list(oll.generate(model="qwen2.5:0.5b", prompt="why", stream=True))
    assert "".join(p.response for p in parts) == r.response and parts[-1].done


def test_embed_and_legacy_embeddings(oll: ollama.Client):
    r = oll.embed(model=EMBED, input=["one", "two"])
    assert len(r.embeddings) == 2 and len(r.embeddings[0]) == 384
    legacy = oll.embeddings(model=EMBED, prompt="one")
    assert legacy.embedding == pytest.approx(r.embeddings[0])


def test_list_is_the_union_deduplicated(oll: ollama.Client, sdk: Controller):
    names = [m.model for m in oll.list().models]
    assert sorted(names) == ["all-minilm:latest", "llama3.2:latest", "qwen2.5:0.5b"]
    raw = sdk.http.get("/api/tags").json()["models"]
    llama = next(m for m in raw if m["name"] == "llama3.2:latest")
    assert llama["agents"] == ["sdk-a", "sdk-b"] and llama["digest"] and llama["size"] > 0
    assert llama["details"]["family"] == "llama"


def test_show_goes_to_an_agent_with_the_model(oll: ollama.Client):
    r = oll.show("qwen2.5:0.5b")
    assert r.details and r.details.family == "qwen2"
    assert r.capabilities == ["completion", "tools"]
    assert r.modelinfo and r.modelinfo["qwen2.context_length"] == 32768


def test_ps_lists_loaded_models_with_their_agent(oll: ollama.Client, sdk: Controller):
    oll.embed(model=EMBED, input="load me")  # only sdk-a has it: loaded there
    running = wait_until(lambda: [m for m in oll.ps().models if m.model == "all-minilm:latest"], 10,
                         what="all-minilm in /api/ps")
    assert running[0].size_vram and running[0].expires_at
    raw = sdk.http.get("/api/ps").json()["models"]
    assert {"name": "all-minilm:latest", "agent": "sdk-a"}.items() <= next(
        m for m in raw if m["name"] == "all-minilm:latest").items()


def test_unknown_model_is_a_404_response_error(oll: ollama.Client):
    with pytest.raises(ollama.ResponseError) as e:
        oll.chat(model="nope", messages=[{"role": "user", "content": "x"}])
    assert e.value.status_code == 404
    assert e.value.error == "model 'nope' not found, try pulling it first"


def test_version_and_root(sdk: Controller):
    assert sdk.http.get("/api/version").json() == {"version": "0.12.6"}
    r = sdk.http.get("/")
    assert r.status_code == 200 and r.text == "Ollama is running"
    assert sdk.http.head("/").status_code == 200


# ---- OpenAI-compatible API, openai SDK ----------------------------------------------------------
def test_openai_chat_non_stream(oai: openai.OpenAI):
    r = oai.chat.completions.create(model="llama3.2", messages=[{"role": "user", "content": "hi"}])
    assert r.object == "chat.completion" and r.choices[0].message.content.startswith("fake-sdk-")
    assert r.usage and r.usage.completion_tokens >= 4


def test_openai_chat_stream_with_usage(oai: openai.OpenAI):
    chunks = list(oai.chat.completions.create(model="llama3.2", messages=[{"role": "user", "content": "hi"}],
                                              stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.startswith("fake-sdk-")
    assert chunks[-1].usage and chunks[-1].usage.completion_tokens >= 4


def test_openai_completions_stream_and_not(oai: openai.OpenAI):
    r = oai.completions.create(model="qwen2.5:0.5b", prompt="once")
    assert r.choices[0].text == "fake-sdk-a tok1 tok2 tok3 tok4"
    chunks = list(oai.completions.create(model="qwen2.5:0.5b", prompt="once", stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == r.choices[0].text


def test_openai_embeddings(oai: openai.OpenAI):
    r = oai.embeddings.create(model=EMBED, input=["a b", "c"])
    assert len(r.data) == 2 and len(r.data[0].embedding) == 384 and r.usage.prompt_tokens == 3


def test_openai_models_list_and_retrieve(oai: openai.OpenAI):
    ids = sorted(m.id for m in oai.models.list())
    assert ids == ["all-minilm:latest", "llama3.2:latest", "qwen2.5:0.5b"]
    m = oai.models.retrieve("llama3.2:latest")
    assert m.id == "llama3.2:latest" and m.owned_by == "library" and m.created > 0
    with pytest.raises(openai.NotFoundError):
        oai.models.retrieve("nope:latest")


def test_openai_responses_stream_and_not(oai: openai.OpenAI):
    r = oai.responses.create(model="llama3.2", input="hi")
    assert r.output_text.startswith("fake-sdk-")
    events = list(oai.responses.create(model="llama3.2", input="hi", stream=True))
    assert events[0].type == "response.created" and events[-1].type == "response.completed"


def test_openai_unknown_model_is_not_found_error(oai: openai.OpenAI):
    with pytest.raises(openai.NotFoundError) as e:
        oai.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    assert e.value.status_code == 404
    assert e.value.body == {"message": "model 'nope' not found, try pulling it first",
                            "type": "not_found_error", "param": None, "code": None}
