"""AWS's own botocore (the library under boto3) against cloud-mock's Bedrock mock.

Started by tests/tests/sdk_compat.rs with AISIX_BASE_URL pointing at the mock: botocore
builds the Converse paths, signs with Signature V4 (so the mock's verifier is checked
against AWS's signer), and parses the answers, the binary event stream and the errors
itself, so the mock is checked against AWS's library, not against our adapter.
"""

import json
import os

import botocore.session
from botocore.config import Config
from botocore.exceptions import ClientError, EventStreamError

from checks import BASE_URL, EXPECTED, check, passed

ACCESS_KEY_ID = os.environ["AISIX_AWS_ACCESS_KEY_ID"]
SECRET = os.environ["AISIX_AWS_SECRET_ACCESS_KEY"]
session = botocore.session.get_session()


def client(secret, token=None):
    return session.create_client(
        "bedrock-runtime", region_name="eu-central-1", endpoint_url=BASE_URL,
        aws_access_key_id=ACCESS_KEY_ID, aws_secret_access_key=secret, aws_session_token=token,
        config=Config(retries={"max_attempts": 1}))


bedrock = client(SECRET)
MESSAGES = [{"role": "user", "content": [{"text": "Say hello."}]}]
MODEL = "anthropic.claude-sdk-v1:0"
TOOLS = {"tools": [{"toolSpec": {"name": "get_weather", "inputSchema": {"json": {"type": "object"}}}}]}

answer = bedrock.converse(modelId=MODEL, messages=MESSAGES, system=[{"text": "Be brief."}],
                          inferenceConfig={"maxTokens": 64})
check(answer["output"]["message"]["content"][0]["text"] == EXPECTED, f"converse text {answer}")
check(answer["stopReason"] == "end_turn", "stop reason")
check(answer["usage"]["inputTokens"] == 10 and answer["usage"]["outputTokens"] == 3, f"usage {answer['usage']}")

events = list(bedrock.converse_stream(modelId=MODEL, messages=MESSAGES)["stream"])
check(events[0] == {"messageStart": {"role": "assistant"}}, f"first event {events[0]}")
text = "".join(e["contentBlockDelta"]["delta"]["text"] for e in events if "contentBlockDelta" in e)
check(text == EXPECTED, f"streamed text {text!r}")
check(events[-2] == {"messageStop": {"stopReason": "end_turn"}}, f"stop event {events[-2]}")
check(events[-1]["metadata"]["usage"]["outputTokens"] == 3, f"metadata {events[-1]}")

answer = bedrock.converse(modelId="bedrock-sdk-tools", messages=MESSAGES, toolConfig=TOOLS)
call = answer["output"]["message"]["content"][0]["toolUse"]
check(call["name"] == "get_weather" and call["input"] == {"city": "Paris"}, f"tool use {call}")
check(answer["stopReason"] == "tool_use", "tool stop reason")
events = list(bedrock.converse_stream(modelId="bedrock-sdk-tools", messages=MESSAGES, toolConfig=TOOLS)["stream"])
start = next(e["contentBlockStart"] for e in events if "contentBlockStart" in e)
check(start["start"]["toolUse"]["toolUseId"] == "tooluse_sdk", f"tool start {start}")
arguments = "".join(e["contentBlockDelta"]["delta"]["toolUse"]["input"] for e in events if "contentBlockDelta" in e)
check(json.loads(arguments) == {"city": "Paris"}, f"streamed arguments {arguments!r}")

try:
    bedrock.converse(modelId="bedrock-sdk-busy", messages=MESSAGES)
    check(False, "a throttled call raised nothing")
except ClientError as e:
    check(e.response["Error"]["Code"] == "ThrottlingException", f"throttled {e.response['Error']}")
    check(e.response["ResponseMetadata"]["HTTPStatusCode"] == 429, "throttled status")

try:
    list(bedrock.converse_stream(modelId="bedrock-sdk-broken", messages=MESSAGES)["stream"])
    check(False, "a broken stream raised nothing")
except EventStreamError as e:
    check(e.response["Error"]["Code"] == "modelStreamErrorException", f"stream error {e.response['Error']}")

# The mock's verifier: AWS's signature with a session token passes, a wrong secret not.
answer = client(SECRET, token="sdk-session-token").converse(modelId=MODEL, messages=MESSAGES)
check(answer["stopReason"] == "end_turn", "temporary credentials accepted")
try:
    client("not-the-secret").converse(modelId=MODEL, messages=MESSAGES)
    check(False, "a wrong signature was accepted")
except ClientError as e:
    check(e.response["Error"]["Code"] == "InvalidSignatureException", f"bad signature {e.response['Error']}")
    check(e.response["ResponseMetadata"]["HTTPStatusCode"] == 403, "bad signature status")

# ApplyGuardrail (the guardrail kind `bedrock`): botocore builds the path, signs and
# parses the mock's verdicts.
def apply(text, source="INPUT"):
    return bedrock.apply_guardrail(guardrailIdentifier="gr-sdk", guardrailVersion="DRAFT",
                                   source=source, content=[{"text": {"text": text}}])


answer = apply("a plain question")
check(answer["action"] == "NONE" and answer["outputs"] == [], f"guardrail pass {answer}")
answer = apply("tell me [block]", source="OUTPUT")
check(answer["action"] == "GUARDRAIL_INTERVENED", f"guardrail block {answer}")
filters = answer["assessments"][0]["contentPolicy"]["filters"]
check(filters[0]["action"] == "BLOCKED", f"guardrail block assessment {filters}")
answer = apply("mail ann@corp.example")
check(answer["outputs"] == [{"text": "mail {EMAIL}"}], f"guardrail mask {answer}")
entities = answer["assessments"][0]["sensitiveInformationPolicy"]["piiEntities"]
check(entities[0]["action"] == "ANONYMIZED", f"guardrail mask assessment {entities}")

passed("bedrock-mock")
