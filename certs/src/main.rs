//! `aisix-certs`: certificate tooling for operators and tests.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use certs::{CertificateAuthority, GatewayIdentity, Issued, inspect_pem, write_new_file};
use clap::{Parser, Subcommand};
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
    /// Create a certificate authority: DIR/ca.pem and DIR/ca-key.pem (mode 0600).
    Ca {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long, default_value = "AISIX CA")]
        common_name: String,
        #[arg(long, default_value_t = 3650)]
        days: u32,
    },
    /// Issue a gateway client certificate: OUT/gateway.pem, OUT/gateway-key.pem, OUT/ca.pem.
    Gateway {
        /// Folder holding ca.pem and ca-key.pem.
        #[arg(long)]
        ca_dir: PathBuf,
        #[arg(long = "env")]
        env_id: String,
        #[arg(long = "dp")]
        dp_id: String,
        #[arg(long, default_value_t = 90)]
        days: u32,
        #[arg(long)]
        out: PathBuf,
    },
    /// Issue a control-plane server certificate: OUT/server.pem, OUT/server-key.pem, OUT/ca.pem.
    Server {
        #[arg(long)]
        ca_dir: PathBuf,
        /// DNS name (repeatable).
        #[arg(long = "dns")]
        dns_names: Vec<String>,
        /// IP address (repeatable).
        #[arg(long = "ip")]
        ips: Vec<IpAddr>,
        #[arg(long, default_value_t = 365)]
        days: u32,
        #[arg(long)]
        out: PathBuf,
    },
    /// Print what a PEM certificate file says: subject, issuer, serial, SANs, validity,
    /// fingerprint, days left and gateway identity.
    Inspect { file: PathBuf },
}

fn main() -> ExitCode {
    match run(Cli::parse().command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("aisix-certs: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Ca {
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
        Command::Gateway {
            ca_dir,
            env_id,
            dp_id,
            days,
            out,
        } => {
            let ca = CertificateAuthority::load(&ca_dir)?;
            let identity = GatewayIdentity::new(&env_id, &dp_id)?;
            let issued = ca.issue_gateway(&identity, DAY * days)?;
            write_bundle(&out, "gateway", &issued, ca.cert_pem())?;
        }
        Command::Server {
            ca_dir,
            dns_names,
            ips,
            days,
            out,
        } => {
            anyhow::ensure!(
                !dns_names.is_empty() || !ips.is_empty(),
                "give at least one --dns or --ip"
            );
            let ca = CertificateAuthority::load(&ca_dir)?;
            let issued = ca.issue_server(&dns_names, &ips, DAY * days)?;
            write_bundle(&out, "server", &issued, ca.cert_pem())?;
        }
        Command::Inspect { file } => {
            let pem = std::fs::read_to_string(&file)
                .with_context(|| format!("cannot read {}", file.display()))?;
            print_info(&file, &pem)?;
        }
    }
    Ok(())
}

fn write_bundle(out: &Path, name: &str, issued: &Issued, ca_pem: &str) -> anyhow::Result<()> {
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let files = [
        (format!("{name}.pem"), issued.cert_pem.as_str(), 0o644),
        (format!("{name}-key.pem"), issued.key_pem.expose(), 0o600),
        ("ca.pem".to_owned(), ca_pem, 0o644),
    ];
    for (file, contents, mode) in files {
        write_new_file(&out.join(&file), contents.as_bytes(), mode)?;
        println!("wrote {}", out.join(file).display());
    }
    Ok(())
}

fn print_info(file: &Path, pem: &str) -> anyhow::Result<()> {
    let infos = inspect_pem(&file.display().to_string(), pem)?;
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
