//! AWS Bedrock: the Converse API (`{api_base}/model/{model_id}/converse`, and
//! `/converse-stream`, whose answer is an AWS event stream), every request signed with
//! Signature V4 (service `bedrock`) by `aws-sigv4` from the key's credentials. Chat
//! completions, messages and the Responses API are translated
//! (`formats::chat::BedrockConverse`), so Anthropic's models on Bedrock are reachable
//! from `/v1/messages` too. Embeddings go to `/model/{model_id}/invoke` on Titan and
//! Cohere embedding models (`formats::embeddings`).
//!
//! Bedrock's errors are `{"message": ...}` with the kind in a header; the status says
//! enough: 429 is throttling (retried and failed over like any provider's, with a
//! one-second hint since Bedrock sends none), 404 an unknown model, 400 a refusal.

use std::time::SystemTime;

use aws_credential_types::Credentials;
use aws_sigv4::http_request::{SignableBody, SignableRequest, SigningSettings, sign};
use aws_sigv4::sign::v4;
use axum::http::HeaderMap;
use http::{HeaderName, HeaderValue};

use super::provider::{
    CallerRequest, Outgoing, Payload, Prepared, Provider, TargetModel, coded_error, segment,
};
use crate::failure::{ProxyError, UpstreamErrorFields};
use crate::formats::chat::{self, BedrockConverse, Conversion};
use crate::formats::embeddings::{EmbeddingsRequest, Shape};
use crate::formats::endpoint::{EMBEDDINGS, Endpoint};
use crate::resources::{AwsCredential, ProviderKey};

pub struct Bedrock;

impl Provider for Bedrock {
    fn name(&self) -> &'static str {
        "bedrock"
    }

    fn supports(&self, endpoint: Endpoint) -> bool {
        chat::caller_format(endpoint).is_some() || endpoint == Endpoint::Forward(EMBEDDINGS)
    }

    fn build(
        &self,
        request: &CallerRequest<'_>,
        target: &TargetModel<'_>,
    ) -> Result<Prepared, ProxyError> {
        if request.endpoint == Endpoint::Forward(EMBEDDINGS) {
            return embed(request, target);
        }
        let Some(caller) = chat::caller_format(request.endpoint) else {
            return Err(ProxyError::NotImplemented(format!(
                "{} is not a Bedrock endpoint",
                request.endpoint.path()
            )));
        };
        let body =
            chat::translate_request(request.raw, caller, &BedrockConverse, target.upstream_model)?;
        let action = if request.body.stream {
            "converse-stream"
        } else {
            "converse"
        };
        Ok(Prepared {
            outgoing: Outgoing {
                path: format!("/model/{}/{action}", segment(target.upstream_model)).into(),
                payload: Payload::json(body),
                stream: request.body.stream,
                json_answer: true,
                headers: HeaderMap::new(),
            },
            conversion: Conversion::Translate {
                upstream: &BedrockConverse,
                caller,
            },
        })
    }

    /// The signature covers the whole request: added by [`Provider::sign`] once it is
    /// built.
    fn authorize(
        &self,
        request: reqwest::RequestBuilder,
        _key: &ProviderKey,
    ) -> reqwest::RequestBuilder {
        request
    }

    fn sign(&self, request: &mut reqwest::Request, key: &ProviderKey) -> Result<(), String> {
        let Some(aws) = &key.aws else {
            return Err(format!(
                "provider key '{}' has no AWS credentials",
                key.display_name
            ));
        };
        sign_v4(request, aws, "bedrock", SystemTime::now())
    }

    fn aws_event_stream(&self) -> bool {
        true
    }

    fn throttle_hint(&self) -> Option<u64> {
        Some(1)
    }

    fn error_fields(&self, status: u16, body: &[u8]) -> UpstreamErrorFields {
        let error: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
        let message = error
            .get("message")
            .or_else(|| error.get("Message"))
            .and_then(serde_json::Value::as_str)
            .map(|m| serde_json::json!({"error": {"message": m}}))
            .unwrap_or_default();
        let code = match status {
            429 => "rate_limit_exceeded",
            404 => "model_not_found",
            408 => "timeout",
            424 => "model_error",
            _ => "invalid_request",
        };
        coded_error(status, &message, code)
    }
}

/// An embeddings call as `invoke` on an Amazon Titan or a Cohere embedding model, the
/// only embedding families Bedrock serves.
fn embed(request: &CallerRequest<'_>, target: &TargetModel<'_>) -> Result<Prepared, ProxyError> {
    let model = target.upstream_model;
    let shape = if model.contains("titan-embed") {
        Shape::Titan
    } else if model.contains("cohere.embed") {
        Shape::Cohere
    } else {
        return Err(ProxyError::NotImplemented(format!(
            "/v1/embeddings on Bedrock needs an Amazon Titan or Cohere embedding model, not '{model}'"
        )));
    };
    let embeddings = EmbeddingsRequest::read(request.raw)?;
    Ok(Prepared {
        outgoing: Outgoing {
            path: format!("/model/{}/invoke", segment(model)).into(),
            payload: Payload::json(embeddings.write(shape, model)?),
            stream: false,
            json_answer: true,
            headers: HeaderMap::new(),
        },
        conversion: Conversion::Embeddings {
            shape,
            base64: embeddings.base64,
        },
    })
}

/// Signs `request` (method, URL, headers and body) for `service` with AWS Signature
/// V4 at `at`: adds `authorization`, `x-amz-date` and, for temporary credentials,
/// `x-amz-security-token`. Errors never show the credentials.
pub fn sign_v4(
    request: &mut reqwest::Request,
    aws: &AwsCredential,
    service: &str,
    at: SystemTime,
) -> Result<(), String> {
    let identity = Credentials::new(
        &aws.access_key_id,
        aws.secret_access_key.expose(),
        aws.session_token.as_ref().map(|t| t.expose().to_owned()),
        None,
        "provider-key",
    )
    .into();
    let params = v4::SigningParams::builder()
        .identity(&identity)
        .region(&aws.region)
        .name(service)
        .time(at)
        .settings(SigningSettings::default())
        .build()
        .map_err(|e| format!("signing parameters: {e}"))?
        .into();
    let added = {
        let body = request
            .body()
            .and_then(reqwest::Body::as_bytes)
            .unwrap_or(&[]);
        let headers = request
            .headers()
            .iter()
            .filter_map(|(name, value)| Some((name.as_str(), value.to_str().ok()?)));
        let signable = SignableRequest::new(
            request.method().as_str(),
            request.url().as_str(),
            headers,
            SignableBody::Bytes(body),
        )
        .map_err(|e| format!("the request cannot be signed: {e}"))?;
        let (instructions, _signature) = sign(signable, &params)
            .map_err(|e| format!("the request cannot be signed: {e}"))?
            .into_parts();
        instructions.into_parts().0
    };
    for header in added {
        let name = HeaderName::from_static(header.name());
        let mut value = HeaderValue::from_str(header.value())
            .map_err(|_| "a signature header is not a valid header value".to_owned())?;
        value.set_sensitive(header.sensitive());
        request.headers_mut().insert(name, value);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;
    use crate::secret::Secret;

    /// The worked example of AWS's Signature V4 documentation ("GET ... IAM
    /// ListUsers" with the documentation's example keys), as a check that the signer is
    /// wired the way AWS computes it.
    #[test]
    fn the_documented_example_signs_to_the_documented_signature() {
        let aws = AwsCredential {
            access_key_id: "AKIDEXAMPLE".into(),
            secret_access_key: Secret::new("wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY".to_owned()),
            session_token: None,
            region: "us-east-1".into(),
        };
        crate::install_crypto_provider();
        let client = reqwest::Client::new();
        let mut request = client
            .get("https://iam.amazonaws.com/?Action=ListUsers&Version=2010-05-08")
            .header(
                "content-type",
                "application/x-www-form-urlencoded; charset=utf-8",
            )
            .build()
            .unwrap();
        let at = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_440_938_160);
        sign_v4(&mut request, &aws, "iam", at).unwrap();
        let authorization = request.headers()["authorization"].to_str().unwrap();
        assert_eq!(
            authorization,
            "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/iam/aws4_request, \
             SignedHeaders=content-type;host;x-amz-date, \
             Signature=5d672d79c15b13162d9279b0855cfba6789a8edb4c82c400e06b5924a6f2b5d7"
        );
        assert_eq!(request.headers()["x-amz-date"], "20150830T123600Z");
    }
}
