"""The OpenAI-compatible HTTP API through the official `openai` client against a real server
(engine, Ray workers, uvicorn on loopback): streamed completions and chats, stop strings, usage,
OpenAI's errors (400, 404, 429), the same greedy text as gRPC, and the same metrics."""
from __future__ import annotations

import shutil
import threading
import time

import json
import urllib.error
import urllib.request

import openai
import pytest

from server.api.chat_template import load_chat_template
from tests.conftest import generate, running_server

PROMPT = "Once upon a time"
MESSAGES = [{"role": "system", "content": "You tell stories."}, {"role": "user", "content": "A fox, please."}]


@pytest.fixture(scope="module")
def server(tiny_models, ray_local):
    # one running stream and one waiting fill the queue: the 429 test needs no flood
    with running_server(tiny_models["qwen3_moe"], workers=2, http_port=0, max_running=1, max_waiting=1,
                        max_step_tokens=64) as s:
        yield s


@pytest.fixture()
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://127.0.0.1:{server.http_port}/v1", api_key="none", max_retries=0,
                         timeout=120)


def _http(server, path: str, body: bytes | None = None) -> tuple[int, dict]:
    """(status, JSON body) of one plain HTTP request, errors included."""
    req = urllib.request.Request(f"http://127.0.0.1:{server.http_port}{path}", data=body,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def _invalid(server) -> float:
    return server.metrics.registry.get_sample_value("elasticmoe_requests_total", {"status": "invalid"}) or 0.0


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == [server.config.model]
    assert _http(server, "/health") == (200, {"status": "ok"})
    # as before the experts are placed, and while draining: 503 in OpenAI's shape, nothing queued
    server.http.set_serving(False)
    try:
        assert _http(server, "/health")[0] == 503
        with pytest.raises(openai.InternalServerError) as err:
            client.completions.create(model=server.config.model, prompt=PROMPT, max_tokens=2)
        assert err.value.status_code == 503 and err.value.body["type"] == "service_unavailable"
    finally:
        server.http.set_serving(True)


def test_greedy_completion_equals_grpc_streamed_or_not(server, client):
    want_ids, want, last = generate(server.channel, prompt=PROMPT, max_tokens=24, ignore_eos=True)
    done = client.completions.create(model=server.config.model, prompt=PROMPT, max_tokens=24, temperature=0,
                                     extra_body={"ignore_eos": True})
    assert done.choices[0].text == want and done.choices[0].finish_reason == "length"
    assert (done.usage.prompt_tokens, done.usage.completion_tokens, done.usage.total_tokens) == \
        (last.prompt_tokens, 24, last.prompt_tokens + 24)
    chunks = list(client.completions.create(model=server.config.model, prompt=PROMPT, max_tokens=24, temperature=0,
                                            stream=True, stream_options={"include_usage": True},
                                            extra_body={"ignore_eos": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == want
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert len([c for c in chunks if c.choices]) > 1            # streamed, not one lump
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 24   # the usage chunk
    assert all(c.usage is None for c in chunks[:-1])


def test_stop_string_ends_the_text_before_it(server, client):
    full = client.completions.create(model=server.config.model, prompt=PROMPT, max_tokens=24, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text
    stop = full[len(full) // 2:len(full) // 2 + 3]
    assert stop.strip(), full
    cut = client.completions.create(model=server.config.model, prompt=PROMPT, max_tokens=24, temperature=0,
                                    stop=[stop], extra_body={"ignore_eos": True})
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].text == full[:full.index(stop)]
    assert cut.usage.completion_tokens < 24
    assert cut.choices[0].text == generate(server.channel, prompt=PROMPT, max_tokens=24, ignore_eos=True,
                                           stop=[stop])[1]


def test_streamed_chat_renders_the_checkpoint_template(server, client):
    from transformers import AutoTokenizer

    rendered = AutoTokenizer.from_pretrained(server.config.model).apply_chat_template(
        MESSAGES, tokenize=False, add_generation_prompt=True)   # the oracle of our own rendering
    assert load_chat_template(server.config.model).render(MESSAGES) == rendered
    want = generate(server.channel, prompt=rendered, max_tokens=20, ignore_eos=True)[1]
    chunks = list(client.chat.completions.create(model=server.config.model, messages=MESSAGES, max_tokens=20,
                                                 temperature=0, stream=True, stream_options={"include_usage": True},
                                                 extra_body={"ignore_eos": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
    assert chunks[-1].usage.completion_tokens == 20 and chunks[-1].usage.prompt_tokens > 0
    whole = client.chat.completions.create(model=server.config.model, messages=MESSAGES, max_tokens=20,
                                           temperature=0, extra_body={"ignore_eos": True})
    assert whole.choices[0].message.content == want and whole.usage.completion_tokens == 20


def test_bad_fields_are_400_in_openai_shape_and_counted(server, client):
    before = _invalid(server)
    cases = {"temperature": dict(temperature=-1.0), "n": dict(n=2), "max_tokens": dict(max_tokens=0),
             "logprobs": dict(logprobs=2), "top_p": dict(top_p=1.5)}
    for field, bad in cases.items():
        with pytest.raises(openai.BadRequestError) as err:
            client.completions.create(model=server.config.model, prompt=PROMPT, **bad)
        assert err.value.status_code == 400
        assert err.value.body["type"] == "invalid_request_error" and err.value.body["param"] == field, err.value.body
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=server.config.model, prompt=PROMPT, extra_body={"no_such_field": 1})
    assert _invalid(server) == before + len(cases) + 1
    with pytest.raises(openai.NotFoundError) as err:
        client.completions.create(model="some-other-model", prompt=PROMPT)
    assert err.value.body["code"] == "model_not_found"
    status, body = _http(server, "/v1/completions", b"{not json")
    assert status == 400 and set(body["error"]) == {"message", "type", "param", "code"}


def test_chat_without_a_template_is_400(server, client, tmp_path):
    bare = tmp_path / "bare"
    shutil.copytree(server.config.model, bare)
    (bare / "tokenizer_config.json").write_text('{"bos_token": "<s>", "eos_token": "</s>"}')
    assert load_chat_template(bare) is None
    api = server.http.api
    kept, api.chat = api.chat, load_chat_template(bare)
    try:
        with pytest.raises(openai.BadRequestError, match="no chat template"):
            client.chat.completions.create(model=server.config.model, messages=MESSAGES, max_tokens=4)
    finally:
        api.chat = kept


def test_full_queue_is_429(server, client):
    """max_running=1, max_waiting=1: one long stream runs, a second waits, a third is refused."""
    kwargs = dict(model=server.config.model, prompt=PROMPT, max_tokens=3000, temperature=0, stream=True,
                  extra_body={"ignore_eos": True})
    running = client.completions.create(**kwargs)
    waiting: list = []
    try:
        next(iter(running))   # its first token: it is running
        # answered only once it runs (the server waits for the first token to choose the status)
        second = threading.Thread(target=lambda: waiting.append(client.completions.create(**kwargs)))
        second.start()
        deadline = time.monotonic() + 60
        while server.engine.counts() != (1, 1):
            assert time.monotonic() < deadline, server.engine.counts()
            time.sleep(0.01)
        with pytest.raises(openai.RateLimitError) as err:
            client.completions.create(model=server.config.model, prompt=PROMPT, max_tokens=4)
        assert err.value.status_code == 429 and err.value.body["code"] == "rate_limit_exceeded"
    finally:
        running.close()   # cancels it: the waiting one runs, and its stream is answered
    second.join(timeout=60)
    waiting[0].close()
    # closing the streams cancelled them: the queue serves again
    assert client.completions.create(model=server.config.model, prompt=PROMPT, max_tokens=2).usage.completion_tokens >= 1


# ChatML as Qwen's checkpoints write it: block tags on their own lines, so trim_blocks and
# lstrip_blocks decide the whitespace; loop controls, raise_exception and tojson as real templates use them
CHATML = """{%- for message in messages %}
    {%- if message['role'] not in ['system', 'user', 'assistant'] %}
        {{- raise_exception('unknown role ' + message['role']) }}
    {%- endif %}
    {%- if loop.first and message['role'] != 'system' %}
<|im_start|>system
You are helpful.<|im_end|>
    {% endif %}
<|im_start|>{{ message['role'] }}
{{ message['content'] }}<|im_end|>
    {% if message.get('name') %}{{ message['name'] | tojson }}{% endif %}
{% endfor %}
{%- if add_generation_prompt %}
<|im_start|>assistant
{% endif %}"""


def test_chat_templates_render_as_transformers_renders_them(tiny_models, tmp_path):
    from transformers import AutoTokenizer

    d = tmp_path / "chatml"
    shutil.copytree(tiny_models["mixtral"], d)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    (d / "tokenizer_config.json").write_text(json.dumps(cfg | {"chat_template": CHATML}))
    ours, theirs = load_chat_template(d), AutoTokenizer.from_pretrained(d)
    for messages in (MESSAGES, MESSAGES[1:], [{"role": "user", "content": "é 東京 \"q\"", "name": "ann"}]):
        assert ours.render(messages) == theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    with pytest.raises(ValueError, match="unknown role tool"):
        ours.render([{"role": "tool", "content": "x"}])


def test_api_key_is_required_when_configured(tiny_models, ray_local):
    """With --api-key, /v1 answers 401 in OpenAI's shape without it or with another key (the
    official client raises AuthenticationError), serves with it, and /health stays open."""
    with running_server(tiny_models["qwen3_moe"], workers=1, http_port=0, api_key="sesame") as s:
        base = f"http://127.0.0.1:{s.http_port}/v1"
        for key in ("wrong", "none"):
            with pytest.raises(openai.AuthenticationError) as err:
                openai.OpenAI(base_url=base, api_key=key, max_retries=0, timeout=60).completions.create(
                    model=s.config.model, prompt=PROMPT, max_tokens=2)
            assert err.value.status_code == 401 and err.value.code == "invalid_api_key"
        status, body = _http(s, "/v1/models")
        assert status == 401 and body["error"]["type"] == "authentication_error"
        assert _http(s, "/health")[0] == 200
        good = openai.OpenAI(base_url=base, api_key="sesame", max_retries=0, timeout=60)
        done = good.completions.create(model=s.config.model, prompt=PROMPT, max_tokens=3, temperature=0)
        assert done.usage.completion_tokens == 3
