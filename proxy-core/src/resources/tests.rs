use super::*;

fn parse(kind: Kind, json: &str) -> Result<Resource, Problems> {
    Resource::parse(&ResourceKey::new(kind, "id1"), json.as_bytes())
}

fn problems(kind: Kind, json: &str) -> Vec<(String, String)> {
    match parse(kind, json) {
        Ok(r) => panic!("expected problems, got {r:?}"),
        Err(p) => p.0.into_iter().map(|e| (e.path, e.message)).collect(),
    }
}

#[test]
fn key_parsing() {
    let k = ResourceKey::parse("/aisix", "/aisix/models/m1").unwrap();
    assert_eq!((k.kind, &*k.id), (Kind::Models, "m1"));
    assert_eq!(k.full("/aisix"), "/aisix/models/m1");
    assert!(matches!(
        ResourceKey::parse("/aisix", "/other/models/m1"),
        Err(KeyError::OutsidePrefix(_))
    ));
    assert!(matches!(
        ResourceKey::parse("/aisix", "/aisix/models"),
        Err(KeyError::Malformed)
    ));
    assert!(matches!(
        ResourceKey::parse("/aisix", "/aisix/models/a/b"),
        Err(KeyError::Malformed)
    ));
    assert!(matches!(
        ResourceKey::parse("/aisix", "/aisix/widgets/w"),
        Err(KeyError::UnknownKind(_))
    ));
}

#[test]
fn provider_key_defaults_and_normalisation() {
    let Resource::ProviderKey(pk) = parse(
        Kind::ProviderKeys,
        r#"{"display_name":"p","provider":"openai","api_key":"sk"}"#,
    )
    .unwrap() else {
        panic!()
    };
    assert_eq!(pk.api_base, "https://api.openai.com");
    assert_eq!(pk.adapter, Adapter::OpenAi);
    for base in [
        "http://h:1/v1",
        "http://h:1/v1/",
        "http://h:1",
        "http://h:1/",
    ] {
        let json =
            format!(r#"{{"display_name":"p","provider":"acme","api_base":"{base}","secret":"s"}}"#);
        let Resource::ProviderKey(pk) = parse(Kind::ProviderKeys, &json).unwrap() else {
            panic!()
        };
        assert_eq!(pk.api_base, "http://h:1", "{base}");
    }
}

#[test]
fn built_in_vendors_need_no_api_base() {
    for (vendor, base, adapter) in validate::BUILT_IN_BASES {
        let json = format!(r#"{{"display_name":"v","provider":"{vendor}","api_key":"k"}}"#);
        let Resource::ProviderKey(pk) = parse(Kind::ProviderKeys, &json).unwrap() else {
            panic!()
        };
        assert_eq!(pk.api_base, *base, "{vendor}");
        assert_eq!(&pk.adapter, adapter, "{vendor}");
        // The table is in the form an api_base normalises to.
        let json = format!(
            r#"{{"display_name":"v","provider":"{vendor}","api_base":"{base}/v1/","api_key":"k"}}"#
        );
        let Resource::ProviderKey(pk) = parse(Kind::ProviderKeys, &json).unwrap() else {
            panic!()
        };
        assert_eq!(pk.api_base, *base, "{vendor}");
    }
    let Resource::ProviderKey(groq) = parse(
        Kind::ProviderKeys,
        r#"{"display_name":"g","provider":"groq","api_key":"gsk"}"#,
    )
    .unwrap() else {
        panic!()
    };
    assert_eq!(groq.api_base, "https://api.groq.com/openai");
}

#[test]
fn azure_keys_take_a_key_or_entra_client_credentials() {
    let parse_key = |json: &str| match parse(Kind::ProviderKeys, json) {
        Ok(Resource::ProviderKey(pk)) => pk,
        other => panic!("{other:?}"),
    };
    let plain = parse_key(
        r#"{"display_name":"a","provider":"azure","api_base":"https://r.openai.azure.com","api_key":"k","api_version":"2025-01-01-preview"}"#,
    );
    assert_eq!(plain.adapter, Adapter::AzureOpenAi);
    assert_eq!(plain.entra, None);
    assert_eq!(plain.api_version.as_deref(), Some("2025-01-01-preview"));
    let entra = parse_key(
        r#"{"display_name":"a","adapter":"azure-openai","api_base":"https://r.openai.azure.com",
            "api_key":"{\"tenant_id\":\"t\",\"client_id\":\"c\",\"client_secret\":\"planted-s3cret\"}"}"#,
    );
    let credential = entra.entra.clone().unwrap();
    assert_eq!(
        (credential.tenant_id.as_str(), credential.client_id.as_str()),
        ("t", "c")
    );
    assert_eq!(
        credential.authority_host,
        "https://login.microsoftonline.com"
    );
    // Problems name the fields, never the secret.
    let got = problems(
        Kind::ProviderKeys,
        r#"{"display_name":"a","provider":"azure","api_version":"2024 10",
            "api_key":"{\"tenant_id\":\"t\",\"client_secret\":\"planted-s3cret\",\"authority_host\":\"ftp://x\"}"}"#,
    );
    let paths: Vec<&str> = got.iter().map(|(p, _)| p.as_str()).collect();
    assert_eq!(
        paths,
        [
            "api_base",
            "api_key.client_id",
            "api_key.authority_host",
            "api_version"
        ]
    );
    assert!(!format!("{got:?}").contains("planted-s3cret"));
    let got = problems(
        Kind::ProviderKeys,
        r#"{"display_name":"a","provider":"azure","api_base":"https://r","api_key":"{not json planted-s3cret"}"#,
    );
    assert_eq!(got[0].0, "api_key");
    assert!(!format!("{got:?}").contains("planted-s3cret"));
}

#[test]
fn vertex_keys_name_a_project_and_a_token_or_a_service_account() {
    let Resource::ProviderKey(pk) = parse(
        Kind::ProviderKeys,
        r#"{"display_name":"v","provider":"vertex","api_key":"{\"project\":\"p\",\"region\":\"europe-west4\",\"access_token\":\"ya29.t\"}"}"#,
    )
    .unwrap() else {
        panic!()
    };
    assert_eq!(pk.adapter, Adapter::Vertex);
    assert_eq!(
        pk.api_base,
        "https://europe-west4-aiplatform.googleapis.com"
    );
    let vertex = pk.vertex.clone().unwrap();
    assert_eq!(
        (vertex.project.as_str(), vertex.region.as_str()),
        ("p", "europe-west4")
    );
    assert!(matches!(vertex.auth, GoogleAuth::AccessToken(_)));
    let Resource::ProviderKey(global) = parse(
        Kind::ProviderKeys,
        r#"{"display_name":"v","provider":"vertex","api_key":"{\"project\":\"p\",\"region\":\"global\",\"access_token\":\"ya29.t\"}"}"#,
    )
    .unwrap() else {
        panic!()
    };
    assert_eq!(global.api_base, "https://aiplatform.googleapis.com");
    // A service account whose key is not an RSA PKCS#8 key, and a missing project:
    // named fields, never the key.
    let got = problems(
        Kind::ProviderKeys,
        r#"{"display_name":"v","provider":"vertex","api_key":"{\"region\":\"global\",\"service_account_json\":{\"client_email\":\"a@b\",\"private_key\":\"-----BEGIN PRIVATE KEY-----\\nplanted-s3cret\\n-----END PRIVATE KEY-----\\n\"}}"}"#,
    );
    let paths: Vec<&str> = got.iter().map(|(p, _)| p.as_str()).collect();
    assert_eq!(
        paths,
        [
            "api_key.project",
            "api_key.service_account_json.private_key"
        ]
    );
    assert!(!format!("{got:?}").contains("planted-s3cret"));
    let got = problems(
        Kind::ProviderKeys,
        r#"{"display_name":"v","provider":"vertex","api_key":"ya29.not-json"}"#,
    );
    assert_eq!(got[0].0, "api_key");
    assert!(!format!("{got:?}").contains("ya29.not-json"));
}

#[test]
fn bedrock_keys_carry_aws_credentials_and_their_region() {
    let Resource::ProviderKey(pk) = parse(
        Kind::ProviderKeys,
        r#"{"display_name":"b","provider":"bedrock","api_key":"{\"access_key_id\":\"AKIA1\",\"secret_access_key\":\"s\",\"region\":\"eu-west-1\",\"session_token\":\"t\"}"}"#,
    )
    .unwrap() else {
        panic!()
    };
    assert_eq!(pk.adapter, Adapter::Bedrock);
    assert_eq!(
        pk.api_base,
        "https://bedrock-runtime.eu-west-1.amazonaws.com"
    );
    let aws = pk.aws.clone().unwrap();
    assert_eq!(
        (aws.access_key_id.as_str(), aws.region.as_str()),
        ("AKIA1", "eu-west-1")
    );
    assert_eq!(aws.session_token.unwrap().expose(), "t");
    // An api_base replaces the regional endpoint; problems name fields, never values.
    let Resource::ProviderKey(pk) = parse(
        Kind::ProviderKeys,
        r#"{"display_name":"b","adapter":"bedrock","provider":"aws","api_base":"http://127.0.0.1:9","api_key":"{\"access_key_id\":\"AKIA1\",\"secret_access_key\":\"s\",\"region\":\"us-east-1\"}"}"#,
    )
    .unwrap() else {
        panic!()
    };
    assert_eq!(
        (&pk.adapter, pk.api_base.as_str()),
        (&Adapter::Bedrock, "http://127.0.0.1:9")
    );
    let got = problems(
        Kind::ProviderKeys,
        r#"{"display_name":"b","provider":"bedrock","api_key":"{\"access_key_id\":\"AKIA1\",\"secret_access_key\":\"planted-s3cret\",\"region\":\"Mars 1\"}"}"#,
    );
    assert_eq!(got[0].0, "api_key.region");
    let got = problems(
        Kind::ProviderKeys,
        r#"{"display_name":"b","provider":"bedrock","api_key":"{\"secret_access_key\":\"planted-s3cret\"}"}"#,
    );
    let paths: Vec<&str> = got.iter().map(|(p, _)| p.as_str()).collect();
    assert_eq!(paths, ["api_key.access_key_id", "api_key.region"]);
    assert!(!format!("{got:?}").contains("planted-s3cret"));
    let got = problems(
        Kind::ProviderKeys,
        r#"{"display_name":"b","provider":"bedrock","api_key":"planted-s3cret"}"#,
    );
    assert_eq!(got[0].0, "api_key");
    assert!(!format!("{got:?}").contains("planted-s3cret"));
}

#[test]
fn provider_key_collects_every_problem() {
    let got = problems(
        Kind::ProviderKeys,
        r#"{"provider":"acme","api_key":"a","secret":"b","x":1}"#,
    );
    assert_eq!(
        got,
        vec![
            ("display_name".into(), "required".into()),
            (
                "api_base".into(),
                "required for provider 'acme' (it is not built in)".into()
            ),
            (
                "api_key".into(),
                "set exactly one of api_key or secret, not both".into()
            ),
        ]
    );
}

#[test]
fn unknown_fields_are_tolerated_and_counted() {
    let r = parse(
        Kind::ProviderKeys,
        r#"{"display_name":"p","provider":"openai","api_key":"k","future":true}"#,
    )
    .unwrap();
    assert_eq!(r.unknown_fields(), 1);
}

#[test]
fn type_errors_name_the_field() {
    let got = problems(Kind::Models, r#"{"display_name":"m","timeout":"soon"}"#);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].0, "timeout");
    let got = problems(
        Kind::Models,
        r#"{"display_name":"m","routing":{"targets":[{"model":"a","weight":"x"}]}}"#,
    );
    assert_eq!(got[0].0, "routing.targets[0].weight");
    let got = problems(Kind::Models, "not json");
    assert_eq!(got[0].0, "(document)");
    let got = problems(Kind::Models, r#"{"display_name":"m"} trailing"#);
    assert_eq!(got[0].0, "(document)");
}

#[test]
fn model_forms() {
    let got = problems(Kind::Models, r#"{"display_name":"m"}"#);
    assert_eq!(
        got,
        vec![
            ("model_name".into(), "required".into()),
            ("provider_key_id".into(), "required".into()),
        ]
    );
    let got = problems(
        Kind::Models,
        r#"{"display_name":"m","model_name":"x","routing":{"targets":[{"model":"a"}]}}"#,
    );
    assert_eq!(got[0].0, "routing");
    let got = problems(
        Kind::Models,
        r#"{"display_name":"m","routing":{"targets":[{"weight":0}],"strategy":"random","when_all_unavailable":"x","fallback_on_statuses":[200]},
            "allowed_cidrs":["10.0.0.0/8","nope"],"timeout":0,"rate_limit":{"rpm":0},"cost":{"input_per_1k":-1},
            "cooldown":{"default_seconds":700},"prompt_cache":{"auto":true,"ttl":"1d"}}"#,
    );
    let paths: Vec<&str> = got.iter().map(|(p, _)| p.as_str()).collect();
    assert_eq!(
        paths,
        [
            "routing.targets[0].weight",
            "routing.targets[0].model",
            "routing.strategy",
            "routing.when_all_unavailable",
            "routing.fallback_on_statuses[0]",
            "allowed_cidrs[1]",
            "timeout",
            "rate_limit.rpm",
            "cost.input_per_1k",
            "cooldown.default_seconds",
            "prompt_cache.ttl",
        ]
    );
}

#[test]
fn api_key_validation_and_matching() {
    let hash = KeyHash::of_plaintext("caller-1");
    let hex = hex::encode(hash.0);
    let json = format!(
        r#"{{"key_hash":"{hex}","allowed_models":["gpt-4o","claude-*"],"expires_at":"2030-01-01T00:00:00+02:00"}}"#
    );
    let Resource::ApiKey(k) = parse(Kind::ApiKeys, &json).unwrap() else {
        panic!()
    };
    assert_eq!(k.key_hash, hash);
    assert!(k.allows("gpt-4o") && k.allows("claude-3") && !k.allows("gpt-4o-mini"));
    assert!(!k.is_expired(std::time::SystemTime::now()));
    let got = problems(
        Kind::ApiKeys,
        r#"{"key_hash":"ABC","expires_at":"tomorrow"}"#,
    );
    let paths: Vec<&str> = got.iter().map(|(p, _)| p.as_str()).collect();
    assert_eq!(paths, ["key_hash", "allowed_models", "expires_at"]);
}

#[test]
fn secrets_never_appear_in_debug_output() {
    let r = parse(
        Kind::ProviderKeys,
        r#"{"display_name":"p","provider":"openai","api_key":"sk-very-secret"}"#,
    )
    .unwrap();
    assert!(!format!("{r:?}").contains("sk-very-secret"));
}

#[test]
fn guardrails_validate_every_pattern() {
    let Resource::Guardrail(g) = parse(
        Kind::Guardrails,
        r#"{"name":"no-secrets","patterns":[{"kind":"literal","value":"password"},{"kind":"regex","value":"sk-[a-z]+"}],"hook_point":"input","enforcement_mode":"monitor"}"#,
    )
    .unwrap() else {
        panic!("expected a guardrail")
    };
    assert_eq!(
        (
            match &g.check {
                crate::resources::Check::Keyword(p) => p.len(),
                _ => 0,
            },
            g.hook_point,
            g.block,
            g.enabled
        ),
        (2, HookPoint::Input, false, true)
    );
    assert_eq!(
        problems(
            Kind::Guardrails,
            r#"{"kind":"keyword","patterns":[{"kind":"regex","value":"("},{"kind":"glob","value":"x"},{}],"hook_point":"later"}"#
        ),
        [
            ("name".to_owned(), "required".to_owned()),
            (
                "patterns[0].value".to_owned(),
                problems(
                    Kind::Guardrails,
                    r#"{"name":"n","patterns":[{"kind":"regex","value":"("}]}"#
                )[0]
                .1
                .clone()
            ),
            (
                "patterns[1].kind".to_owned(),
                "'glob' is not one of literal, regex".to_owned()
            ),
            ("patterns[2].value".to_owned(), "required".to_owned()),
            (
                "hook_point".to_owned(),
                "'later' is not one of input, output, both".to_owned()
            ),
        ]
    );
}

#[test]
fn control_characters_in_names_and_credentials_are_refused() {
    let control = "must not contain control characters (line breaks, tabs...)";
    let found = problems(
        Kind::ProviderKeys,
        r#"{"display_name": "a\nFAKE LOG LINE", "provider": "acme\r", "api_base": "http://x", "api_key": "sk-1\r\nx-injected: 1"}"#,
    );
    for path in ["display_name", "provider", "api_key"] {
        assert!(
            found.contains(&(path.to_owned(), control.to_owned())),
            "{path}: {found:?}"
        );
    }
    // The credential is never echoed in the problem.
    assert!(!format!("{found:?}").contains("sk-1"));
    let found = problems(
        Kind::Models,
        r#"{"display_name": "gpt\n", "model_name": "up\u001b[31m", "provider_key_id": "pk"}"#,
    );
    assert!(found.contains(&("display_name".to_owned(), control.to_owned())));
    assert!(found.contains(&("model_name".to_owned(), control.to_owned())));
    let found = problems(
        Kind::ApiKeys,
        &format!(
            r#"{{"key_hash": "{}", "allowed_models": ["*"], "display_name": "me\nyou"}}"#,
            "0".repeat(64)
        ),
    );
    assert_eq!(found, [("display_name".to_owned(), control.to_owned())]);
}
