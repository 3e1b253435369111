"""Recomputes the agent's Signature V4 signatures with AWS's own botocore.

Reads the requests cloud-mock recorded (JSON on stdin: method, path, query, headers,
body) and the secret access key (argv[1]); for each, signs the same method, URL, signed
headers and body at the request's own `x-amz-date` with botocore's SigV4Auth and
compares the signature. Prints how many were checked; any mismatch exits non-zero.
"""

import json
import sys

from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

secret = sys.argv[1]
checked = 0
for recorded in json.load(sys.stdin):
    headers = recorded["headers"]
    fields = dict(part.strip().split("=", 1) for part in headers["authorization"].split(" ", 1)[1].split(","))
    access_key_id, _date, region, service, _ = fields["Credential"].split("/")
    signed = fields["SignedHeaders"].split(";")
    url = f"http://{headers['host']}{recorded['path']}"
    if recorded.get("query"):
        url += "?" + recorded["query"]
    request = AWSRequest(method=recorded["method"], url=url, data=recorded["body"].encode(),
                         headers={name: headers[name] for name in signed})
    request.context["timestamp"] = headers["x-amz-date"]
    auth = SigV4Auth(Credentials(access_key_id, secret, headers.get("x-amz-security-token")), service, region)
    canonical = auth.canonical_request(request)
    expected = auth.signature(auth.string_to_sign(request, canonical), request)
    if expected != fields["Signature"]:
        raise SystemExit(f"FAILED: signature of {recorded['method']} {recorded['path']}: "
                         f"botocore computes {expected}, the agent sent {fields['Signature']}\n{canonical}")
    checked += 1
print(f"{checked} signatures checked")
