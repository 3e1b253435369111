//! The gateway's certificate bundle on disk: `state_dir/mtls/`, one generation
//! directory per bundle (`gen-<n>/cert.pem`, `key.pem` 0600, `ca.pem`) and an `active`
//! symlink replaced atomically, so a crash while saving leaves the old bundle or the
//! new one in use, never a certificate paired with the wrong key.
//!
//! [`resolve`] picks the bundle to use at start: the configured one (inline PEM or
//! files), or the one kept from an earlier start, enrollment or rotation. A kept bundle
//! for the same identity that outlives the configured one wins (it is a rotation of
//! it); otherwise the configured bundle is used and kept.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use certs::{Bundle, PemSource};
use contract::certificate::IssuedBundle;
use time::OffsetDateTime;

use crate::config::ManagedSection;

pub const MTLS_DIR: &str = "mtls";
const ACTIVE: &str = "active";
const CERT: &str = "cert.pem";
const KEY: &str = "key.pem";
const CA: &str = "ca.pem";

/// The PEM texts of a bundle, as written to disk.
pub struct BundlePems<'a> {
    pub cert_pem: &'a str,
    pub key_pem: &'a str,
    pub ca_pem: &'a str,
}

impl<'a> From<&'a Bundle> for BundlePems<'a> {
    fn from(b: &'a Bundle) -> Self {
        Self {
            cert_pem: &b.cert_pem,
            key_pem: b.key.expose(),
            ca_pem: &b.ca_pem,
        }
    }
}

/// `state_dir/mtls`.
#[derive(Debug, Clone)]
pub struct BundleStore {
    dir: PathBuf,
}

impl BundleStore {
    pub fn new(state_dir: &Path) -> Self {
        Self {
            dir: state_dir.join(MTLS_DIR),
        }
    }

    /// The directory of the bundle in use (`mtls/active`).
    pub fn active_dir(&self) -> PathBuf {
        self.dir.join(ACTIVE)
    }

    /// The kept bundle, checked at `now`; `None` when nothing is kept.
    pub fn load(&self, now: OffsetDateTime) -> anyhow::Result<Option<Bundle>> {
        let active = self.active_dir();
        if !active.join(CERT).exists() {
            return Ok(None);
        }
        let file = |name: &str| PemSource::File(active.join(name));
        crate::files::keep_private(&active.join(KEY), "managed.state_dir");
        let bundle = Bundle::load(&file(CERT), &file(KEY), &file(CA), now).map_err(|e| {
            anyhow::anyhow!("the bundle kept in {} is not usable: {e}", active.display())
        })?;
        Ok(Some(bundle))
    }

    /// Keeps `bundle` as the one in use (atomically), then removes generations older
    /// than the previous one.
    pub fn save(&self, bundle: &BundlePems<'_>) -> anyhow::Result<()> {
        fs::create_dir_all(&self.dir)?;
        fs::set_permissions(&self.dir, fs::Permissions::from_mode(0o700))?;
        let previous = fs::read_link(self.active_dir()).ok();
        let next = self.next_generation()?;
        let dir = self.dir.join(&next);
        fs::create_dir(&dir)?;
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o700))?;
        certs::write_file_atomic(&dir.join(KEY), bundle.key_pem.as_bytes(), 0o600)?;
        certs::write_file_atomic(&dir.join(CERT), bundle.cert_pem.as_bytes(), 0o644)?;
        certs::write_file_atomic(&dir.join(CA), bundle.ca_pem.as_bytes(), 0o644)?;
        let link = self.dir.join("active.tmp");
        let _ = fs::remove_file(&link);
        std::os::unix::fs::symlink(&next, &link)?;
        fs::rename(&link, self.active_dir())?;
        fs::File::open(&self.dir)?.sync_all()?;
        for entry in fs::read_dir(&self.dir)?.flatten() {
            let name = PathBuf::from(entry.file_name());
            let keep = name == Path::new(&next)
                || name == Path::new(ACTIVE)
                || previous.as_deref() == Some(name.as_path());
            if !keep && entry.path().is_dir() {
                let _ = fs::remove_dir_all(entry.path());
            }
        }
        Ok(())
    }

    fn next_generation(&self) -> anyhow::Result<String> {
        let highest = fs::read_dir(&self.dir)?
            .flatten()
            .filter_map(|e| {
                e.file_name()
                    .to_str()
                    .and_then(|n| n.strip_prefix("gen-"))
                    .and_then(|n| n.parse::<u64>().ok())
            })
            .max()
            .unwrap_or(0);
        Ok(format!("gen-{}", highest + 1))
    }
}

/// The bundle a control plane signed (an answer `{certificate_pem, ca_pem}` to a
/// rotation or enrollment) with the key generated for its CSR, checked now and checked
/// to carry `expected`.
pub fn signed(
    answer: &serde_json::Value,
    key_pem: &str,
    expected: &certs::GatewayIdentity,
) -> anyhow::Result<Bundle> {
    let issued: IssuedBundle = serde_json::from_value(answer.clone()).map_err(|e| {
        anyhow::anyhow!("the control plane's answer is not a certificate bundle: {e}")
    })?;
    let bundle = Bundle::load(
        &PemSource::Inline(issued.certificate_pem),
        &PemSource::Inline(key_pem.to_owned()),
        &PemSource::Inline(issued.ca_pem),
        OffsetDateTime::now_utc(),
    )
    .map_err(|e| anyhow::anyhow!("the certificate the control plane signed: {e}"))?;
    anyhow::ensure!(
        bundle.identity == *expected,
        "the control plane signed {} instead of {expected}",
        bundle.identity
    );
    Ok(bundle)
}

/// The bundle named by the config, if any (all three items, or none).
fn configured(section: &ManagedSection, now: OffsetDateTime) -> anyhow::Result<Option<Bundle>> {
    let item = |inline: &Option<proxy_core::secret::Secret>, file: &Option<PathBuf>| match (
        inline, file,
    ) {
        (Some(pem), _) => Some(PemSource::Inline(pem.expose().to_owned())),
        (None, Some(path)) => Some(PemSource::File(path.clone())),
        (None, None) => None,
    };
    if let (None, Some(path)) = (&section.cp_key_pem, &section.cp_key_file) {
        crate::files::keep_private(path, "managed.cp_key_file");
    }
    let cert = item(&section.cp_cert_pem, &section.cp_cert_file);
    let key = item(&section.cp_key_pem, &section.cp_key_file);
    let ca = item(&section.cp_ca_pem, &section.cp_ca_file);
    match (cert, key, ca) {
        (None, None, None) => Ok(None),
        (Some(cert), Some(key), Some(ca)) => Bundle::load(&cert, &key, &ca, now)
            .map(Some)
            .map_err(|e| anyhow::anyhow!("managed: the configured certificate bundle: {e}")),
        (cert, key, _) => {
            let missing = if cert.is_none() {
                "managed.cp_cert_pem / managed.cp_cert_file"
            } else if key.is_none() {
                "managed.cp_key_pem / managed.cp_key_file"
            } else {
                "managed.cp_ca_pem / managed.cp_ca_file"
            };
            anyhow::bail!("{missing}: missing; a bundle needs the certificate, its key and the CA")
        }
    }
}

/// Picks the bundle to use at start and, when `keep`, keeps it in `state_dir/mtls`.
pub fn resolve(
    section: &ManagedSection,
    now: OffsetDateTime,
    keep: bool,
) -> anyhow::Result<Bundle> {
    let store = BundleStore::new(&section.state_dir);
    let configured = configured(section, now)?;
    let kept = match store.load(now) {
        Ok(kept) => kept,
        // A damaged kept bundle is only fatal when there is nothing else to use.
        Err(e) if configured.is_some() => {
            tracing::warn!(error = %e, "ignoring the kept bundle; using the configured one");
            None
        }
        Err(e) => return Err(e),
    };
    match (configured, kept) {
        (None, None) => anyhow::bail!(
            "managed: no certificate bundle: set cp_cert_*, cp_key_* and cp_ca_* \
             (inline PEM or files), or run `aisix-agent enroll` with a token from the console"
        ),
        (None, Some(kept)) => Ok(kept),
        (Some(configured), Some(kept))
            if kept.identity == configured.identity
                && (kept.cert_pem == configured.cert_pem
                    || kept.leaf.not_after > configured.leaf.not_after) =>
        {
            if kept.cert_pem != configured.cert_pem {
                tracing::info!(
                    serial = %kept.leaf.serial,
                    "using the kept bundle: a rotation of the configured certificate"
                );
            }
            Ok(kept)
        }
        (Some(configured), _) if !keep => Ok(configured),
        (Some(configured), _) => {
            store
                .save(&BundlePems::from(&configured))
                .map_err(|e| anyhow::anyhow!("managed.state_dir: cannot keep the bundle: {e}"))?;
            Ok(configured)
        }
    }
}
