"""The shared LLM client against a real local HTTP server: retries, cache, validation, accounting, secrets."""

from __future__ import annotations

import base64
import io
import json
import logging
import threading
import time

import pytest
from PIL import Image

from mose_lightning.config import LLMClientConfig
from mose_lightning.llm import LLMClient, MissingAPIKeyError, user_message

try:
    from openai_server import OpenAIServer, PerKeyScript, Reply
except ImportError:  # tests/ imported as a package
    from tests.openai_server import OpenAIServer, PerKeyScript, Reply

KEY_ENV = "MOSE_TEST_LLM_KEY"
SECRET = "sk-test-DO-NOT-LEAK-4f9a8c"


@pytest.fixture(autouse=True)
def api_key(monkeypatch):
    monkeypatch.setenv(KEY_ENV, SECRET)


def make_cfg(server, tmp_path, **overrides) -> LLMClientConfig:
    values = dict(model="judge-x", base_url=server.url, api_key_env=KEY_ENV, max_concurrency=4, max_retries=2,
                  timeout_s=5.0, backoff_base_s=0.001, backoff_max_s=0.01, cache_dir=str(tmp_path / "cache"))
    values.update(overrides)
    return LLMClientConfig(**values)


def ask(marker: str):
    return [{"role": "system", "content": "grade"}, {"role": "user", "content": f"item {marker}"}]


def as_int(text: str) -> int:
    return int(text.strip())


def test_replies_usage_and_bearer_header(tmp_path):
    script = PerKeyScript({f"q{i}": [Reply.text(str(i), prompt_tokens=10 + i, completion_tokens=2)] for i in range(3)})
    with OpenAIServer(script) as server:
        client = LLMClient(make_cfg(server, tmp_path))
        results = client.run_many([ask(f"q{i}") for i in range(3)], validate=as_int)
        assert [r.parsed for r in results] == [0, 1, 2]
        assert all(r.ok and not r.cached and r.attempts == 1 for r in results)
        assert [r.prompt_tokens for r in results] == [10, 11, 12]
        assert client.stats.calls == 3 and client.stats.failures == 0
        assert client.stats.prompt_tokens == 33 and client.stats.completion_tokens == 6
        assert {r.headers["authorization"] for r in server.requests} == {f"Bearer {SECRET}"}
        body = server.requests[0].json
        assert body["model"] == "judge-x" and body["temperature"] == 0.0 and body["max_tokens"] == 512


def test_unparsable_is_reasked_then_counted_as_failure(tmp_path):
    script = PerKeyScript({"good": [Reply.text("4")], "bad": [Reply.text("no number here")]})
    with OpenAIServer(script) as server:
        client = LLMClient(make_cfg(server, tmp_path), parse_retries=2)
        good, bad = client.run_many([ask("good"), ask("bad")], validate=as_int)
        assert good.ok and good.parsed == 4
        assert not bad.ok and bad.parsed is None and bad.raw == "no number here"
        assert bad.attempts == 3 and "unparsable" in bad.error
        assert script.hits == {"good": 1, "bad": 3}
        s = client.stats
        assert (s.reasks, s.failures, s.failures_unparsable, s.calls) == (2, 1, 1, 4)
        # Usage of the unparsable replies was paid for, so it is counted.
        assert bad.prompt_tokens == 33 and s.prompt_tokens == 44
    # Only the validated reply is cached; the failure will be asked again on a rerun.
    assert len(list((tmp_path / "cache").rglob("*.json"))) == 1


def test_reask_bypasses_cache_and_rerun_is_free(tmp_path):
    script = PerKeyScript({"x": [Reply.text("garbled"), Reply.text("7")], "y": [Reply.text("3")]})
    with OpenAIServer(script) as server:
        cfg = make_cfg(server, tmp_path)
        first = LLMClient(cfg).run_many([ask("x"), ask("y")], validate=as_int)
        assert [r.parsed for r in first] == [7, 3] and first[0].attempts == 2
        n = server.n_requests
        assert n == 3
        again = LLMClient(cfg)
        second = again.run_many([ask("x"), ask("y")], validate=as_int)
        assert [r.parsed for r in second] == [7, 3]
        assert all(r.cached and r.attempts == 0 for r in second)
        assert server.n_requests == n
        assert again.stats.cache_hits == 2 and again.stats.calls == 0
    files = list((tmp_path / "cache").rglob("*.json"))
    assert len(files) == 2
    assert {json.loads(f.read_text())["reply"] for f in files} == {"7", "3"}


def test_cache_key_depends_on_model_and_settings(tmp_path):
    with OpenAIServer([Reply.text("1")]) as server:
        LLMClient(make_cfg(server, tmp_path)).run_many([ask("a")])
        LLMClient(make_cfg(server, tmp_path, model="other")).run_many([ask("a")])
        LLMClient(make_cfg(server, tmp_path, temperature=0.5)).run_many([ask("a")])
        LLMClient(make_cfg(server, tmp_path)).run_many([ask("a")])
        assert server.n_requests == 3


def test_429_honours_retry_after_capped_by_backoff_max(tmp_path):
    sleeps = []
    script = PerKeyScript({"r": [Reply.rate_limited(retry_after="30"), Reply.text("5")]})
    with OpenAIServer(script) as server:
        client = LLMClient(make_cfg(server, tmp_path, backoff_max_s=0.02), sleep=sleeps.append)
        (res,) = client.run_many([ask("r")], validate=as_int)
        assert res.ok and res.parsed == 5 and res.attempts == 2
        assert sleeps == [0.02]
        assert client.stats.retries == 1 and client.stats.calls == 2 and server.n_requests == 2


def test_5xx_retried_with_exponential_backoff_then_gives_up(tmp_path):
    sleeps = []
    script = PerKeyScript({"ok": [Reply.server_error(500), Reply.server_error(503), Reply.text("1")],
                           "down": [Reply.server_error(502)]})
    with OpenAIServer(script) as server:
        client = LLMClient(make_cfg(server, tmp_path, max_concurrency=1, backoff_base_s=0.001, backoff_max_s=1.0),
                           sleep=sleeps.append)
        ok, down = client.run_many([ask("ok"), ask("down")], validate=as_int)
        assert ok.ok and ok.attempts == 3
        assert not down.ok and down.attempts == 3 and "HTTP 502" in down.error
        assert client.stats.retries == 4 and client.stats.failures_transport == 1
    # Equal jitter: attempt k waits between half and all of base * 2**k.
    for k, wait in zip([0, 1, 0, 1], sleeps):
        assert 0.001 * 2 ** k / 2 <= wait <= 0.001 * 2 ** k


def test_other_4xx_not_retried(tmp_path):
    with OpenAIServer(PerKeyScript({"x": [Reply.client_error(400, "bad request shape")]})) as server:
        client = LLMClient(make_cfg(server, tmp_path))
        (res,) = client.run_many([ask("x")])
        assert not res.ok and res.attempts == 1 and "HTTP 400" in res.error
        assert server.n_requests == 1 and client.stats.retries == 0


def test_timeout_retried_then_succeeds_or_fails(tmp_path):
    script = PerKeyScript({"slow-once": [Reply.slow(1.5), Reply.text("2")], "always-slow": [Reply.slow(1.5)]})
    with OpenAIServer(script) as server:
        client = LLMClient(make_cfg(server, tmp_path, timeout_s=0.3, max_retries=1))
        once, always = client.run_many([ask("slow-once"), ask("always-slow")], validate=as_int)
        assert once.ok and once.parsed == 2 and once.attempts == 2
        assert not always.ok and always.attempts == 2 and "timed out" in always.error
        assert client.stats.retries == 2 and client.stats.failures == 1


def test_missing_api_key_fails_before_any_request(tmp_path, monkeypatch):
    monkeypatch.delenv(KEY_ENV)
    with OpenAIServer([Reply.text("1")]) as server:
        with pytest.raises(MissingAPIKeyError, match=KEY_ENV):
            LLMClient(make_cfg(server, tmp_path))
        assert server.n_requests == 0
    assert not (tmp_path / "cache").exists()


def test_concurrency_is_bounded(tmp_path):
    lock, state = threading.Lock(), {"now": 0, "max": 0}

    def script(request):
        with lock:
            state["now"] += 1
            state["max"] = max(state["max"], state["now"])
        time.sleep(0.15)
        with lock:
            state["now"] -= 1
        return Reply.text("1")

    with OpenAIServer(script) as server:
        client = LLMClient(make_cfg(server, tmp_path, max_concurrency=3, cache_dir=""))
        results = client.run_many([ask(f"c{i}") for i in range(7)], validate=as_int)
        assert all(r.ok for r in results)
    assert 2 <= state["max"] <= 3


def test_identical_requests_sent_once(tmp_path):
    with OpenAIServer([Reply.text("9")]) as server:
        client = LLMClient(make_cfg(server, tmp_path))
        results = client.run_many([ask("same"), ask("same"), ask("same")], validate=as_int)
        assert [r.parsed for r in results] == [9, 9, 9]
        assert server.n_requests == 1 and client.stats.cache_hits == 2


def test_images_sent_as_data_urls(tmp_path):
    img = Image.new("RGB", (8, 6), (200, 30, 30))
    with OpenAIServer([Reply.text("ok")]) as server:
        LLMClient(make_cfg(server, tmp_path)).run_many([[user_message("look", [img, img])]])
        content = server.requests[0].json["messages"][0]["content"]
    assert content[0] == {"type": "text", "text": "look"}
    urls = [part["image_url"]["url"] for part in content[1:]]
    assert len(urls) == 2 and all(u.startswith("data:image/jpeg;base64,") for u in urls)
    decoded = Image.open(io.BytesIO(base64.b64decode(urls[0].split(",", 1)[1])))
    assert decoded.size == (8, 6)


def test_api_key_never_in_results_logs_or_cache(tmp_path, caplog, capsys):
    caplog.set_level(logging.DEBUG)
    # A hostile server echoing the key back in its error text must not get it into our outputs either.
    script = PerKeyScript({
        "echo": [Reply.client_error(401, f"Incorrect API key provided: {SECRET}")],
        "limited": [Reply.rate_limited("0"), Reply.text("1")],
        "junk": [Reply.text("junk")],
        "good": [Reply.text("2")],
    })
    with OpenAIServer(script) as server:
        client = LLMClient(make_cfg(server, tmp_path), progress=True)
        results = client.run_many([ask(m) for m in ("echo", "limited", "junk", "good")], validate=as_int)
        assert [r.ok for r in results] == [False, True, False, True]
        out = tmp_path / "results.json"
        out.write_text(json.dumps([r.__dict__ for r in results]) + json.dumps(client.stats.to_dict()))
    assert "[redacted]" in results[0].error
    captured = capsys.readouterr()
    texts = [caplog.text, captured.out, captured.err, repr(results), out.read_text()]
    texts += [p.read_text() for p in (tmp_path / "cache").rglob("*") if p.is_file()]
    assert all(SECRET not in t for t in texts)
