"""Check counting shared by the SDK scripts: the first failed check exits non-zero."""

import os

BASE_URL = os.environ["AISIX_BASE_URL"]
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


def raises(cls, status, call):
    """Runs `call`, which must raise `cls` with `status` and x-aisix-request-id."""
    try:
        call()
    except cls as e:
        check(e.status_code == status, f"{cls.__name__} status {e.status_code} == {status}")
        check(e.response.headers.get("x-aisix-request-id"), "error carries x-aisix-request-id")
        return e
    raise SystemExit(f"FAILED: expected {cls.__name__}")


def passed(sdk):
    print(f"{sdk}: {checks} checks passed")


def counting_http_client():
    """An httpx2 client (what these SDKs use) that counts the requests it sends (retries included)."""
    import httpx2

    sent = []
    client = httpx2.Client(event_hooks={"request": [lambda request: sent.append(request.url.path)]})
    return client, sent
