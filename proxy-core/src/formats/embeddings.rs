//! OpenAI embeddings requests and answers <-> the embedding APIs of providers without
//! an OpenAI-shaped one: Gemini's `batchEmbedContents`, Vertex AI's `predict`, and
//! Bedrock's Titan (`inputText`, one input per call) and Cohere (`texts`) models.
//!
//! A request's `input` is a string or a list of strings (token arrays are refused:
//! these providers take text), `dimensions` asks for a shorter vector where the
//! provider can. The answer is OpenAI's list, its vectors as floats or, for
//! `encoding_format: base64` (what the official Python SDK asks for by default), as
//! base64 of little-endian 32-bit floats.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use bytes::Bytes;
use serde_json::{Value, json};

use crate::failure::ProxyError;

/// The provider shape an embeddings call was sent in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    /// Gemini API `batchEmbedContents`.
    Gemini,
    /// Vertex AI `predict` on a text embedding model.
    Vertex,
    /// Bedrock `invoke` on an Amazon Titan embedding model.
    Titan,
    /// Bedrock `invoke` on a Cohere embedding model.
    Cohere,
}

/// What an embeddings call asked for.
#[derive(Debug, Clone, PartialEq)]
pub struct EmbeddingsRequest {
    pub inputs: Vec<String>,
    pub dimensions: Option<u64>,
    /// The vectors as base64 rather than floats.
    pub base64: bool,
}

fn refuse(message: impl Into<String>, param: &'static str) -> ProxyError {
    ProxyError::invalid_request(message, Some(param))
}

impl EmbeddingsRequest {
    /// Reads an OpenAI embeddings body.
    pub fn read(body: &[u8]) -> Result<Self, ProxyError> {
        let Ok(Value::Object(request)) = serde_json::from_slice::<Value>(body) else {
            return Err(ProxyError::invalid_request(
                "request body is not a valid JSON object",
                None,
            ));
        };
        let inputs = match request.get("input") {
            Some(Value::String(s)) => vec![s.clone()],
            Some(Value::Array(items)) if !items.is_empty() => items
                .iter()
                .map(|v| v.as_str().map(str::to_owned))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| {
                    refuse(
                        "'input' must be text (a string or a list of strings) for this model's provider: token arrays are not supported",
                        "input",
                    )
                })?,
            _ => {
                return Err(refuse(
                    "'input' must be a string or a non-empty list of strings",
                    "input",
                ));
            }
        };
        let dimensions =
            match request.get("dimensions") {
                None | Some(Value::Null) => None,
                Some(v) => Some(v.as_u64().filter(|d| *d > 0).ok_or_else(|| {
                    refuse("'dimensions' must be a positive integer", "dimensions")
                })?),
            };
        let base64 = match request.get("encoding_format").and_then(Value::as_str) {
            None | Some("float") => false,
            Some("base64") => true,
            Some(_) => {
                return Err(refuse(
                    "'encoding_format' must be float or base64",
                    "encoding_format",
                ));
            }
        };
        Ok(Self {
            inputs,
            dimensions,
            base64,
        })
    }

    /// The provider's request body for `model`.
    pub fn write(&self, shape: Shape, model: &str) -> Result<Vec<u8>, ProxyError> {
        let body = match shape {
            Shape::Gemini => {
                let name = format!("models/{}", model.trim_start_matches("models/"));
                let requests: Vec<Value> = self
                    .inputs
                    .iter()
                    .map(|text| {
                        let mut r = json!({"model": name, "content": {"parts": [{"text": text}]}});
                        if let Some(d) = self.dimensions {
                            r["outputDimensionality"] = d.into();
                        }
                        r
                    })
                    .collect();
                json!({ "requests": requests })
            }
            Shape::Vertex => {
                let instances: Vec<Value> = self
                    .inputs
                    .iter()
                    .map(|t| json!({ "content": t }))
                    .collect();
                let mut body = json!({ "instances": instances });
                if let Some(d) = self.dimensions {
                    body["parameters"] = json!({ "outputDimensionality": d });
                }
                body
            }
            Shape::Titan => {
                let [text] = self.inputs.as_slice() else {
                    return Err(refuse(
                        "this model's provider (Amazon Titan on Bedrock) embeds one input per request: send 'input' as one string",
                        "input",
                    ));
                };
                let mut body = json!({ "inputText": text });
                if let Some(d) = self.dimensions {
                    body["dimensions"] = d.into();
                }
                body
            }
            Shape::Cohere => {
                if self.dimensions.is_some() {
                    return Err(refuse(
                        "'dimensions' is not supported by this model's provider",
                        "dimensions",
                    ));
                }
                json!({"texts": self.inputs, "input_type": "search_document"})
            }
        };
        Ok(serde_json::to_vec(&body).unwrap_or_default())
    }
}

/// The provider's answer in `shape` as OpenAI's list for `model`.
pub fn answer(shape: Shape, base64: bool, body: &[u8], model: &str) -> Result<Bytes, ProxyError> {
    let unreadable = || ProxyError::UpstreamFailed {
        detail: "the upstream embeddings answer could not be read".to_owned(),
        retry_after: None,
    };
    let answer: Value = serde_json::from_slice(body).map_err(|_| unreadable())?;
    let (vectors, tokens): (Vec<&Value>, u64) = match shape {
        Shape::Gemini => (
            list(&answer, "/embeddings")?
                .iter()
                .map(|e| e.get("values").unwrap_or(&Value::Null))
                .collect(),
            0,
        ),
        Shape::Vertex => {
            let predictions = list(&answer, "/predictions")?;
            let tokens = predictions
                .iter()
                .filter_map(|p| p.pointer("/embeddings/statistics/token_count")?.as_f64())
                .sum::<f64>();
            (
                predictions
                    .iter()
                    .map(|p| p.pointer("/embeddings/values").unwrap_or(&Value::Null))
                    .collect(),
                tokens as u64,
            )
        }
        Shape::Titan => (
            vec![answer.get("embedding").ok_or_else(unreadable)?],
            answer
                .get("inputTextTokenCount")
                .and_then(Value::as_u64)
                .unwrap_or(0),
        ),
        Shape::Cohere => {
            // `embeddings` is a list of vectors, or by type (`{"float": [...]}`).
            let embeddings = answer.get("embeddings").ok_or_else(unreadable)?;
            let embeddings = embeddings.get("float").unwrap_or(embeddings);
            (
                embeddings
                    .as_array()
                    .ok_or_else(unreadable)?
                    .iter()
                    .collect(),
                0,
            )
        }
    };
    let mut data = Vec::with_capacity(vectors.len());
    for (index, vector) in vectors.into_iter().enumerate() {
        let floats = vector.as_array().ok_or_else(unreadable)?;
        let embedding = if base64 {
            let mut bytes = Vec::with_capacity(floats.len() * 4);
            for f in floats {
                let f = f.as_f64().ok_or_else(unreadable)? as f32;
                bytes.extend_from_slice(&f.to_le_bytes());
            }
            Value::String(STANDARD.encode(bytes))
        } else {
            Value::Array(floats.clone())
        };
        data.push(json!({"object": "embedding", "index": index, "embedding": embedding}));
    }
    Ok(Bytes::from(
        serde_json::to_vec(&json!({
            "object": "list",
            "data": data,
            "model": model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }))
        .unwrap_or_default(),
    ))
}

fn list<'a>(answer: &'a Value, pointer: &str) -> Result<&'a Vec<Value>, ProxyError> {
    answer
        .pointer(pointer)
        .and_then(Value::as_array)
        .ok_or_else(|| ProxyError::UpstreamFailed {
            detail: "the upstream embeddings answer could not be read".to_owned(),
            retry_after: None,
        })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;

    #[test]
    fn requests_are_written_in_each_providers_shape() {
        let r =
            EmbeddingsRequest::read(br#"{"model":"e","input":["a","b"],"dimensions":8}"#).unwrap();
        let gemini: Value =
            serde_json::from_slice(&r.write(Shape::Gemini, "text-embedding-004").unwrap()).unwrap();
        assert_eq!(
            gemini["requests"][1],
            json!({"model": "models/text-embedding-004", "content": {"parts": [{"text": "b"}]},
                   "outputDimensionality": 8})
        );
        let vertex: Value = serde_json::from_slice(&r.write(Shape::Vertex, "m").unwrap()).unwrap();
        assert_eq!(
            vertex["instances"],
            json!([{"content": "a"}, {"content": "b"}])
        );
        assert!(matches!(
            r.write(Shape::Titan, "m"),
            Err(ProxyError::InvalidRequest {
                param: Some("input"),
                ..
            })
        ));
        let one = EmbeddingsRequest::read(br#"{"model":"e","input":"a"}"#).unwrap();
        let titan: Value = serde_json::from_slice(&one.write(Shape::Titan, "m").unwrap()).unwrap();
        assert_eq!(titan, json!({"inputText": "a"}));
        let cohere: Value =
            serde_json::from_slice(&one.write(Shape::Cohere, "m").unwrap()).unwrap();
        assert_eq!(cohere["texts"], json!(["a"]));
        for bad in [
            &br#"{"input":[1,2,3]}"#[..],
            br#"{"input":[]}"#,
            br#"{"input":"a","encoding_format":"int8"}"#,
        ] {
            assert!(matches!(
                EmbeddingsRequest::read(bad),
                Err(ProxyError::InvalidRequest { .. })
            ));
        }
    }

    #[test]
    fn answers_become_openai_lists_as_floats_or_base64() {
        let body = br#"{"embeddings":[{"values":[0.5,-1.0]},{"values":[0.25,2.0]}]}"#;
        let list: Value =
            serde_json::from_slice(&answer(Shape::Gemini, false, body, "e").unwrap()).unwrap();
        assert_eq!(
            list["data"][1],
            json!({"object": "embedding", "index": 1, "embedding": [0.25, 2.0]})
        );
        assert_eq!(list["model"], "e");
        let list: Value =
            serde_json::from_slice(&answer(Shape::Gemini, true, body, "e").unwrap()).unwrap();
        let bytes = STANDARD
            .decode(list["data"][0]["embedding"].as_str().unwrap())
            .unwrap();
        let floats: Vec<f32> = bytes
            .chunks(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        assert_eq!(floats, [0.5, -1.0]);
        let titan = br#"{"embedding":[1.0],"inputTextTokenCount":4}"#;
        let list: Value =
            serde_json::from_slice(&answer(Shape::Titan, false, titan, "t").unwrap()).unwrap();
        assert_eq!(list["usage"]["prompt_tokens"], 4);
        let cohere = br#"{"embeddings":{"float":[[1.0],[2.0]]}}"#;
        let list: Value =
            serde_json::from_slice(&answer(Shape::Cohere, false, cohere, "c").unwrap()).unwrap();
        assert_eq!(list["data"][1]["embedding"], json!([2.0]));
        assert!(answer(Shape::Vertex, false, b"<html>", "v").is_err());
    }
}
