"""Official clients against cloud-mock's guardrail detector mocks.

Started by tests/tests/sdk_compat.rs with AISIX_BASE_URL pointing at the mock: the
OpenAI SDK's moderations client and Microsoft's azure-ai-contentsafety client build the
requests and parse the answers themselves, so the mocks are checked against the
services' own clients, not against the agent's detector code.
"""

import openai
from azure.ai.contentsafety import ContentSafetyClient
from azure.ai.contentsafety.models import AnalyzeTextOptions, TextCategory
from azure.core.credentials import AzureKeyCredential
from azure.core.exceptions import ClientAuthenticationError, HttpResponseError

from checks import BASE_URL, check, passed

moderation = openai.OpenAI(base_url=BASE_URL + "/v1", api_key="sk-moderation", max_retries=0)
result = moderation.moderations.create(model="omni-moderation-latest", input="how to [violence]").results[0]
check(result.flagged and result.categories.violence, f"moderation flags {result}")
check(abs(result.category_scores.violence - 0.91) < 1e-9, f"moderation score {result.category_scores}")
result = moderation.moderations.create(model="omni-moderation-latest", input="a plain question").results[0]
check(not result.flagged, f"moderation passes {result}")

safety = ContentSafetyClient(BASE_URL, AzureKeyCredential("azure-safety-key"))
answer = safety.analyze_text(AnalyzeTextOptions(text="some [violence]"))
severities = {a.category: a.severity for a in answer.categories_analysis}
check(severities[TextCategory.VIOLENCE] == 4 and severities[TextCategory.HATE] == 0,
      f"text analysis {severities}")
answer = safety.analyze_text(AnalyzeTextOptions(text="our [blocked] word", blocklist_names=["company-terms"],
                                                halt_on_blocklist_hit=True))
check(answer.blocklists_match[0].blocklist_name == "company-terms", f"blocklist {answer.blocklists_match}")
try:
    ContentSafetyClient(BASE_URL, AzureKeyCredential("")).analyze_text(AnalyzeTextOptions(text="x"))
    check(False, "an empty key was accepted")
except (ClientAuthenticationError, HttpResponseError, ValueError) as e:
    check(True, f"no key refused: {type(e).__name__}")

passed("detectors-mock")
