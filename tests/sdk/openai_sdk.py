"""Drives a running aisix-agent with the official OpenAI Python SDK.

Started by tests/tests/sdk_compat.rs with AISIX_BASE_URL, AISIX_API_KEY (allowed every
model) and AISIX_NARROW_KEY (allowed gpt-4o-mini only). Exits non-zero on the first
failed check.
"""

import os

import openai

BASE = os.environ["AISIX_BASE_URL"] + "/v1"
KEY = os.environ["AISIX_API_KEY"]
NARROW = os.environ["AISIX_NARROW_KEY"]
MESSAGES = [{"role": "user", "content": "Say hello."}]
EXPECTED = "Hello from the mock provider."

checks = 0


def check(condition, what):
    global checks
    if not condition:
        raise SystemExit(f"FAILED: {what}")
    checks += 1


def expect_error(cls, status, kind, call):
    try:
        call()
    except cls as e:
        check(e.status_code == status, f"{cls.__name__} status {e.status_code} == {status}")
        check(e.type == kind, f"{cls.__name__} type {e.type!r} == {kind!r}")
        check(e.response.headers.get("x-aisix-request-id"), "error carries x-aisix-request-id")
        return
    raise SystemExit(f"FAILED: expected {cls.__name__}")


client = openai.OpenAI(base_url=BASE, api_key=KEY, max_retries=0)

ids = sorted(m.id for m in client.models.list())
check(ids == ["gpt-4o-mini", "restricted"], f"models.list() == {ids}")

raw = client.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=MESSAGES)
check(raw.headers.get("x-aisix-served-by") == "gpt-4o-mini", "x-aisix-served-by")
check(raw.headers.get("x-aisix-call-id"), "x-aisix-call-id")
completion = raw.parse()
check(completion.choices[0].message.content == EXPECTED, "non-streaming content")
check(completion.usage.total_tokens == 13, "usage")

stream = client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=True)
text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
check(text == EXPECTED, f"streamed content {text!r}")

bad = openai.OpenAI(base_url=BASE, api_key="not-a-key", max_retries=0)
expect_error(openai.AuthenticationError, 401, "invalid_api_key", lambda: bad.models.list())
expect_error(openai.NotFoundError, 404, "model_not_found",
             lambda: client.chat.completions.create(model="nope", messages=MESSAGES))
narrow = openai.OpenAI(base_url=BASE, api_key=NARROW, max_retries=0)
check([m.id for m in narrow.models.list()] == ["gpt-4o-mini"], "narrow key sees one model")
expect_error(openai.PermissionDeniedError, 403, "permission_denied",
             lambda: narrow.chat.completions.create(model="restricted", messages=MESSAGES))
expect_error(openai.BadRequestError, 400, "invalid_request_error",
             lambda: client.chat.completions.create(model="gpt-4o-mini", messages="not a list"))

print(f"openai-sdk: {checks} checks passed")
