"""Drives a running aisix-agent with the official Anthropic Python SDK.

Started by tests/tests/sdk_compat.rs with AISIX_BASE_URL, AISIX_API_KEY (allowed every
model) and AISIX_NARROW_KEY (allowed gpt-4o-mini only). `claude*` models are served by
an Anthropic upstream (native), `gpt*` ones by an OpenAI-compatible one (translated).
Exits non-zero on the first failed check.
"""

import anthropic

from checks import EXPECTED, KEY, MESSAGES, NARROW, check, counting_http_client, passed, raises
from checks import BASE_URL as BASE

TOOLS = [{"name": "get_weather", "description": "Current weather",
          "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}]
ASK = [{"role": "user", "content": "Weather in Paris?"}]


def expect_error(cls, status, kind, call):
    e = raises(cls, status, call)
    check(e.body["type"] == "error", f"{cls.__name__} envelope {e.body}")
    check(e.body["error"]["type"] == kind, f"{cls.__name__} type {e.body['error']['type']!r} == {kind!r}")
    return e


client = anthropic.Anthropic(base_url=BASE, api_key=KEY, max_retries=0)

# Cached prompt tokens, native and translated, whole and streamed: apart from input_tokens.
for model in ["claude-cached", "gpt-cached"]:
    usage = client.messages.create(model=model, max_tokens=64, messages=MESSAGES).usage
    check(usage.input_tokens == 86 and usage.cache_read_input_tokens == 1920, f"{model}: cached tokens {usage}")
    with client.messages.stream(model=model, max_tokens=64, messages=MESSAGES) as stream:
        usage = stream.get_final_message().usage
    check(usage.input_tokens == 86 and usage.cache_read_input_tokens == 1920,
          f"{model}: streamed cached tokens {usage}")

# A stream cut after it began raises (native and translated), with the gateway's error
# event; it never ends as if the answer were whole.
for model in ["claude-cut", "cut"]:
    got = []
    try:
        with client.messages.stream(model=model, max_tokens=64, messages=MESSAGES) as stream:
            for text in stream.text_stream:
                got.append(text)
        check(False, f"{model}: a cut stream raised nothing after {''.join(got)!r}")
    except anthropic.APIStatusError as e:
        check(e.body["type"] == "error" and e.body["error"]["type"] == "api_error", f"{model}: error event {e.body}")
        check("broke off" in e.body["error"]["message"], f"{model}: error message {e.body}")
        check(0 < len("".join(got)) < len(EXPECTED), f"{model}: the text before the cut {got}")

# A resumable routing model continues a cut stream on its next target: one whole message.
for model in ["claude-resumable", "resumable"]:
    with client.messages.stream(model=model, max_tokens=64, messages=MESSAGES) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    check(text == EXPECTED, f"{model}: the resumed stream {text!r}")
    check(final.stop_reason == "end_turn" and len(final.content) == 1, f"{model}: one message {final}")

# A first event later than the target's stream_timeout fails over before the first
# byte: the backup's stream arrives whole.
for model in ["claude-first-byte", "first-byte"]:
    with client.messages.stream(model=model, max_tokens=64, messages=MESSAGES) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    check(text == EXPECTED, f"{model}: the backup's stream {text!r}")
    check(final.stop_reason == "end_turn", f"{model}: stop_reason {final.stop_reason}")

for model in ["claude", "gpt-4o-mini"]:
    raw = client.messages.with_raw_response.create(model=model, max_tokens=64, system="Be brief.",
                                                   messages=MESSAGES)
    check(raw.headers.get("x-aisix-request-id"), f"{model}: x-aisix-request-id")
    message = raw.parse()
    check(message.content[0].type == "text" and message.content[0].text == EXPECTED, f"{model}: content")
    check(message.stop_reason == "end_turn", f"{model}: stop_reason {message.stop_reason}")
    check(message.usage.input_tokens == 10 and message.usage.output_tokens == 3, f"{model}: usage {message.usage}")

    with client.messages.stream(model=model, max_tokens=64, messages=MESSAGES) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    check(text == EXPECTED, f"{model}: streamed text {text!r}")
    check(final.stop_reason == "end_turn", f"{model}: streamed stop_reason {final.stop_reason}")
    check(final.usage.output_tokens == 3, f"{model}: streamed usage {final.usage}")

for model in ["claude-tools", "gpt-tools"]:
    message = client.messages.create(model=model, max_tokens=64, tools=TOOLS, messages=ASK)
    check(message.stop_reason == "tool_use", f"{model}: stop_reason {message.stop_reason}")
    use = message.content[-1]
    check(use.type == "tool_use" and use.name == "get_weather", f"{model}: tool_use block")
    check(use.input == {"city": "Paris"}, f"{model}: tool input {use.input}")
    with client.messages.stream(model=model, max_tokens=64, tools=TOOLS, messages=ASK) as stream:
        final = stream.get_final_message()
    streamed = [b for b in final.content if b.type == "tool_use"]
    check(streamed and streamed[0].input == {"city": "Paris"}, f"{model}: streamed tool input {final.content}")
    check(final.stop_reason == "tool_use", f"{model}: streamed stop_reason")
    follow = ASK + [{"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in message.content]},
                    {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "18C"}]}]
    answer = client.messages.create(model={"claude-tools": "claude", "gpt-tools": "gpt-4o-mini"}[model],
                                    max_tokens=64, tools=TOOLS, messages=follow)
    check(answer.content[0].text == EXPECTED, f"{model}: answer after the tool result")

count = client.messages.count_tokens(model="claude", messages=MESSAGES)
check(count.input_tokens == 10, f"count_tokens {count.input_tokens}")

bad = anthropic.Anthropic(base_url=BASE, api_key="not-a-key", max_retries=0)
expect_error(anthropic.AuthenticationError, 401, "authentication_error",
             lambda: bad.messages.create(model="claude", max_tokens=5, messages=MESSAGES))
expect_error(anthropic.NotFoundError, 404, "not_found_error",
             lambda: client.messages.create(model="nope", max_tokens=5, messages=MESSAGES))
narrow = anthropic.Anthropic(base_url=BASE, api_key=NARROW, max_retries=0)
expect_error(anthropic.PermissionDeniedError, 403, "permission_error",
             lambda: narrow.messages.create(model="claude", max_tokens=5, messages=MESSAGES))
expect_error(anthropic.BadRequestError, 400, "invalid_request_error",
             lambda: client.messages.create(model="claude", max_tokens=5, messages="not a list"))

# Guardrails: a blocked prompt is a 422 in Anthropic's envelope; a masked answer, whole
# or streamed, arrives masked (native and translated).
GUARDED = "Hello from the [VENDOR_REDACTED]."
for model in ["claude-guarded", "guarded"]:
    e = expect_error(anthropic.UnprocessableEntityError, 422, "invalid_request_error",
                     lambda: client.messages.create(model=model, max_tokens=5,
                                                    messages=[{"role": "user", "content": "say forbidden-word"}]))
    check("no-secrets" in e.message, f"{model}: block names the rule {e.message}")
    message = client.messages.create(model=model, max_tokens=50, messages=MESSAGES)
    check(message.content[0].text == GUARDED, f"{model}: masked answer {message.content}")
    with client.messages.stream(model=model, max_tokens=50, messages=MESSAGES) as stream:
        text = "".join(stream.text_stream)
    check(text == GUARDED, f"{model}: masked stream {text!r}")
for model in ["claude-busy", "busy"]:
    e = expect_error(anthropic.RateLimitError, 429, "rate_limit_error",
                     lambda: client.messages.create(model=model, max_tokens=5, messages=MESSAGES))
    check(e.response.headers.get("retry-after") == "3", f"{model}: upstream Retry-After passed through")
e = expect_error(anthropic.InternalServerError, 502, "api_error",
                 lambda: client.messages.create(model="broken", max_tokens=5, messages=MESSAGES))
check("private upstream detail" not in e.response.text, "upstream 5xx body not exposed")
expect_error(anthropic.APIStatusError, 501, "api_error",
             lambda: client.messages.count_tokens(model="gpt-4o-mini", messages=MESSAGES))

# With the SDK's own retries on, a 501 is sent once (x-should-retry: false).
http, sent = counting_http_client()
retrying = anthropic.Anthropic(base_url=BASE, api_key=KEY, max_retries=2, http_client=http)
e = raises(anthropic.APIStatusError, 501,
           lambda: retrying.messages.count_tokens(model="gpt-4o-mini", messages=MESSAGES))
check(e.response.headers.get("x-should-retry") == "false", "501: x-should-retry false")
check(len(sent) == 1, f"501: sent {len(sent)} times by a retrying SDK")

passed("anthropic-sdk")
