//! Token counts read from answers and stream events of every format.

use serde::Deserialize;

use crate::resources::Cost;

/// Token counts as the upstream reported them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tokens {
    pub prompt: u64,
    pub completion: u64,
}

impl Tokens {
    /// Reads `usage` from a JSON document (a whole answer or one stream event): OpenAI's
    /// `prompt_tokens`/`completion_tokens` or Anthropic's and the Responses API's
    /// `input_tokens`/`output_tokens`, at the top or under `message` (Anthropic's
    /// `message_start`) or `response` (`response.completed`). Anthropic's cached input
    /// tokens count as input.
    pub fn from_json(document: &[u8]) -> Option<Tokens> {
        #[derive(Deserialize)]
        struct Document {
            usage: Option<Usage>,
            message: Option<Nested>,
            response: Option<Nested>,
        }
        #[derive(Deserialize)]
        struct Nested {
            usage: Option<Usage>,
        }
        #[derive(Deserialize)]
        struct Usage {
            #[serde(alias = "input_tokens")]
            prompt_tokens: Option<u64>,
            #[serde(alias = "output_tokens")]
            completion_tokens: Option<u64>,
            cache_creation_input_tokens: Option<u64>,
            cache_read_input_tokens: Option<u64>,
        }
        let document = serde_json::from_slice::<Document>(document).ok()?;
        let usage = document
            .usage
            .or_else(|| document.message?.usage)
            .or_else(|| document.response?.usage)?;
        let cached = usage.cache_creation_input_tokens.unwrap_or(0)
            + usage.cache_read_input_tokens.unwrap_or(0);
        Some(Tokens {
            prompt: usage.prompt_tokens.unwrap_or(0) + cached,
            completion: usage.completion_tokens.unwrap_or(0),
        })
    }

    pub fn cost(self, cost: Option<&Cost>) -> f64 {
        cost.map_or(0.0, |c| {
            (self.prompt as f64 * c.input_per_1k + self.completion as f64 * c.output_per_1k)
                / 1000.0
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whole_answers_yield_their_usage() {
        let openai =
            br#"{"id":"x","usage":{"prompt_tokens":12,"completion_tokens":5,"total_tokens":17}}"#;
        assert_eq!(
            Tokens::from_json(openai),
            Some(Tokens {
                prompt: 12,
                completion: 5
            })
        );
        let anthropic = br#"{"usage":{"input_tokens":3,"output_tokens":4}}"#;
        assert_eq!(
            Tokens::from_json(anthropic),
            Some(Tokens {
                prompt: 3,
                completion: 4
            })
        );
        let start = br#"{"type":"message_start","message":{"usage":{"input_tokens":3,"cache_read_input_tokens":2,"output_tokens":1}}}"#;
        assert_eq!(
            Tokens::from_json(start),
            Some(Tokens {
                prompt: 5,
                completion: 1
            })
        );
        let completed = br#"{"type":"response.completed","response":{"usage":{"input_tokens":7,"output_tokens":8}}}"#;
        assert_eq!(
            Tokens::from_json(completed),
            Some(Tokens {
                prompt: 7,
                completion: 8
            })
        );
        assert_eq!(Tokens::from_json(br#"{"usage":null}"#), None);
        assert_eq!(Tokens::from_json(b"not json"), None);
        let cost = Cost {
            input_per_1k: 1.0,
            output_per_1k: 2.0,
        };
        let tokens = Tokens {
            prompt: 1000,
            completion: 500,
        };
        assert!((tokens.cost(Some(&cost)) - 2.0).abs() < 1e-9);
        assert!(tokens.cost(None).abs() < f64::EPSILON);
    }
}
