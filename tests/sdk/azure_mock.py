"""The official OpenAI SDK's Azure client against cloud-mock's Azure OpenAI mock.

Started by tests/tests/sdk_compat.rs with AISIX_BASE_URL pointing at the mock: the SDK
builds the deployment URLs, the api-version and the credentials itself, so the mock
is checked against Microsoft's conventions as the SDK knows them, not against ours.
"""

import json
import urllib.parse
import urllib.request

import openai

from checks import BASE_URL, EXPECTED, MESSAGES, check, passed

VERSION = "2024-10-21"
DEPLOYMENT = "sdk-deployment"

client = openai.AzureOpenAI(azure_endpoint=BASE_URL, api_key="azure-sdk-key", api_version=VERSION,
                            max_retries=0)
completion = client.chat.completions.create(model=DEPLOYMENT, messages=MESSAGES)
check(completion.choices[0].message.content == EXPECTED, f"chat content {completion}")
stream = client.chat.completions.create(model=DEPLOYMENT, messages=MESSAGES, stream=True)
text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
check(text == EXPECTED, f"streamed content {text!r}")
embedding = client.embeddings.create(model=DEPLOYMENT, input="hello")
check(len(embedding.data[0].embedding) == 8, "embedding")


def entra_token():
    form = urllib.parse.urlencode({"grant_type": "client_credentials", "client_id": "sdk-client",
                                   "client_secret": "sdk-secret",
                                   "scope": "https://cognitiveservices.azure.com/.default"}).encode()
    with urllib.request.urlopen(BASE_URL + "/sdk-tenant/oauth2/v2.0/token", form) as answer:
        return json.load(answer)["access_token"]


entra = openai.AzureOpenAI(azure_endpoint=BASE_URL, azure_ad_token_provider=entra_token,
                           api_version=VERSION, max_retries=0)
completion = entra.chat.completions.create(model=DEPLOYMENT, messages=MESSAGES)
check(completion.choices[0].message.content == EXPECTED, "chat with an Entra token")

forged = openai.AzureOpenAI(azure_endpoint=BASE_URL, azure_ad_token="not-a-minted-token",
                            api_version=VERSION, max_retries=0)
try:
    forged.chat.completions.create(model=DEPLOYMENT, messages=MESSAGES)
    check(False, "a token the mock never minted was accepted")
except openai.AuthenticationError as e:
    check(e.status_code == 401, "a forged token is refused")

passed("azure-mock")
