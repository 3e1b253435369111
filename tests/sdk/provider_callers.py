"""The official OpenAI and Anthropic SDKs as callers of one provider's models through the
agent: chat completions, messages and the Responses API, whole and streamed, tool calls
and the tool-result turn, throttling, and embeddings where the provider has them.

Run by tests/tests/sdk_compat.rs once per provider, whose models are named
`{AISIX_PROVIDER}-chat`, `-tools` (the mock answers with a get_weather call), `-busy`
(the mock answers 429) and `-embed`; AISIX_RETRY_HINT is the Retry-After a throttled
call must carry (empty: any), AISIX_EMBEDDINGS says whether to try embeddings.
"""

import json
import os

import anthropic
import openai

from checks import BASE_URL, EXPECTED, KEY, MESSAGES, check, passed

oa = openai.OpenAI(base_url=f"{BASE_URL}/v1", api_key=KEY, max_retries=0)
an = anthropic.Anthropic(base_url=BASE_URL, api_key=KEY, max_retries=0)
PROVIDER = os.environ["AISIX_PROVIDER"]
CHAT, TOOLS, BUSY, EMBED = (f"{PROVIDER}-{kind}" for kind in ("chat", "tools", "busy", "embed"))
TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}}}}

answer = oa.chat.completions.create(model=CHAT, messages=MESSAGES)
check(answer.choices[0].message.content == EXPECTED, f"chat text {answer}")
check(answer.choices[0].finish_reason == "stop", "chat finish reason")
check(answer.usage.prompt_tokens == 10 and answer.usage.completion_tokens == 3, f"chat usage {answer.usage}")
stream = oa.chat.completions.create(model=CHAT, messages=MESSAGES, stream=True,
                                    stream_options={"include_usage": True})
chunks = list(stream)
text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
check(text == EXPECTED, f"streamed chat text {text!r}")
check(chunks[-1].usage and chunks[-1].usage.completion_tokens == 3, f"streamed usage {chunks[-1]}")

answer = oa.chat.completions.create(model=TOOLS, messages=MESSAGES, tools=[TOOL])
call = answer.choices[0].message.tool_calls[0]
check(call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}, f"tool call {call}")
check(answer.choices[0].finish_reason == "tool_calls", "tool finish reason")
turn = MESSAGES + [answer.choices[0].message.model_dump(exclude_none=True),
                   {"role": "tool", "tool_call_id": call.id, "content": "21C"}]
answer = oa.chat.completions.create(model=CHAT, messages=turn, tools=[TOOL])
check(answer.choices[0].message.content == EXPECTED, "tool-result turn")
stream = oa.chat.completions.create(model=TOOLS, messages=MESSAGES, tools=[TOOL], stream=True)
arguments = "".join(c.choices[0].delta.tool_calls[0].function.arguments or ""
                    for c in stream if c.choices and c.choices[0].delta.tool_calls)
check(json.loads(arguments) == {"city": "Paris"}, f"streamed tool arguments {arguments!r}")

message = an.messages.create(model=CHAT, max_tokens=64, messages=MESSAGES)
check(message.content[0].text == EXPECTED, f"message text {message}")
check(message.stop_reason == "end_turn", "message stop reason")
with an.messages.stream(model=CHAT, max_tokens=64, messages=MESSAGES) as stream:
    text = "".join(stream.text_stream)
    final = stream.get_final_message()
check(text == EXPECTED, f"streamed message text {text!r}")
check(final.usage.output_tokens == 3, f"streamed message usage {final.usage}")
tools = [{"name": "get_weather", "input_schema": {"type": "object"}}]
message = an.messages.create(model=TOOLS, max_tokens=64, messages=MESSAGES, tools=tools)
use = next(b for b in message.content if b.type == "tool_use")
check(use.name == "get_weather" and use.input == {"city": "Paris"}, f"tool use {use}")
check(message.stop_reason == "tool_use", "tool_use stop reason")
turn = MESSAGES + [{"role": "assistant", "content": [use.model_dump()]},
                   {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "21C"}]}]
message = an.messages.create(model=CHAT, max_tokens=64, messages=turn, tools=tools)
check(message.content[0].text == EXPECTED, "messages tool-result turn")
with an.messages.stream(model=TOOLS, max_tokens=64, messages=MESSAGES, tools=tools) as stream:
    final = stream.get_final_message()
use = next(b for b in final.content if b.type == "tool_use")
check(use.input == {"city": "Paris"}, f"streamed tool use {use}")

# The Responses API, bridged to Converse: whole, streamed, tools and the tool result.
response = oa.responses.create(model=CHAT, input="Say hello.", instructions="Be brief.")
check(response.output_text == EXPECTED, f"responses text {response}")
check(response.status == "completed" and response.usage.output_tokens == 3, f"responses status {response}")
with oa.responses.stream(model=CHAT, input="Say hello.") as stream:
    deltas = "".join(e.delta for e in stream if e.type == "response.output_text.delta")
    final = stream.get_final_response()
check(deltas == EXPECTED and final.output_text == EXPECTED, f"streamed responses {deltas!r} {final}")
response = oa.responses.create(model=TOOLS, input="Weather in Paris?",
                               tools=[{"type": "function", "name": "get_weather", "parameters": {"type": "object"}}])
call = next(item for item in response.output if item.type == "function_call")
check(call.name == "get_weather" and json.loads(call.arguments) == {"city": "Paris"}, f"responses call {call}")
response = oa.responses.create(model=CHAT, input=[
    {"role": "user", "content": "Weather in Paris?"},
    {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
    {"type": "function_call_output", "call_id": call.call_id, "output": "21C"}])
check(response.output_text == EXPECTED, "responses tool-result turn")
with oa.responses.stream(model=TOOLS, input="Weather in Paris?",
                         tools=[{"type": "function", "name": "get_weather", "parameters": {"type": "object"}}]) as stream:
    arguments = "".join(e.delta for e in stream if e.type == "response.function_call_arguments.delta")
    final = stream.get_final_response()
check(json.loads(arguments) == {"city": "Paris"}, f"streamed responses arguments {arguments!r}")
check(final.output[0].type == "function_call" and final.output[0].arguments == arguments, f"final {final}")
try:
    oa.responses.create(model=CHAT, input="Hi", previous_response_id="resp_1")
    check(False, "previous_response_id was accepted")
except openai.BadRequestError as e:
    check(e.body["param"] == "previous_response_id", f"stateless refusal {e.body}")

if os.environ.get("AISIX_EMBEDDINGS") == "1":
    # The SDK asks for base64 and decodes it itself.
    embedding = oa.embeddings.create(model=EMBED, input="Say hello.")
    vector = embedding.data[0].embedding
    check(len(vector) > 0 and all(-0.5 <= x <= 0.5 for x in vector), f"embedding {vector[:4]}")
    floats = oa.embeddings.create(model=EMBED, input="Say hello.", encoding_format="float").data[0].embedding
    check(len(floats) == len(vector) and all(abs(a - b) < 1e-6 for a, b in zip(floats, vector)), "base64 == float")

try:
    oa.chat.completions.create(model=BUSY, messages=MESSAGES)
    check(False, "a throttled call raised nothing")
except openai.RateLimitError as e:
    hint = os.environ.get("AISIX_RETRY_HINT")
    check(not hint or e.response.headers.get("retry-after") == hint, f"retry hint {e.response.headers}")

passed(f"{PROVIDER}-callers")
