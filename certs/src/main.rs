//! `aisix-certs`: certificate tooling for operators and tests.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use certs::{
    CertError, CertInfo, CertificateAuthority, GatewayIdentity, Issued, generate_csr, inspect_pem,
    verify_certificate, write_new_file,
};
use clap::{Parser, Subcommand};
use serde_json::json;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

const DAY: Duration = Duration::from_secs(86_400);

#[derive(Parser)]
#[command(
    name = "aisix-certs",
    version,
    about = "Certificates for AISIX gateways and control planes"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create a certificate authority (ECDSA P-256): DIR/ca.pem and DIR/ca-key.pem (mode 0600).
    /// Never overwrites an existing CA.
    InitCa {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long, default_value = "AISIX CA")]
        common_name: String,
        #[arg(long, default_value_t = 3650)]
        days: u32,
    },
    /// Issue a gateway client certificate with a new key:
    /// OUT/cert.pem, OUT/key.pem (0600) and OUT/ca.pem.
    IssueGateway {
        /// Folder holding ca.pem and ca-key.pem.
        #[arg(long)]
        ca_dir: PathBuf,
        #[command(flatten)]
        identity: IdentityArgs,
        #[arg(long, default_value_t = 90)]
        days: u32,
        #[arg(long)]
        out: PathBuf,
    },
    /// Issue a control-plane server certificate with a new key:
    /// OUT/cert.pem, OUT/key.pem (0600) and OUT/ca.pem.
    IssueServer {
        #[arg(long)]
        ca_dir: PathBuf,
        /// DNS name (repeatable).
        #[arg(long = "dns")]
        dns_names: Vec<String>,
        /// IP address (repeatable).
        #[arg(long = "ip")]
        ips: Vec<IpAddr>,
        /// Also allow client authentication (etcd with --client-cert-auth needs this:
        /// its HTTP gateway dials the server with the server's own certificate).
        #[arg(long)]
        client_auth: bool,
        #[arg(long, default_value_t = 365)]
        days: u32,
        #[arg(long)]
        out: PathBuf,
    },
    /// Generate a key here and a CSR for a gateway identity:
    /// OUT/csr.pem and OUT/key.pem (0600). The key never leaves this host.
    Csr {
        #[command(flatten)]
        identity: IdentityArgs,
        #[arg(long)]
        out: PathBuf,
    },
    /// Sign a gateway CSR, only if it asks for exactly the given identity; writes the
    /// certificate to OUT.
    SignCsr {
        #[arg(long)]
        ca_dir: PathBuf,
        #[arg(long)]
        csr: PathBuf,
        #[command(flatten)]
        identity: IdentityArgs,
        #[arg(long, default_value_t = 90)]
        days: u32,
        #[arg(long)]
        out: PathBuf,
    },
    /// Print what a PEM certificate file says: subject, issuer, serial, SANs, validity,
    /// SHA-256 fingerprint, days left and gateway identity.
    Inspect {
        file: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Check that CERT was issued by CA and is valid now. Exit status: 0 valid,
    /// 1 unreadable input, 3 not issued by the CA, 4 not yet valid, 5 expired.
    Verify {
        #[arg(long)]
        ca: PathBuf,
        cert: PathBuf,
    },
}

/// The gateway identity a certificate or CSR carries.
#[derive(clap::Args)]
struct IdentityArgs {
    /// Environment id (URI SAN x-aisix://env/<id>).
    #[arg(long = "env")]
    env_id: String,
    /// Data-plane id (URI SAN x-aisix://dp/<id>).
    #[arg(long = "dp")]
    dp_id: String,
}

impl IdentityArgs {
    fn identity(&self) -> Result<GatewayIdentity, CertError> {
        GatewayIdentity::new(&self.env_id, &self.dp_id)
    }
}

fn main() -> ExitCode {
    let outcome = match Cli::parse().command {
        Command::Verify { ca, cert } => verify(&ca, &cert),
        other => run(other).map_err(|e| (1, e)),
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err((code, e)) => {
            eprintln!("aisix-certs: {e:#}");
            ExitCode::from(code)
        }
    }
}

fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::InitCa {
            dir,
            common_name,
            days,
        } => {
            let ca = CertificateAuthority::generate(&common_name, DAY * days)?;
            ca.save(&dir)?;
            println!(
                "wrote {} and {}",
                dir.join("ca.pem").display(),
                dir.join("ca-key.pem").display()
            );
        }
        Command::IssueGateway {
            ca_dir,
            identity,
            days,
            out,
        } => {
            let ca = CertificateAuthority::load(&ca_dir)?;
            let identity = identity.identity()?;
            let issued = ca.issue_gateway(&identity, DAY * days)?;
            write_bundle(&out, &issued, ca.cert_pem())?;
        }
        Command::IssueServer {
            ca_dir,
            dns_names,
            ips,
            client_auth,
            days,
            out,
        } => {
            anyhow::ensure!(
                !dns_names.is_empty() || !ips.is_empty(),
                "give at least one --dns or --ip"
            );
            let ca = CertificateAuthority::load(&ca_dir)?;
            let issued = if client_auth {
                ca.issue_server_and_client(&dns_names, &ips, DAY * days)?
            } else {
                ca.issue_server(&dns_names, &ips, DAY * days)?
            };
            write_bundle(&out, &issued, ca.cert_pem())?;
        }
        Command::Csr { identity, out } => {
            let csr = generate_csr(&identity.identity()?)?;
            std::fs::create_dir_all(&out)
                .with_context(|| format!("cannot create {}", out.display()))?;
            write(&out.join("key.pem"), csr.key_pem.expose(), 0o600)?;
            write(&out.join("csr.pem"), &csr.csr_pem, 0o644)?;
        }
        Command::SignCsr {
            ca_dir,
            csr,
            identity,
            days,
            out,
        } => {
            let ca = CertificateAuthority::load(&ca_dir)?;
            let request = std::fs::read_to_string(&csr)
                .with_context(|| format!("cannot read {}", csr.display()))?;
            let cert = ca.sign_gateway_csr(&request, &identity.identity()?, DAY * days)?;
            write(&out, &cert, 0o644)?;
        }
        Command::Inspect { file, json } => {
            let pem = std::fs::read_to_string(&file)
                .with_context(|| format!("cannot read {}", file.display()))?;
            let infos = inspect_pem(&file.display().to_string(), &pem)?;
            if json {
                let list: Vec<_> = infos.iter().map(to_json).collect::<anyhow::Result<_>>()?;
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                print_text(&file, &infos)?;
            }
        }
        Command::Verify { .. } => anyhow::bail!("verify is handled separately"),
    }
    Ok(())
}

fn verify(ca: &Path, cert: &Path) -> Result<(), (u8, anyhow::Error)> {
    let read = |p: &Path| {
        std::fs::read_to_string(p)
            .with_context(|| format!("cannot read {}", p.display()))
            .map_err(|e| (1, e))
    };
    let (ca_pem, cert_pem) = (read(ca)?, read(cert)?);
    match verify_certificate(&cert_pem, &ca_pem, OffsetDateTime::now_utc()) {
        Ok(info) => {
            println!(
                "{}: valid, issued by {}, {} days left",
                cert.display(),
                info.issuer,
                info.days_left(OffsetDateTime::now_utc())
            );
            Ok(())
        }
        Err(e) => {
            let code = match &e {
                CertError::NotIssuedByCa { .. } => 3,
                CertError::NotYetValid { .. } => 4,
                CertError::Expired { .. } => 5,
                _ => 1,
            };
            Err((
                code,
                anyhow::Error::new(e).context(cert.display().to_string()),
            ))
        }
    }
}

fn write(path: &Path, contents: &str, mode: u32) -> anyhow::Result<()> {
    write_new_file(path, contents.as_bytes(), mode)?;
    println!("wrote {}", path.display());
    Ok(())
}

/// A bundle as the agent keeps its own (`state_dir/mtls/active/`): `cert.pem`,
/// `key.pem` (0600) and `ca.pem`, so one set of names works everywhere.
fn write_bundle(out: &Path, issued: &Issued, ca_pem: &str) -> anyhow::Result<()> {
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    write(&out.join("key.pem"), issued.key_pem.expose(), 0o600)?;
    write(&out.join("cert.pem"), &issued.cert_pem, 0o644)?;
    write(&out.join("ca.pem"), ca_pem, 0o644)
}

fn to_json(c: &CertInfo) -> anyhow::Result<serde_json::Value> {
    Ok(json!({
        "subject": c.subject,
        "issuer": c.issuer,
        "serial": c.serial,
        "dns_names": c.dns_names,
        "ip_addresses": c.ip_addresses.iter().map(ToString::to_string).collect::<Vec<_>>(),
        "uris": c.uris,
        "not_before": c.not_before.format(&Rfc3339)?,
        "not_after": c.not_after.format(&Rfc3339)?,
        "days_left": c.days_left(OffsetDateTime::now_utc()),
        "sha256_fingerprint": c.sha256_fingerprint,
        "is_ca": c.is_ca,
        "identity": c.identity.as_ref().map(|i| json!({"env_id": i.env_id, "dp_id": i.dp_id})),
    }))
}

fn print_text(file: &Path, infos: &[CertInfo]) -> anyhow::Result<()> {
    let now = OffsetDateTime::now_utc();
    let list = |v: Vec<String>| {
        if v.is_empty() {
            "-".to_owned()
        } else {
            v.join(", ")
        }
    };
    for (i, c) in infos.iter().enumerate() {
        println!(
            "certificate {} of {} in {}",
            i + 1,
            infos.len(),
            file.display()
        );
        println!("  subject:          {}", c.subject);
        println!("  issuer:           {}", c.issuer);
        println!("  serial:           {}", c.serial);
        println!("  not before:       {}", c.not_before.format(&Rfc3339)?);
        println!("  not after:        {}", c.not_after.format(&Rfc3339)?);
        println!("  days left:        {}", c.days_left(now));
        println!("  sha256:           {}", c.sha256_fingerprint);
        println!("  dns names:        {}", list(c.dns_names.clone()));
        println!(
            "  ip addresses:     {}",
            list(c.ip_addresses.iter().map(ToString::to_string).collect())
        );
        println!("  uris:             {}", list(c.uris.clone()));
        println!(
            "  certificate authority: {}",
            if c.is_ca { "yes" } else { "no" }
        );
        match &c.identity {
            Some(id) => println!(
                "  gateway identity: env_id={} dp_id={}",
                id.env_id, id.dp_id
            ),
            None => println!("  gateway identity: -"),
        }
    }
    Ok(())
}
