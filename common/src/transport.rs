//! How a data connection is tuned: which congestion controller its sender runs, and how many
//! bytes may be in flight. Both ends build their QUIC transport from a [`Transport`]; the
//! congestion controller matters at the sender (the source agent), the windows at both.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

/// A congestion controller quinn implements. Read from configs and command lines alike by
/// its [`FromStr`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Congestion {
    /// BBR: paces at the measured bottleneck rate and does not read loss as congestion, so a
    /// long path with random loss (1 % on an intercontinental link) stays full. The default.
    #[default]
    Bbr,
    /// CUBIC (quinn's own default): halves its window on loss; best on clean, shared paths.
    Cubic,
    /// NewReno: the classic loss-based controller.
    NewReno,
}

impl Congestion {
    /// Its name in configs and reports.
    pub fn name(self) -> &'static str {
        match self {
            Congestion::Bbr => "bbr",
            Congestion::Cubic => "cubic",
            Congestion::NewReno => "newreno",
        }
    }
}

impl fmt::Display for Congestion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A congestion controller name that is not one of ours.
#[derive(Debug, thiserror::Error)]
#[error("unknown congestion controller {0:?}: use bbr, cubic or newreno")]
pub struct UnknownCongestion(String);

impl FromStr for Congestion {
    type Err = UnknownCongestion;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "bbr" => Ok(Congestion::Bbr),
            "cubic" => Ok(Congestion::Cubic),
            "newreno" | "new-reno" | "reno" => Ok(Congestion::NewReno),
            _ => Err(UnknownCongestion(s.to_string())),
        }
    }
}

impl<'de> serde::Deserialize<'de> for Congestion {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// The connection window when nothing is known of the path: 16 MiB fills 1 Gbit/s up to
/// about 130 ms RTT, and keeps an agent within its memory budget (128 MiB at defaults: quinn
/// holds what is sent until it is acknowledged, and measured agent RSS grows by about 3 MiB
/// per MiB of window; `wan-bench` prints it). A longer or fatter path is configured
/// (`for_path`).
pub const DEFAULT_WINDOW: u64 = MIN_WINDOW;
/// The smallest connection window: below it a metro path cannot be filled.
pub const MIN_WINDOW: u64 = 16 * 1024 * 1024;
/// The largest connection window: the target may buffer this much per source it serves, so it is
/// bounded by what an agent may hold in memory.
pub const MAX_WINDOW: u64 = 256 * 1024 * 1024;
/// How often an idle data connection sends a keep-alive.
pub const KEEP_ALIVE: Duration = Duration::from_secs(2);
/// How long a data connection lives without hearing from its peer.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// Streams that must fit in a connection's window at once: one stream may use a quarter of it,
/// so one slow segment cannot take the whole window from the others in flight.
const STREAMS_PER_WINDOW: u64 = 4;

/// How a data connection is tuned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transport {
    /// The sender's congestion controller.
    pub congestion: Congestion,
    /// Bytes that may be in flight on one connection (receive and send windows).
    pub window: u64,
}

impl Default for Transport {
    fn default() -> Self {
        Transport {
            congestion: Congestion::default(),
            window: DEFAULT_WINDOW,
        }
    }
}

impl Transport {
    /// The transport for a path of `bandwidth_bps` at `rtt`: the window is twice the
    /// bandwidth-delay product (BBR probes above it; loss recovery needs room), within
    /// [`MIN_WINDOW`]..=[`MAX_WINDOW`].
    pub fn for_path(congestion: Congestion, bandwidth_bps: u64, rtt: Duration) -> Self {
        let bdp = (bandwidth_bps as u128 * rtt.as_micros() / 8 / 1_000_000) as u64;
        Transport {
            congestion,
            window: bdp.saturating_mul(2).clamp(MIN_WINDOW, MAX_WINDOW),
        }
    }

    /// The quinn transport settings.
    pub fn config(&self) -> quinn::TransportConfig {
        let mut t = quinn::TransportConfig::default();
        t.max_concurrent_bidi_streams(64u32.into());
        t.max_concurrent_uni_streams(0u32.into());
        let window = self.window.clamp(MIN_WINDOW, MAX_WINDOW);
        let var = |v: u64| quinn::VarInt::from_u64(v).expect("windows are far below 2^62");
        t.stream_receive_window(var(window / STREAMS_PER_WINDOW));
        t.receive_window(var(window));
        t.send_window(window);
        // A peer silent for 10 s (through keep-alives every 2 s) is gone: a source's segments
        // to a dead target are retried elsewhere or later after 10 s, not 30.
        t.keep_alive_interval(Some(KEEP_ALIVE));
        t.max_idle_timeout(Some(
            IDLE_TIMEOUT
                .try_into()
                .expect("10 s is a valid QUIC idle timeout"),
        ));
        match self.congestion {
            Congestion::Bbr => {
                t.congestion_controller_factory(Arc::new(quinn::congestion::BbrConfig::default()))
            }
            Congestion::Cubic => {
                t.congestion_controller_factory(Arc::new(quinn::congestion::CubicConfig::default()))
            }
            Congestion::NewReno => t.congestion_controller_factory(Arc::new(
                quinn::congestion::NewRenoConfig::default(),
            )),
        };
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_unknown_ones_are_refused() {
        for c in [Congestion::Bbr, Congestion::Cubic, Congestion::NewReno] {
            assert_eq!(c.name().parse::<Congestion>().unwrap(), c);
        }
        assert_eq!(" BBR ".parse::<Congestion>().unwrap(), Congestion::Bbr);
        let e = "vegas".parse::<Congestion>().unwrap_err().to_string();
        assert!(
            e.contains("vegas") && e.contains("bbr, cubic or newreno"),
            "{e}"
        );
        assert_eq!(Congestion::default(), Congestion::Bbr);
    }

    #[test]
    fn windows_follow_the_bandwidth_delay_product_within_bounds() {
        // 1 Gbit/s × 250 ms = 31.25 MB in flight: twice that.
        let t = Transport::for_path(Congestion::Bbr, 1_000_000_000, Duration::from_millis(250));
        assert_eq!(t.window, 62_500_000);
        // A metro path needs little, but gets the floor.
        let t = Transport::for_path(Congestion::Cubic, 100_000_000, Duration::from_millis(5));
        assert_eq!((t.window, t.congestion), (MIN_WINDOW, Congestion::Cubic));
        // 10 Gbit/s × 300 ms would be 750 MB: capped at what an agent may hold.
        let t = Transport::for_path(Congestion::Bbr, 10_000_000_000, Duration::from_millis(300));
        assert_eq!(t.window, MAX_WINDOW);
    }

    #[test]
    fn each_controller_builds_a_connection_that_carries_bytes() {
        // The controller is a factory inside quinn's config; what can be checked from outside
        // is that a connection built with each one works end to end.
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let ca = crate::pki::Ca::init(dir.path()).unwrap();
        let load = |who: crate::pki::Identity| {
            crate::tls::TlsMaterial::load(&ca.issue(&who, dir.path()).unwrap()).unwrap()
        };
        let (server_tls, client_tls) = (
            load(crate::pki::Identity::Agent("dst".into())),
            load(crate::pki::Identity::Agent("src".into())),
        );
        for c in [Congestion::Bbr, Congestion::Cubic, Congestion::NewReno] {
            let transport = Transport {
                congestion: c,
                window: MIN_WINDOW,
            };
            rt.block_on(async {
                let server = quinn::Endpoint::server(
                    server_tls.quic_server_with(&transport).unwrap(),
                    "127.0.0.1:0".parse().unwrap(),
                )
                .unwrap();
                let addr = server.local_addr().unwrap();
                let accept = tokio::spawn(async move {
                    let conn = server.accept().await.unwrap().await.unwrap();
                    let (_send, mut recv) = conn.accept_bi().await.unwrap();
                    recv.read_to_end(1 << 20).await.unwrap()
                });
                let mut client = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
                client.set_default_client_config(client_tls.quic_client_with(&transport).unwrap());
                let conn = client
                    .connect(addr, &crate::names::agent_dns("dst"))
                    .unwrap()
                    .await
                    .unwrap();
                let (mut send, _recv) = conn.open_bi().await.unwrap();
                send.write_all(&[7u8; 256 * 1024]).await.unwrap();
                send.finish().unwrap();
                let got = accept.await.unwrap();
                assert_eq!(got.len(), 256 * 1024, "{c}");
            });
        }
    }
}
