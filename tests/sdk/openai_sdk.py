"""Drives a running aisix-agent with the official OpenAI Python SDK.

Started by tests/tests/sdk_compat.rs with AISIX_BASE_URL, AISIX_API_KEY (allowed every
model) and AISIX_NARROW_KEY (allowed gpt-4o-mini only). Exits non-zero on the first
failed check.
"""

import json

import openai

from checks import EXPECTED, KEY, MESSAGES, NARROW, BASE_URL, check, counting_http_client, passed, raises

BASE = BASE_URL + "/v1"


def expect_error(cls, status, kind, call):
    e = raises(cls, status, call)
    check(e.type == kind, f"{cls.__name__} type {e.type!r} == {kind!r}")
    return e


client = openai.OpenAI(base_url=BASE, api_key=KEY, max_retries=0)

ids = sorted(m.id for m in client.models.list())
check("gpt-4o-mini" in ids and "claude" in ids and len(ids) == 20, f"models.list() == {ids}")

raw = client.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=MESSAGES)
check(raw.headers.get("x-aisix-served-by") == "gpt-4o-mini", "x-aisix-served-by")
check(raw.headers.get("x-aisix-call-id"), "x-aisix-call-id")
completion = raw.parse()
check(completion.choices[0].message.content == EXPECTED, "non-streaming content")
check(completion.usage.total_tokens == 13, "usage")

stream = client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=True)
text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
check(text == EXPECTED, f"streamed content {text!r}")

# An Anthropic model through chat completions (translated both ways).
completion = client.chat.completions.create(model="claude", messages=MESSAGES)
check(completion.choices[0].message.content == EXPECTED, "claude content")
check(completion.choices[0].finish_reason == "stop", "claude finish_reason")
check(completion.usage.prompt_tokens == 10 and completion.usage.completion_tokens == 3, "claude usage")
stream = client.chat.completions.create(model="claude", messages=MESSAGES, stream=True,
                                        stream_options={"include_usage": True})
chunks = list(stream)
text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
check(text == EXPECTED, f"claude streamed content {text!r}")
check(chunks[-1].usage is not None and chunks[-1].usage.total_tokens == 13, "claude stream usage")

# Cached prompt tokens, native and translated, whole and streamed: a part of prompt_tokens.
for model in ["gpt-cached", "claude-cached"]:
    usage = client.chat.completions.create(model=model, messages=MESSAGES).usage
    check(usage.prompt_tokens == 2006 and usage.prompt_tokens_details.cached_tokens == 1920,
          f"{model}: cached tokens {usage}")
    chunks = list(client.chat.completions.create(model=model, messages=MESSAGES, stream=True,
                                                 stream_options={"include_usage": True}))
    usage = chunks[-1].usage
    check(usage.prompt_tokens == 2006 and usage.prompt_tokens_details.cached_tokens == 1920,
          f"{model}: streamed cached tokens {usage}")

# A stream cut after it began raises: native and translated, the SDK never takes a
# truncated answer for a whole one.
for model in ["cut", "claude-cut"]:
    got = []
    try:
        for c in client.chat.completions.create(model=model, messages=MESSAGES, stream=True):
            got.append(c.choices[0].delta.content or "" if c.choices else "")
        check(False, f"{model}: a cut stream raised nothing after {''.join(got)!r}")
    except openai.APIError as e:
        check(e.body.get("code") == "stream_cut", f"{model}: error event {e.body}")
        check(e.body.get("type") == "stream_error", f"{model}: error type {e.body}")
        check(0 < len("".join(got)) < len(EXPECTED), f"{model}: the text before the cut {got}")

# A resumable routing model continues a cut stream on its next target: the SDK sees one
# whole answer (native and translated).
for model in ["resumable", "claude-resumable"]:
    chunks = list(client.chat.completions.create(model=model, messages=MESSAGES, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    check(text == EXPECTED, f"{model}: the resumed stream {text!r}")
    check(len({c.id for c in chunks}) == 1, f"{model}: one answer id")
    check(chunks[-1].choices[0].finish_reason == "stop", f"{model}: finish_reason")

# A target whose first event is later than its stream_timeout is failed over before
# anything reached the caller: the backup's stream arrives whole.
for model, backup in [("first-byte", "gpt-4o-mini"), ("claude-first-byte", "claude")]:
    raw = client.chat.completions.with_raw_response.create(model=model, messages=MESSAGES, stream=True)
    check(raw.headers.get("x-aisix-served-by") == backup, f"{model}: served by {raw.headers.get('x-aisix-served-by')}")
    text = "".join(c.choices[0].delta.content or "" for c in raw.parse() if c.choices)
    check(text == EXPECTED, f"{model}: the backup's stream {text!r}")

# Tool calls, native and translated, whole and streamed.
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
ASK = [{"role": "user", "content": "Weather in Paris?"}]
for model in ["gpt-tools", "claude-tools"]:
    completion = client.chat.completions.create(model=model, messages=ASK, tools=TOOLS)
    choice = completion.choices[0]
    check(choice.finish_reason == "tool_calls", f"{model} finish_reason {choice.finish_reason}")
    call = choice.message.tool_calls[0]
    check(call.function.name == "get_weather", f"{model} tool name")
    check(json.loads(call.function.arguments) == {"city": "Paris"}, f"{model} tool arguments")
    stream = client.chat.completions.create(model=model, messages=ASK, tools=TOOLS, stream=True)
    arguments, name, finish = "", None, None
    for chunk in stream:
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        for tc in delta.tool_calls or []:
            name = tc.function.name or name
            arguments += tc.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    check(name == "get_weather" and json.loads(arguments) == {"city": "Paris"},
          f"{model} streamed tool call {name} {arguments!r}")
    check(finish == "tool_calls", f"{model} streamed finish_reason {finish}")
    # The tool result goes back in a second turn.
    follow = ASK + [choice.message.model_dump(exclude_none=True),
                    {"role": "tool", "tool_call_id": call.id, "content": "18C, sunny"}]
    answer = client.chat.completions.create(model={"gpt-tools": "gpt-4o-mini", "claude-tools": "claude"}[model],
                                            messages=follow, tools=TOOLS)
    check(answer.choices[0].message.content == EXPECTED, f"{model} answer after the tool result")

bad = openai.OpenAI(base_url=BASE, api_key="not-a-key", max_retries=0)
expect_error(openai.AuthenticationError, 401, "invalid_api_key", lambda: bad.models.list())

# Guardrails: a blocked prompt is a 422 content_filter; a masked answer, whole or
# streamed, arrives masked (native and translated).
GUARDED = "Hello from the [VENDOR_REDACTED]."
for model in ["guarded", "claude-guarded"]:
    e = expect_error(openai.UnprocessableEntityError, 422, "content_filter",
                     lambda: client.chat.completions.create(
                         model=model, messages=[{"role": "user", "content": "say forbidden-word"}]))
    check("no-secrets" in e.message and "say" not in e.message, f"{model}: block names the rule {e.message}")
    content = client.chat.completions.create(model=model, messages=MESSAGES).choices[0].message.content
    check(content == GUARDED, f"{model}: masked answer {content!r}")
    stream = client.chat.completions.create(model=model, messages=MESSAGES, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    check(text == GUARDED, f"{model}: masked stream {text!r}")
expect_error(openai.NotFoundError, 404, "model_not_found",
             lambda: client.chat.completions.create(model="nope", messages=MESSAGES))
narrow = openai.OpenAI(base_url=BASE, api_key=NARROW, max_retries=0)
check([m.id for m in narrow.models.list()] == ["gpt-4o-mini"], "narrow key sees one model")
expect_error(openai.PermissionDeniedError, 403, "permission_denied",
             lambda: narrow.chat.completions.create(model="restricted", messages=MESSAGES))
expect_error(openai.BadRequestError, 400, "invalid_request_error",
             lambda: client.chat.completions.create(model="gpt-4o-mini", messages="not a list"))

# Upstream errors: native fields kept, cross-provider ones as upstream_error; retry hints.
try:
    client.chat.completions.create(model="busy", messages=MESSAGES)
    raise SystemExit("FAILED: expected RateLimitError")
except openai.RateLimitError as e:
    check(e.status_code == 429 and e.type == "rate_limit_error", f"native 429 {e.type}")
    check(e.response.headers.get("retry-after") == "3", "upstream Retry-After passed through")
try:
    client.chat.completions.create(model="claude-busy", messages=MESSAGES)
    raise SystemExit("FAILED: expected RateLimitError")
except openai.RateLimitError as e:
    check(e.type == "upstream_error" and e.code == "rate_limit_exceeded", f"cross-provider 429 {e.type} {e.code}")
    check(e.response.headers.get("retry-after") == "3", "cross-provider Retry-After")
expect_error(openai.InternalServerError, 502, "upstream_error",
             lambda: client.chat.completions.create(model="broken", messages=MESSAGES))
try:
    client.chat.completions.create(model="broken", messages=MESSAGES)
except openai.InternalServerError as e:
    check("private upstream detail" not in e.response.text, "upstream 5xx body not exposed")

# The other OpenAI routes.
embeddings = client.embeddings.create(model="gpt-4o-mini", input=["a", "b"])
check(len(embeddings.data) == 2 and len(embeddings.data[0].embedding) > 0, "embeddings")
text = client.completions.create(model="gpt-4o-mini", prompt="Say").choices[0].text
check(text == EXPECTED, f"completions {text!r}")
response = client.responses.create(model="gpt-4o-mini", input="Say hello.")
check(response.output_text == EXPECTED, f"responses {response.output_text!r}")
check(response.usage.input_tokens == 10, "responses usage")
streamed = "".join(e.delta for e in client.responses.create(model="gpt-4o-mini", input="Say hello.", stream=True)
                   if e.type == "response.output_text.delta")
check(streamed == EXPECTED, f"streamed responses {streamed!r}")
image = client.images.generate(model="gpt-4o-mini", prompt="a fox", n=1)
check(image.data[0].b64_json == "bW9jaw==", "images")
speech = client.audio.speech.create(model="gpt-4o-mini", voice="alloy", input="hi")
check(speech.content == b"MOCK-AUDIO:hi", "audio speech")
transcript = client.audio.transcriptions.create(model="gpt-4o-mini", file=("hello.wav", b"RIFF-fake", "audio/wav"))
check(transcript.text == EXPECTED, f"audio transcription {transcript.text!r}")
expect_error(openai.APIStatusError, 501, "not_implemented",
             lambda: client.embeddings.create(model="claude", input="a"))

# With the SDK's own retries on: refusals that sending again cannot fix are sent once
# (x-should-retry: false), a 5xx the SDK retries as it should.
http, sent = counting_http_client()
retrying = openai.OpenAI(base_url=BASE, api_key=KEY, max_retries=2, http_client=http)
for what, call in [
    ("501", lambda: retrying.embeddings.create(model="claude", input="a")),
    ("403", lambda: openai.OpenAI(base_url=BASE, api_key=NARROW, max_retries=2, http_client=http)
        .chat.completions.create(model="claude", messages=MESSAGES)),
]:
    sent.clear()
    e = raises(openai.APIStatusError, int(what), call)
    check(e.response.headers.get("x-should-retry") == "false", f"{what}: x-should-retry false")
    check(len(sent) == 1, f"{what}: sent {len(sent)} times by a retrying SDK")
sent.clear()
raises(openai.InternalServerError, 502,
       lambda: retrying.chat.completions.create(model="broken", messages=MESSAGES))
check(len(sent) == 3, f"502: retried by the SDK ({len(sent)} requests)")

passed("openai-sdk")
