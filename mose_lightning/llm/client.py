"""The one OpenAI-compatible chat client of the framework (LLM judge and GPT skill annotator).

Concurrency, retries, caching and failure accounting live here once, so every caller pays for a reply at most
once and reports the same numbers:

- The API key comes from the environment variable named by `api_key_env` and is checked when the client is
  built, so a missing key stops a run before any request or cache work. The key never reaches a log, a cache
  file, a `Result` or an exception message (error texts are scrubbed).
- Transport retries (HTTP 408/429/5xx, timeouts, connection errors) use exponential backoff with jitter, or the
  server's Retry-After when given, both capped at `backoff_max_s`. Other 4xx are the caller's fault: no retry.
  The openai package's own retries are off (`max_retries=0`) so backoff and counting are ours.
- Replies are checked by a `validate(text) -> parsed` callback; one that raises is asked again (bypassing the
  cache) `parse_retries` times, then the request counts as failed. A failure never aborts the batch.
- A request that cannot reach the server (connection refused, timeouts) after every retry marks the endpoint
  unreachable (`LLMClient.unreachable`, a scrubbed reason); with `stop_when_unreachable` the requests not yet sent
  then fail at once instead of each waiting through its own retries.
- Only replies that passed validation are cached: one JSON file per sha256 of (model, temperature, max_tokens,
  messages), written atomically. A rerun or resumed run reads them back without a request; failures are retried.
"""

from __future__ import annotations

import base64
import email.utils
import hashlib
import io
import json
import logging
import os
import random
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from mose_lightning.config import ConfigError, LLMClientConfig, resolve_path
from mose_lightning.io import atomic_write_json

log = logging.getLogger(__name__)

Messages = List[Dict[str, Any]]
Validator = Callable[[str], Any]

# Batches at least this long show a progress bar unless the caller decides.
PROGRESS_MIN_REQUESTS = 16
# Error texts kept in results and logs; long server bodies add nothing.
MAX_ERROR_CHARS = 300
CACHE_FORMAT = 1


class MissingAPIKeyError(ConfigError):
    """The environment variable that should hold the API key is unset or empty."""


class _Unretryable(Exception):
    """A transport error that retrying cannot fix (4xx other than 408/429, or retries exhausted)."""

    def __init__(self, message: str, calls: int = 0, unreachable: bool = False) -> None:
        super().__init__(message)
        self.calls = calls
        self.unreachable = unreachable


@dataclass
class Result:
    """Outcome of one request. `error` is scrubbed of secrets; `attempts` counts HTTP calls (0 for a cache hit)."""

    ok: bool
    parsed: Any = None
    raw: Optional[str] = None
    error: Optional[str] = None
    cached: bool = False
    attempts: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass
class ClientStats:
    """Running totals over every batch a client has served."""

    requests: int = 0
    # HTTP calls actually sent (each transport retry and each re-ask is one more).
    calls: int = 0
    cache_hits: int = 0
    # Transport retries (429, 5xx, timeouts, connection errors).
    retries: int = 0
    # Re-asks after a reply failed validation.
    reasks: int = 0
    failures: int = 0
    failures_unparsable: int = 0
    failures_transport: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def to_dict(self) -> Dict[str, int]:
        return asdict(self)


def image_data_url(image: Any, fmt: str = "JPEG", quality: int = 90) -> str:
    """A PIL image as a base64 data URL (deterministic bytes, so cache keys of image prompts are stable)."""
    buf = io.BytesIO()
    img = image.convert("RGB") if fmt.upper() == "JPEG" and image.mode != "RGB" else image
    params = {"quality": quality} if fmt.upper() == "JPEG" else {}
    img.save(buf, format=fmt, **params)
    mime = "jpeg" if fmt.upper() == "JPEG" else fmt.lower()
    return f"data:image/{mime};base64,{base64.b64encode(buf.getvalue()).decode('ascii')}"


def user_message(text: str, images: Sequence[Any] = (), detail: str = "auto") -> Dict[str, Any]:
    """A user turn; with images it becomes the multimodal content list (text first, then images in view order)."""
    if not images:
        return {"role": "user", "content": text}
    content: List[Dict[str, Any]] = [{"type": "text", "text": text}]
    for img in images:
        content.append({"type": "image_url", "image_url": {"url": image_data_url(img), "detail": detail}})
    return {"role": "user", "content": content}


def cache_key(model: str, temperature: float, max_tokens: int, messages: Messages) -> str:
    blob = json.dumps(
        {"model": model, "temperature": float(temperature), "max_tokens": int(max_tokens), "messages": messages},
        sort_keys=True,
        ensure_ascii=False,
        separators=(",", ":"),
    )
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def _retry_after_s(headers: Any) -> Optional[float]:
    """Seconds the server asked us to wait (retry-after-ms, or Retry-After as seconds or an HTTP date)."""
    if headers is None:
        return None
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            return max(0.0, float(ms) / 1000.0)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None  # an unreadable hint falls back to our own backoff
    return max(0.0, when.timestamp() - time.time()) if when is not None else None


class LLMClient:
    """Chat completions with bounded concurrency, retries, an on-disk cache and validation.

    `parse_retries`: times a reply that fails `validate` is asked again before the request counts as failed.
    `sleep` is injectable so backoff can be observed in tests without waiting.
    """

    def __init__(
        self,
        cfg: LLMClientConfig,
        *,
        parse_retries: int = 2,
        progress: Optional[bool] = None,
        sleep: Callable[[float], None] = time.sleep,
        stop_when_unreachable: bool = False,
    ):
        key = os.environ.get(cfg.api_key_env, "")
        if not key.strip():
            raise MissingAPIKeyError(
                f"environment variable {cfg.api_key_env} is not set (named by the client config key `api_key_env`); "
                f"expected the API key for {cfg.base_url or 'the OpenAI API'}. For a local server without "
                f"authentication set it to any placeholder, e.g. {cfg.api_key_env}=EMPTY"
            )
        if cfg.max_concurrency < 1:
            raise ConfigError(f"client.max_concurrency: expected >= 1, got {cfg.max_concurrency}")
        if cfg.max_retries < 0 or parse_retries < 0:
            raise ConfigError("client.max_retries and parse_retries: expected >= 0")
        self.cfg = cfg
        self.parse_retries = int(parse_retries)
        self.progress = progress
        self.stats = ClientStats()
        # Why the endpoint could not be reached, once a request gave up on it (None: reachable so far).
        self.unreachable: Optional[str] = None
        self.stop_when_unreachable = stop_when_unreachable
        self._secret = key
        self._sleep = sleep
        self._lock = threading.Lock()
        self._cache_dir: Optional[Path] = Path(resolve_path(cfg.cache_dir)) if cfg.cache_dir else None
        # Imported here so that modules importing this one (rules annotator, report code) work without openai.
        import openai

        self._openai = openai
        self._client = openai.OpenAI(
            base_url=cfg.base_url, api_key=key, timeout=cfg.timeout_s, max_retries=0
        )

    # -- public ----------------------------------------------------------------------------------------------------
    def run_many(
        self,
        requests: Sequence[Messages],
        validate: Optional[Validator] = None,
        *,
        desc: str = "llm",
        progress: Optional[bool] = None,
    ) -> List[Result]:
        """One `Result` per request, in request order. Identical requests in a batch are sent once."""
        validate = validate or _non_empty
        keys = [self.key_for(m) for m in requests]
        first_of: Dict[str, int] = {}
        for i, k in enumerate(keys):
            first_of.setdefault(k, i)
        unique = sorted(first_of.values())
        with self._lock:
            self.stats.requests += len(requests)

        results: Dict[int, Result] = {}
        show = progress if progress is not None else self.progress
        if show is None:
            show = len(requests) >= PROGRESS_MIN_REQUESTS
        bar = _progress_bar(len(unique), desc, show)
        try:
            if self.cfg.max_concurrency == 1 or len(unique) == 1:
                for i in unique:
                    results[i] = self._guarded(requests[i], keys[i], validate)
                    bar.update(1)
            else:
                with ThreadPoolExecutor(max_workers=min(self.cfg.max_concurrency, len(unique))) as pool:
                    futures = {pool.submit(self._guarded, requests[i], keys[i], validate): i for i in unique}
                    for fut in as_completed(futures):
                        results[futures[fut]] = fut.result()
                        bar.update(1)
        finally:
            bar.close()

        out: List[Result] = []
        for i, k in enumerate(keys):
            first = first_of[k]
            if i == first:
                out.append(results[i])
                continue
            # A duplicate shares the first copy's reply at no cost.
            res = results[first]
            dup = Result(res.ok, res.parsed, res.raw, res.error, cached=res.ok, attempts=0)
            with self._lock:
                if res.ok:
                    self.stats.cache_hits += 1
                else:
                    self.stats.failures += 1
            out.append(dup)
        return out

    def run_one(self, messages: Messages, validate: Optional[Validator] = None) -> Result:
        return self.run_many([messages], validate, progress=False)[0]

    def key_for(self, messages: Messages) -> str:
        return cache_key(self.cfg.model, self.cfg.temperature, self.cfg.max_tokens, messages)

    def scrub(self, text: str) -> str:
        """Remove the key (and anything shaped like a bearer token) from a text meant for logs or results."""
        if self._secret:
            text = text.replace(self._secret, "[redacted]")
        text = re.sub(r"(?i)bearer\s+\S+", "Bearer [redacted]", text)
        text = re.sub(r"sk-[A-Za-z0-9_\-]{6,}", "sk-[redacted]", text)
        return text if len(text) <= MAX_ERROR_CHARS else text[: MAX_ERROR_CHARS - 3] + "..."

    # -- one request -----------------------------------------------------------------------------------------------
    def _guarded(self, messages: Messages, key: str, validate: Validator) -> Result:
        try:
            return self._one(messages, key, validate)
        except Exception as err:  # a bug or odd reply must cost one sample, not the batch
            msg = self.scrub(f"{type(err).__name__}: {err}")
            log.warning("llm request %s failed unexpectedly: %s", key[:12], msg)
            with self._lock:
                self.stats.failures += 1
                self.stats.failures_transport += 1
            return Result(False, error=msg)

    def _one(self, messages: Messages, key: str, validate: Validator) -> Result:
        cached = self._cache_read(key)
        if cached is not None:
            try:
                parsed = validate(cached["reply"])
            except Exception as err:
                # A cache written under an older validator: ask again rather than trust it.
                log.info("cached reply %s no longer validates (%s); asking again", key[:12], self.scrub(str(err)))
            else:
                with self._lock:
                    self.stats.cache_hits += 1
                return Result(True, parsed, cached["reply"], cached=True)

        res = Result(False)
        last_parse_error = ""
        for ask in range(self.parse_retries + 1):
            if ask:
                with self._lock:
                    self.stats.reasks += 1
            try:
                if self.stop_when_unreachable and self.unreachable is not None:
                    raise _Unretryable(f"not sent: the endpoint is unreachable ({self.unreachable})")
                text, usage, calls = self._call(messages, key)
            except _Unretryable as err:
                res.error = str(err)
                res.attempts += err.calls
                with self._lock:
                    self.stats.failures += 1
                    self.stats.failures_transport += 1
                    if err.unreachable and self.unreachable is None:
                        self.unreachable = str(err)
                return res
            res.attempts += calls
            res.prompt_tokens += usage[0]
            res.completion_tokens += usage[1]
            res.raw = text
            try:
                parsed = validate(text)
            except Exception as err:
                last_parse_error = self.scrub(f"{type(err).__name__}: {err}")
                log.info("reply %s did not validate (ask %d of %d): %s", key[:12], ask + 1, self.parse_retries + 1,
                         last_parse_error)
                continue
            self._cache_write(key, text, usage)
            res.ok, res.parsed = True, parsed
            return res
        res.error = f"unparsable reply after {self.parse_retries + 1} asks: {last_parse_error}"
        with self._lock:
            self.stats.failures += 1
            self.stats.failures_unparsable += 1
        return res

    def _call(self, messages: Messages, key: str) -> Tuple[str, Tuple[int, int], int]:
        """One reply with transport retries; returns (text, (prompt, completion) tokens, HTTP calls made)."""
        oa = self._openai
        calls = 0
        for attempt in range(self.cfg.max_retries + 1):
            calls += 1
            with self._lock:
                self.stats.calls += 1
            try:
                resp = self._client.chat.completions.create(
                    model=self.cfg.model,
                    messages=messages,
                    temperature=self.cfg.temperature,
                    max_tokens=self.cfg.max_tokens,
                )
            except oa.APIStatusError as err:
                status = err.status_code
                retryable = status in (408, 429) or status >= 500
                reason = f"HTTP {status}: {err.message}"
                wait_hint = _retry_after_s(getattr(err.response, "headers", None))
                unreachable = False
            except oa.APITimeoutError:
                retryable, reason, wait_hint = True, f"timed out after {self.cfg.timeout_s} s", None
                unreachable = True
            except oa.APIConnectionError as err:
                cause = f" ({err.__cause__})" if err.__cause__ is not None else ""
                retryable, reason, wait_hint = True, f"connection error: {err.message}{cause}", None
                unreachable = True
            else:
                text = ""
                if resp.choices:
                    text = resp.choices[0].message.content or ""
                usage = resp.usage
                tokens = (int(getattr(usage, "prompt_tokens", 0) or 0), int(getattr(usage, "completion_tokens", 0) or 0))
                with self._lock:
                    self.stats.prompt_tokens += tokens[0]
                    self.stats.completion_tokens += tokens[1]
                return text, tokens, calls

            reason = self.scrub(reason)
            if not retryable or attempt == self.cfg.max_retries:
                suffix = f" after {calls} calls" if retryable else ""
                raise _Unretryable(f"{reason}{suffix}", calls, unreachable)
            delay = self._backoff(attempt, wait_hint)
            with self._lock:
                self.stats.retries += 1
            log.warning("llm request %s: %s; retry %d of %d in %.2f s", key[:12], reason, attempt + 1,
                        self.cfg.max_retries, delay)
            self._sleep(delay)
        raise AssertionError("unreachable")

    def _backoff(self, attempt: int, retry_after: Optional[float]) -> float:
        cap = self.cfg.backoff_max_s
        if retry_after is not None:
            return min(retry_after, cap)
        # Equal jitter: half the exponential step fixed, half random, so parallel workers spread out.
        step = min(cap, self.cfg.backoff_base_s * (2 ** attempt))
        return step / 2 + random.uniform(0, step / 2)

    # -- cache -----------------------------------------------------------------------------------------------------
    def _cache_path(self, key: str) -> Optional[Path]:
        if self._cache_dir is None:
            return None
        return self._cache_dir / key[:2] / f"{key}.json"

    def _cache_read(self, key: str) -> Optional[dict]:
        path = self._cache_path(key)
        if path is None or not path.is_file():
            return None
        try:
            data = json.loads(path.read_text())
            if data.get("key") != key or not isinstance(data.get("reply"), str):
                raise ValueError("unexpected content")
            return data
        except (OSError, ValueError) as err:
            log.warning("ignoring unreadable llm cache file %s (%s)", path, err)
            return None

    def _cache_write(self, key: str, text: str, usage: Tuple[int, int]) -> None:
        path = self._cache_path(key)
        if path is None:
            return
        # Messages are not stored: the key identifies them, and image prompts would make files large.
        atomic_write_json(
            path,
            {
                "format": CACHE_FORMAT,
                "key": key,
                "model": self.cfg.model,
                "temperature": self.cfg.temperature,
                "max_tokens": self.cfg.max_tokens,
                "reply": text,
                "usage": {"prompt_tokens": usage[0], "completion_tokens": usage[1]},
            },
        )


def _non_empty(text: str) -> str:
    if not text or not text.strip():
        raise ValueError("empty reply")
    return text


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def _progress_bar(total: int, desc: str, show: bool):
    if not show:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, leave=False)
