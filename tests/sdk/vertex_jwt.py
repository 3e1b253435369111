"""Service-account keys and JWT checks for the Vertex AI tests, with Google's own
google-auth library (a second implementation of RS256 JWTs, beside the agent's).

`vertex_jwt.py keygen DIR` writes DIR/key.pem (RSA 2048, PKCS#8) and DIR/pub.pem.
`vertex_jwt.py verify PUB AUDIENCE EMAIL KID ASSERTION` checks the assertion's
signature, audience, issuer, scope, lifetime and key id, and prints "jwt ok".
"""

import sys
import time

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from google.auth import jwt

if sys.argv[1] == "keygen":
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    with open(f"{sys.argv[2]}/key.pem", "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    with open(f"{sys.argv[2]}/pub.pem", "wb") as f:
        f.write(key.public_key().public_bytes(serialization.Encoding.PEM,
                                              serialization.PublicFormat.SubjectPublicKeyInfo))
    print("keys written")
elif sys.argv[1] == "verify":
    public, audience, email, kid, assertion = sys.argv[2:7]
    with open(public) as f:
        certs = f.read()
    claims = jwt.decode(assertion, certs=certs, audience=audience)
    header = jwt.decode_header(assertion)
    assert header["alg"] == "RS256" and header["kid"] == kid, header
    assert claims["iss"] == email, claims
    assert claims["scope"] == "https://www.googleapis.com/auth/cloud-platform", claims
    assert claims["exp"] - claims["iat"] == 3600 and abs(claims["iat"] - time.time()) < 120, claims
    print("jwt ok")
