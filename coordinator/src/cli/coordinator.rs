//! `ferry-coordinator`: a node of the coordinator cluster, and the PKI commands that create the
//! cluster CA and issue certificates.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use ferry_common::pki::{Ca, Identity};

#[derive(Parser)]
#[command(
    name = "ferry-coordinator",
    version,
    about = "ferry coordinator node (Raft on sled) and cluster PKI"
)]
struct Cli {
    /// Log one JSON object per line.
    #[arg(long, global = true, env = "FERRY_JSON_LOGS", value_parser = clap::builder::BoolishValueParser::new())]
    json_logs: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the node until SIGTERM or SIGINT.
    Run {
        /// Config file.
        #[arg(
            long,
            env = "FERRY_COORDINATOR_CONFIG",
            default_value = "/etc/ferry/coordinator.toml"
        )]
        config: PathBuf,
    },
    /// Manage the cluster's certificates.
    #[command(subcommand)]
    Pki(Pki),
}

#[derive(Subcommand)]
enum Pki {
    /// Create the cluster CA (ca.pem, ca.key) in DIR. Refuses to replace an existing one.
    Init {
        /// PKI directory.
        #[arg(long)]
        dir: PathBuf,
        /// How long the CA is valid, in days [default: 3650].
        #[arg(long, value_parser = days)]
        ca_days: Option<u64>,
    },
    /// Issue a certificate signed by the CA in DIR; writes <kind>-<name>.pem and .key there.
    /// The key is made on the CA's host: for a key made where it is used, `request` and `sign`.
    Issue(Issue),
    /// Make a key and a certificate request (CSR) in DIR on the host that will use them
    /// (<kind>-<name>.key, 0600, and .csr); the key never leaves it. The CA's host certifies
    /// the request with `pki sign`. Never replaces a file.
    Request {
        /// Where the key and the request go.
        #[arg(long)]
        dir: PathBuf,
        #[command(flatten)]
        who: Who,
    },
    /// Certify a request made with `pki request`, with the CA in DIR: writes the certificate
    /// next to the request (<kind>-<name>.pem). Only the request's key is certified; the name
    /// and role are those given here. Never replaces a file.
    Sign {
        /// PKI directory holding ca.pem and ca.key.
        #[arg(long)]
        dir: PathBuf,
        /// The request (`pki request` wrote it).
        #[arg(long)]
        csr: PathBuf,
        #[command(flatten)]
        who: Who,
        #[command(flatten)]
        lifetime: Lifetime,
        /// With --admin: what the certificate allows (viewer, operator, admin).
        #[arg(long, default_value = "admin", requires = "admin")]
        role: ferry_common::names::Role,
    },
    /// Replace the cluster CA in DIR without stopping anything, in three steps run days
    /// apart: `begin` (a new CA beside the old one in ca.pem), `switch` (the new one signs),
    /// `finish` (the old one is retired). Each step says what to do before the next.
    RotateCa {
        /// Which step.
        #[arg(value_enum)]
        step: RotateStep,
        /// PKI directory holding ca.pem and ca.key.
        #[arg(long)]
        dir: PathBuf,
        /// With begin: how long the new CA is valid, in days [default: 3650].
        #[arg(long, value_parser = days)]
        ca_days: Option<u64>,
    },
}

/// A number of days, at least one.
fn days(s: &str) -> Result<u64, String> {
    match s.parse::<u64>() {
        Ok(0) | Err(_) => Err(format!("{s:?} is not a number of days (1 or more)")),
        Ok(n) if n > 100 * 365 => Err(format!("{n} days is more than a hundred years")),
        Ok(n) => Ok(n),
    }
}

fn days_secs(days: u64) -> std::time::Duration {
    std::time::Duration::from_secs(days * 86_400)
}

#[derive(Args)]
struct Lifetime {
    /// How long the certificate is valid, in days [default: agents 7, operators 90,
    /// coordinators 365]. Running agents and coordinators renew theirs when a third is
    /// left; operators with `ferryctl certs renew`.
    #[arg(long, value_parser = days)]
    days: Option<u64>,
}

impl Lifetime {
    fn of(&self, id: &Identity) -> std::time::Duration {
        self.days.map_or_else(|| id.default_lifetime(), days_secs)
    }
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum RotateStep {
    Begin,
    Switch,
    Finish,
}

#[derive(Args)]
#[group(required = true, multiple = false)]
struct Who {
    /// An agent certificate, for the agent of this name.
    #[arg(long)]
    agent: Option<String>,
    /// An admin (ferryctl) certificate, for this operator name.
    #[arg(long)]
    admin: Option<String>,
    /// A coordinator node certificate, for this node id.
    #[arg(long)]
    coordinator: Option<u64>,
}

impl Who {
    /// The identity named, with `role` for an operator.
    fn identity(self, role: ferry_common::names::Role) -> anyhow::Result<Identity> {
        let id = match (self.agent, self.admin, self.coordinator) {
            (Some(n), _, _) => Identity::Agent(n),
            (_, Some(n), _) => Identity::User(n, role),
            (_, _, Some(id)) => Identity::Coordinator(id),
            _ => unreachable!("clap requires exactly one"),
        };
        if let Identity::Agent(n) | Identity::User(n, _) = &id {
            ferry_common::names::validate_name(n)?;
        }
        Ok(id)
    }
}

#[derive(Args)]
struct Issue {
    /// PKI directory holding ca.pem and ca.key.
    #[arg(long)]
    dir: PathBuf,
    #[command(flatten)]
    who: Who,
    /// With --admin: what the certificate allows — viewer (reads), operator (also changes
    /// migrations), admin (also cluster membership).
    #[arg(long, default_value = "admin", requires = "admin")]
    role: ferry_common::names::Role,
    #[command(flatten)]
    lifetime: Lifetime,
}

/// The binary's entry point.
#[tokio::main]
pub async fn main() -> anyhow::Result<()> {
    // Fault points named in FAILPOINTS (tests of crashes; see `ferry_common::fault_point!`).
    #[cfg(feature = "failpoints")]
    let _faults = fail::FailScenario::setup();
    let cli = Cli::parse();
    let logging = ferry_common::telemetry::init("info,openraft=warn", cli.json_logs);
    match cli.cmd {
        Cmd::Pki(Pki::Init { dir, ca_days }) => {
            Ca::init_for(
                &dir,
                ca_days.map_or(ferry_common::pki::CA_LIFETIME, days_secs),
            )?;
            println!("created cluster CA in {}", dir.display());
            Ok(())
        }
        Cmd::Pki(Pki::RotateCa { step, dir, ca_days }) => {
            if ca_days.is_some() && !matches!(step, RotateStep::Begin) {
                anyhow::bail!("--ca-days goes with `rotate-ca begin` (which makes the new CA)");
            }
            let bundle = dir.join("ca.pem");
            match step {
                RotateStep::Begin => {
                    Ca::rotate_begin_for(
                        &dir,
                        ca_days.map_or(ferry_common::pki::CA_LIFETIME, days_secs),
                    )?;
                    println!(
                        "{} now holds the old and a new CA (new key: {}).\n\
                         Next: copy {} to every coordinator's tls.ca and restart them one at a \
                         time; agents learn both CAs from their next heartbeat (their log says \
                         \"Now trusting the CA certificates\"). Then run `pki rotate-ca switch`.",
                        bundle.display(),
                        dir.join("ca.next.key").display(),
                        bundle.display()
                    );
                }
                RotateStep::Switch => {
                    Ca::rotate_switch(&dir)?;
                    println!(
                        "{} is now the new CA's key (the old one is ca.old.key).\n\
                         Next: copy it to every coordinator that signs (ca_key) and restart them \
                         one at a time: certificates are signed by the new CA from then on, and \
                         agents get one at their next renewal. Issue new coordinator and \
                         operator certificates. When `ferryctl certs list` shows no certificate \
                         of the old CA still valid, run `pki rotate-ca finish`.",
                        dir.join("ca.key").display()
                    );
                }
                RotateStep::Finish => {
                    Ca::rotate_finish(&dir)?;
                    println!(
                        "{} holds the new CA only; ca.old.key is removed.\n\
                         Next: copy {} to every coordinator's tls.ca and restart them one at a \
                         time; agents learn it from their next heartbeat.",
                        bundle.display(),
                        bundle.display()
                    );
                }
            }
            Ok(())
        }
        Cmd::Pki(Pki::Request { dir, who }) => {
            // An operator's role is given by `sign`; the request carries only the key.
            let id = who.identity(ferry_common::names::Role::Viewer)?;
            let (key, csr) = ferry_common::pki::write_request(&id, &dir)?;
            println!(
                "wrote {} (keep it on this host) and {}: certify it where the CA's key is with \
                 `ferry-coordinator pki sign --dir <pki dir> --csr {} ...`, then copy the \
                 certificate back here",
                key.display(),
                csr.display(),
                csr.display()
            );
            Ok(())
        }
        Cmd::Pki(Pki::Sign {
            dir,
            csr,
            who,
            role,
            lifetime,
        }) => {
            let id = who.identity(role)?;
            let der = ferry_common::pki::read_request(&csr)?;
            let ca = Ca::load(&dir)
                .with_context(|| format!("cannot load the CA from {}", dir.display()))?;
            let (pem, info) =
                ca.sign_request(&der, &id, std::time::SystemTime::now(), lifetime.of(&id))?;
            let cert = csr.with_file_name(format!("{}.pem", id.file_stem()));
            ferry_common::pki::create_file(&cert, &pem, 0o644)?;
            println!(
                "wrote {} (serial {}, valid until {})",
                cert.display(),
                info.serial,
                ferry_common::text::utc(info.not_after.max(0) as u64 * 1000)
            );
            Ok(())
        }
        Cmd::Pki(Pki::Issue(Issue {
            dir,
            who,
            role,
            lifetime,
        })) => {
            let id = who.identity(role)?;
            let paths = Ca::load(&dir)
                .with_context(|| format!("cannot load the CA from {}; run `ferry-coordinator pki init --dir {}` first", dir.display(), dir.display()))?
                .issue_for(&id, &dir, lifetime.of(&id))?;
            println!("wrote {} and {}", paths.cert.display(), paths.key.display());
            Ok(())
        }
        Cmd::Run { config } => {
            let (cfg, started) =
                ferry_common::config::load_daemon::<crate::node::CoordinatorConfig>(&config)?;
            logging
                .apply(cfg.log_level.as_deref())
                .with_context(|| format!("config {}", config.display()))?;
            let node = crate::node::start(cfg).await.with_context(|| {
                format!("coordinator failed to start (config {})", config.display())
            })?;
            ferry_common::systemd::notify("READY=1");
            let raft = node.raft.clone();
            ferry_common::systemd::wait_for_signal(
                || logging.reload::<crate::node::CoordinatorConfig>(&config, &started, |_| &[]),
                || {
                    let m = raft.metrics().borrow().clone();
                    let leader = m
                        .current_leader
                        .map_or("no leader known".to_string(), |l| format!("leader {l}"));
                    format!(
                        "node {} {:?}, {leader}, term {}, applied {}",
                        m.id,
                        m.state,
                        m.current_term,
                        m.last_applied.map_or(0, |l| l.index)
                    )
                },
            )
            .await
            .context("cannot install signal handlers")?;
            tracing::info!(message = "Stopping.");
            ferry_common::systemd::notify("STOPPING=1");
            node.shutdown().await;
            Ok(())
        }
    }
}
