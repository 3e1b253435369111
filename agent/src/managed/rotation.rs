//! Certificate rotation: at 2/3 of the certificate's lifetime, or when a heartbeat
//! answer asks, generate a new key here, send a CSR to `POST /dp/rotate-cert`, keep
//! the new bundle (atomically, in `state_dir/mtls`) and swap the client identity: the
//! next handshake presents the new certificate while open connections (proxy traffic
//! does not use them; the config watch does) carry on. A failed attempt is retried
//! with capped backoff; the current certificate keeps working meanwhile.

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use certs::{CertInfo, GatewayIdentity};
use contract::certificate::RotateRequest;
use reqwest::Method;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::EXPIRY_WARNING_DAYS;
use super::bundle::{BundlePems, BundleStore};
use super::client::CpClient;
use crate::backoff::{Backoff, BackoffPolicy};

/// Rotate once this fraction of the certificate's lifetime has passed.
pub const ROTATE_AT_FRACTION: f64 = 2.0 / 3.0;
/// Never rotate more often than this on schedule (very short-lived certificates would
/// otherwise be due again at once: issuers backdate `not_before`).
const MIN_GAP: Duration = Duration::from_secs(5);

pub struct Rotation {
    pub cp: Arc<CpClient>,
    pub store: BundleStore,
    pub identity: GatewayIdentity,
    /// The certificate in use; replaced after each rotation.
    pub current: Arc<ArcSwap<CertInfo>>,
    /// Notified when the control plane asks for a rotation.
    pub asked: Arc<Notify>,
    pub backoff: BackoffPolicy,
}

/// When `cert` is due for rotation, from now (zero when already due).
pub fn due_in(cert: &CertInfo, now: time::OffsetDateTime) -> Duration {
    let lifetime = cert.not_after - cert.not_before;
    let due = cert.not_before + lifetime * ROTATE_AT_FRACTION;
    Duration::try_from(due - now).unwrap_or(Duration::ZERO)
}

/// When a certificate just received is next due: the same fraction of what is left of
/// its lifetime, never sooner than [`MIN_GAP`]. Counting from `not_before` would make a
/// short-lived certificate due again at once, since issuers backdate `not_before`.
pub fn due_after_rotation(cert: &CertInfo, now: time::OffsetDateTime) -> Duration {
    let left = Duration::try_from(cert.not_after - now).unwrap_or(Duration::ZERO);
    left.mul_f64(ROTATE_AT_FRACTION).max(MIN_GAP)
}

impl Rotation {
    pub async fn run(self, shutdown: CancellationToken) {
        let mut failures = Backoff::new(self.backoff);
        let mut retry: Option<Duration> = None;
        loop {
            let wait = retry
                .unwrap_or_else(|| due_in(&self.current.load(), time::OffsetDateTime::now_utc()));
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(wait) => {}
                () = self.asked.notified() => {}
            }
            match self.rotate().await {
                Ok(leaf) => {
                    failures.reset();
                    retry = Some(due_after_rotation(&leaf, time::OffsetDateTime::now_utc()));
                    let days_left = leaf.days_left(time::OffsetDateTime::now_utc());
                    info!(serial = %leaf.serial, not_after = %leaf.not_after, days_left, "gateway certificate rotated");
                    if days_left < EXPIRY_WARNING_DAYS {
                        warn!(days_left, "the gateway certificate expires soon");
                    }
                }
                Err(e) => {
                    let delay = failures.next_delay();
                    warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "certificate rotation failed; the current certificate stays in use");
                    retry = Some(delay);
                }
            }
        }
    }

    async fn rotate(&self) -> anyhow::Result<CertInfo> {
        let identity = self.identity.clone();
        let csr = tokio::task::spawn_blocking(move || certs::generate_csr(&identity)).await??;
        let answer = self
            .cp
            .call(
                Method::POST,
                "/dp/rotate-cert",
                Some(&RotateRequest {
                    csr_pem: csr.csr_pem,
                }),
            )
            .await?;
        let bundle = super::bundle::signed(&answer, csr.key_pem.expose(), &self.identity)?;
        // Kept first: a crash right after still restarts with the new certificate.
        self.store.save(&BundlePems::from(&bundle))?;
        self.cp.identity.swap(&bundle)?;
        self.current.store(Arc::new(bundle.leaf.clone()));
        Ok(bundle.leaf)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;

    #[test]
    fn rotation_is_due_at_two_thirds_of_the_lifetime() {
        let ca = certs::CertificateAuthority::generate("t", Duration::from_secs(86_400)).unwrap();
        let id = GatewayIdentity::new("e", "d").unwrap();
        let issued = ca.issue_gateway(&id, Duration::from_secs(3000)).unwrap();
        let info = certs::inspect_pem("c", &issued.cert_pem).unwrap().remove(0);
        let lifetime = (info.not_after - info.not_before).whole_seconds();
        let due = due_in(&info, info.not_before);
        let expected = Duration::from_secs_f64(lifetime as f64 * 2.0 / 3.0);
        assert!(
            due.abs_diff(expected) < Duration::from_secs(1),
            "{due:?} vs {expected:?}"
        );
        assert_eq!(due_in(&info, info.not_after), Duration::ZERO);
    }

    #[test]
    fn a_short_lived_certificate_is_not_rotated_again_at_once() {
        // Ten minutes of validity, `not_before` backdated: two thirds of the lifetime
        // since `not_before` has passed on arrival; two thirds of what is left has not.
        let ca = certs::CertificateAuthority::generate("t", Duration::from_secs(86_400)).unwrap();
        let id = GatewayIdentity::new("e", "d").unwrap();
        let issued = ca.issue_gateway(&id, Duration::from_secs(600)).unwrap();
        let info = certs::inspect_pem("c", &issued.cert_pem).unwrap().remove(0);
        let now = time::OffsetDateTime::now_utc();
        let left = Duration::try_from(info.not_after - now).unwrap();
        let next = due_after_rotation(&info, now);
        assert!(
            next.abs_diff(left.mul_f64(2.0 / 3.0)) < Duration::from_secs(2),
            "{next:?} of {left:?} left"
        );
        assert!(next > Duration::from_secs(300), "{next:?}");
        // Past its end it is still not rotated more often than the floor.
        assert_eq!(due_after_rotation(&info, info.not_after), MIN_GAP);
    }
}
