//! The transport ceiling: a raw QUIC blast (quinn with ferry's TLS and transport settings,
//! bytes only) from side A to a sink in side B, run as this binary's hidden subcommands.

use std::path::PathBuf;

use ferry_common::names;
use ferry_common::pki::{Ca, Identity};
use ferry_common::tls::TlsMaterial;

/// Internal: the two ends of the raw QUIC blast, run inside the namespaces.
#[derive(clap::Subcommand)]
pub enum Helper {
    /// Accept connections and read every stream to its end, acknowledging each.
    QuicSink {
        #[arg(long)]
        listen: std::net::SocketAddr,
        #[arg(long)]
        pki: PathBuf,
    },
    /// Send `bytes` over `streams` streams to the sink, then exit.
    QuicBlast {
        #[arg(long)]
        connect: std::net::SocketAddr,
        #[arg(long)]
        pki: PathBuf,
        #[arg(long)]
        bytes: u64,
        #[arg(long, default_value_t = 8)]
        streams: u64,
        /// Congestion controller: cubic (quinn's default) or bbr (ferry's default).
        #[arg(long, default_value = "cubic")]
        cc: String,
    },
}

/// Runs one end of the blast.
pub fn run(h: Helper) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        match h {
            Helper::QuicSink { listen, pki } => {
                let ca = Ca::load(&pki)?;
                let tls = TlsMaterial::load(
                    &ca.issue_if_missing(&Identity::Agent("sink".into()), &pki)?,
                )?;
                let ep = quinn::Endpoint::server(tls.quic_server()?, listen)?;
                while let Some(inc) = ep.accept().await {
                    tokio::spawn(async move {
                        let Ok(conn) = inc.await else { return };
                        while let Ok((mut send, mut recv)) = conn.accept_bi().await {
                            tokio::spawn(async move {
                                let mut buf = vec![0u8; 1 << 20];
                                while let Ok(Some(_)) = recv.read(&mut buf).await {}
                                let _ = send.write_all(b"k").await;
                                let _ = send.finish();
                                let _ = send.stopped().await;
                            });
                        }
                    });
                }
                Ok(())
            }
            Helper::QuicBlast {
                connect,
                pki,
                bytes,
                streams,
                cc,
            } => {
                let ca = Ca::load(&pki)?;
                let tls = TlsMaterial::load(
                    &ca.issue_if_missing(&Identity::Agent("blast".into()), &pki)?,
                )?;
                let mut ep = quinn::Endpoint::client("0.0.0.0:0".parse()?)?;
                let congestion: ferry_common::transport::Congestion = cc.parse()?;
                let transport = ferry_common::transport::Transport {
                    congestion,
                    ..Default::default()
                };
                let client = tls.quic_client_with(&transport)?;
                ep.set_default_client_config(client);
                let conn = ep.connect(connect, &names::agent_dns("sink"))?.await?;
                let per = bytes.div_ceil(streams.max(1));
                let mut tasks = Vec::new();
                for i in 0..streams.max(1) {
                    let conn = conn.clone();
                    let len = per.min(bytes.saturating_sub(i * per));
                    tasks.push(tokio::spawn(async move {
                        let (mut send, mut recv) = conn.open_bi().await?;
                        let chunk = vec![0x5au8; 1 << 20];
                        let mut left = len;
                        while left > 0 {
                            let n = left.min(chunk.len() as u64) as usize;
                            send.write_all(&chunk[..n]).await?;
                            left -= n as u64;
                        }
                        send.finish()?;
                        let mut ack = [0u8; 1];
                        recv.read_exact(&mut ack).await?;
                        anyhow::Ok(())
                    }));
                }
                for t in tasks {
                    t.await??;
                }
                conn.close(0u32.into(), b"done");
                ep.wait_idle().await;
                Ok(())
            }
        }
    })
}
