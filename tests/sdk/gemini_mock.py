"""Google's own Gen AI SDK (google-genai) against cloud-mock's Gemini mock.

Started by tests/tests/sdk_compat.rs with AISIX_BASE_URL pointing at the mock: the SDK
builds the paths, the key header and reads the answers and the event stream itself,
so the mock is checked against Google's library, not against our adapter.
"""

from google import genai
from google.genai import types

from checks import BASE_URL, EXPECTED, check, passed

client = genai.Client(api_key="gemini-sdk-key",
                      http_options=types.HttpOptions(base_url=BASE_URL, api_version="v1beta"))

answer = client.models.generate_content(model="gemini-sdk", contents="Say hello.")
check(answer.text == EXPECTED, f"generate_content text {answer.text!r}")
check(answer.candidates[0].finish_reason == types.FinishReason.STOP, "finish reason")
check(answer.usage_metadata.prompt_token_count == 10, f"usage {answer.usage_metadata}")
check(answer.usage_metadata.candidates_token_count == 3, "candidates tokens")

chunks = list(client.models.generate_content_stream(model="gemini-sdk", contents="Say hello."))
text = "".join(c.text or "" for c in chunks)
check(text == EXPECTED, f"streamed text {text!r}")
check(chunks[-1].candidates[0].finish_reason == types.FinishReason.STOP, "streamed finish reason")

answer = client.models.generate_content(model="gemini-sdk-tools", contents="Weather in Paris?")
call = answer.function_calls[0]
check(call.name == "get_weather" and call.args == {"city": "Paris"}, f"function call {call}")

answer = client.models.generate_content(model="gemini-sdk-safety", contents="Say hello.")
check(answer.candidates[0].finish_reason == types.FinishReason.SAFETY, "a safety stop")

try:
    client.models.generate_content(model="gemini-sdk-busy", contents="Say hello.")
    check(False, "a 429 raised nothing")
except genai.errors.ClientError as e:
    check(e.code == 429 and e.status == "RESOURCE_EXHAUSTED", f"throttled {e.code} {e.status}")

passed("gemini-mock")
