//! `multipart/form-data` request bodies (audio transcriptions and translations, image
//! edits and variations): read with `multer`, sent on with reqwest's form builder, so
//! the upstream gets every part as the caller sent it with only `model` replaced.

use bytes::Bytes;
use futures_util::stream;
use serde_json::{Map, Value};

use crate::failure::ProxyError;

/// The parts of a form, in order.
#[derive(Debug, Clone, Default)]
pub struct Form {
    fields: Vec<Field>,
}

#[derive(Debug, Clone)]
struct Field {
    name: String,
    file_name: Option<String>,
    content_type: Option<String>,
    data: Bytes,
}

/// Whether a request's `Content-Type` is `multipart/form-data`.
pub fn is_form(content_type: Option<&str>) -> bool {
    content_type.is_some_and(|ct| {
        ct.trim_start()
            .to_ascii_lowercase()
            .starts_with("multipart/form-data")
    })
}

impl Form {
    pub async fn parse(body: Bytes, content_type: &str) -> Result<Form, ProxyError> {
        let invalid = |e: multer::Error| {
            ProxyError::invalid_request(format!("request body is not a valid form: {e}"), None)
        };
        let boundary = multer::parse_boundary(content_type).map_err(invalid)?;
        let mut reader = multer::Multipart::new(
            stream::once(async move { Ok::<_, std::io::Error>(body) }),
            boundary,
        );
        let mut fields = Vec::new();
        while let Some(field) = reader.next_field().await.map_err(invalid)? {
            let name = field.name().unwrap_or_default().to_owned();
            let file_name = field.file_name().map(str::to_owned);
            let content_type = field.content_type().map(ToString::to_string);
            let data = field.bytes().await.map_err(invalid)?;
            fields.push(Field {
                name,
                file_name,
                content_type,
                data,
            });
        }
        Ok(Form { fields })
    }

    /// The text fields (not files) as a JSON object, for what reads request fields
    /// (`model`, `stream`, guardrails). `"true"`/`"false"` become booleans.
    pub fn text_fields_json(&self) -> Vec<u8> {
        let mut map = Map::new();
        for field in self.fields.iter().filter(|f| f.file_name.is_none()) {
            let text = String::from_utf8_lossy(&field.data).into_owned();
            let value = match text.as_str() {
                "true" => Value::Bool(true),
                "false" => Value::Bool(false),
                _ => Value::String(text),
            };
            map.insert(field.name.clone(), value);
        }
        serde_json::to_vec(&Value::Object(map)).unwrap_or_default()
    }

    /// The form for the upstream: every part as sent, `model` replaced.
    pub fn with_model(&self, upstream_model: &str) -> Result<reqwest::multipart::Form, ProxyError> {
        let mut form = reqwest::multipart::Form::new();
        for field in &self.fields {
            let data = if field.name == "model" {
                Bytes::from(upstream_model.to_owned())
            } else {
                field.data.clone()
            };
            let mut part = reqwest::multipart::Part::stream(data);
            if let Some(file_name) = &field.file_name {
                part = part.file_name(file_name.clone());
            }
            if let Some(content_type) = &field.content_type {
                part = part.mime_str(content_type).map_err(|_| {
                    ProxyError::invalid_request(
                        format!("form part '{}' has an invalid content type", field.name),
                        None,
                    )
                })?;
            }
            form = form.part(field.name.clone(), part);
        }
        Ok(form)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;

    const BODY: &str = "--XyZ\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nwhisper\r\n--XyZ\r\nContent-Disposition: form-data; name=\"stream\"\r\n\r\nfalse\r\n--XyZ\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\nContent-Type: audio/wav\r\n\r\nRIFF....\r\n--XyZ--\r\n";

    #[tokio::test]
    async fn text_fields_are_read_and_files_kept() {
        let form = Form::parse(Bytes::from(BODY), "multipart/form-data; boundary=XyZ")
            .await
            .unwrap();
        let fields: Value = serde_json::from_slice(&form.text_fields_json()).unwrap();
        assert_eq!(
            fields,
            serde_json::json!({"model": "whisper", "stream": false})
        );
        assert_eq!(form.fields[2].file_name.as_deref(), Some("a.wav"));
        assert_eq!(form.fields[2].content_type.as_deref(), Some("audio/wav"));
        assert_eq!(&form.fields[2].data[..], b"RIFF....");
        assert!(form.with_model("up").is_ok());
        assert!(is_form(Some("Multipart/Form-Data; boundary=x")));
        assert!(!is_form(Some("application/json")));
    }

    #[tokio::test]
    async fn a_broken_form_is_a_400() {
        let err = Form::parse(
            Bytes::from("--XyZ\r\nnonsense"),
            "multipart/form-data; boundary=XyZ",
        )
        .await
        .unwrap_err();
        assert_eq!(err.class().status, 400);
        let err = Form::parse(Bytes::from(BODY), "multipart/form-data")
            .await
            .unwrap_err();
        assert_eq!(err.class().status, 400);
    }
}
