"""The official `openai` client works unchanged against /v1, with `user` selecting the adapter."""

from __future__ import annotations

import openai
import pytest

from .test_api_e2e import PROFILES, PROMPT, generate, put_profile


@pytest.fixture()
def oai(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", timeout=120, max_retries=0)


def test_chat_completions_plain_and_streaming(client, oai):
    put_profile(client, "oai-space", PROFILES["space"])
    reference = generate(client, "oai-space", max_tokens=10)
    model = oai.models.list().data[0].id

    chat = oai.chat.completions.create(
        model=model, messages=[{"role": "user", "content": PROMPT}], user="oai-space", max_tokens=10, temperature=0
    )
    assert chat.choices[0].message.role == "assistant"
    assert chat.choices[0].message.content == reference["text"]
    assert chat.usage.completion_tokens == len(reference["token_ids"])
    assert chat.model_extra["personalization"]["personalized"] is True

    stream = oai.chat.completions.create(
        model=model, messages=[{"role": "user", "content": PROMPT}], user="oai-space", max_tokens=10, temperature=0,
        stream=True,
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == reference["text"]
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")


def test_chat_without_user_is_the_base_model(client, oai):
    base = generate(client, "oai-nobody", max_tokens=10)
    chat = oai.chat.completions.create(
        model="any", messages=[{"role": "user", "content": PROMPT}], max_tokens=10, temperature=0
    )
    assert chat.choices[0].message.content == base["text"]
    assert chat.model_extra["personalization"]["personalized"] is False


def test_completions_plain_and_streaming(client, oai):
    put_profile(client, "oai-crime", PROFILES["crime"])
    done = oai.completions.create(model="m", prompt="The movie is about", user="oai-crime", max_tokens=8, temperature=0)
    raw = generate(client, "oai-crime", prompt="The movie is about", max_tokens=8, chat_template=False)
    assert done.choices[0].text == raw["text"]
    streamed = "".join(c.choices[0].text for c in oai.completions.create(
        model="m", prompt="The movie is about", user="oai-crime", max_tokens=8, temperature=0, stream=True
    ) if c.choices)
    assert streamed == raw["text"]
