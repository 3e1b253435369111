//! `aisix-agent validate`: everything start-up would check, without binding a port
//! or contacting a source.

use proxy_core::snapshot::{SnapshotStore, Source, SourceEvent};

use crate::config::Config;
use crate::listeners;
use crate::managed;
use crate::source::{self, PREFIX};

/// What validation found. A config that cannot be used at all is an error instead.
pub struct Validation {
    /// Sections accepted but not implemented by this build.
    pub notes: Vec<String>,
    /// Resources that would be rejected (file mode).
    pub problems: Vec<String>,
    /// What the config describes, when there are no problems.
    pub summary: String,
}

impl Validation {
    pub fn ok(&self) -> bool {
        self.problems.is_empty()
    }
}

pub fn validate(config: &Config) -> anyhow::Result<Validation> {
    let notes = config
        .ignored
        .iter()
        .map(|key| format!("config '{key}' is accepted but not acted on by this build"))
        .collect();
    listeners::plan(config)?;
    let done = |summary: String| Validation {
        notes,
        problems: Vec::new(),
        summary,
    };
    if let Some(section) = config.managed() {
        let bundle = managed::bundle::resolve(section, time::OffsetDateTime::now_utc(), false)?;
        return Ok(done(format!(
            "managed: gateway {} of environment {}, certificate valid until {}; resources come from {}",
            bundle.identity.dp_id,
            bundle.identity.env_id,
            bundle.leaf.not_after,
            section.cp_base_url
        )));
    }
    if let Some(etcd) = &config.etcd {
        source::etcd_client(etcd)?;
        let admin = match config.admin() {
            Some(admin) => format!("the admin API listens on {}", admin.addr),
            None => {
                "no admin section (or admin.enabled is false), so the admin API is off".to_owned()
            }
        };
        return Ok(done(format!(
            "self-hosted: resources are watched under {} in etcd and checked as they arrive; {admin}",
            config.prefix()
        )));
    }
    let file = source::load_resources(config)?;
    let store = SnapshotStore::new(PREFIX);
    let report = store.apply(
        Source::File,
        [SourceEvent::Reset {
            entries: file.entries,
            revision: 1,
        }],
    );
    let mut problems = file.problems;
    problems.extend(
        report
            .newly_rejected
            .iter()
            .map(|r| format!("{}: {}", r.key, r.error)),
    );
    let (p, m, a) = store.load().counts();
    let mut validation = done(format!("{p} provider keys, {m} models, {a} api keys"));
    validation.problems = problems;
    Ok(validation)
}
