//! The operations endpoint a daemon serves over plain HTTP when its config sets `metrics_listen`:
//! `/metrics` (OpenMetrics text, which Prometheus scrapes), `/livez` (the process answers) and
//! `/readyz` (it can do its job: 200, or 503 with the reason). Metrics are read when scraped,
//! by the daemon's [`Collector`]s, from the counters and state it keeps anyway: nothing is
//! counted twice.

use std::net::SocketAddr;
use std::sync::Arc;

use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

pub use prometheus_client;
pub use prometheus_client::collector::Collector;
pub use prometheus_client::encoding::DescriptorEncoder as Encoder;
pub use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};

/// Label pairs of one sample.
pub type Labels = Vec<(&'static str, String)>;

/// Whether the daemon is ready, and if not, why.
pub type Readiness = Arc<dyn Fn() -> Result<(), String> + Send + Sync>;

/// A counter without labels (`name` without its `_total`, which the encoding adds).
pub fn counter(enc: &mut DescriptorEncoder, name: &str, help: &str, v: u64) -> std::fmt::Result {
    ConstCounter::new(v).encode(enc.encode_descriptor(name, help, None, MetricType::Counter)?)
}

/// A counter family: one sample per label set.
pub fn counters(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    rows: impl IntoIterator<Item = (Labels, u64)>,
) -> std::fmt::Result {
    let mut family = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (labels, v) in rows {
        ConstCounter::new(v).encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}

/// A gauge without labels.
pub fn gauge(enc: &mut DescriptorEncoder, name: &str, help: &str, v: f64) -> std::fmt::Result {
    ConstGauge::new(v).encode(enc.encode_descriptor(name, help, None, MetricType::Gauge)?)
}

/// A gauge family: one sample per label set.
pub fn gauges(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    rows: impl IntoIterator<Item = (Labels, f64)>,
) -> std::fmt::Result {
    let mut family = enc.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (labels, v) in rows {
        ConstGauge::new(v).encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}

/// A histogram without labels.
pub fn histogram(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    h: &Histogram,
) -> std::fmt::Result {
    h.encode(enc.encode_descriptor(name, help, None, MetricType::Histogram)?)
}

/// The process's own figures every daemon exports: resident memory and start time, under the
/// names Prometheus's client libraries use (`process_…`).
#[derive(Debug)]
pub struct ProcessCollector {
    started: f64,
}

impl Default for ProcessCollector {
    fn default() -> Self {
        let started = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        ProcessCollector { started }
    }
}

/// This process's resident set in bytes (`/proc/self/statm`), if it can be read.
pub fn resident_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * rustix::param::page_size() as u64)
}

impl Collector for ProcessCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> std::fmt::Result {
        if let Some(rss) = resident_bytes() {
            gauge(
                &mut enc,
                "process_resident_memory_bytes",
                "Resident memory size in bytes.",
                rss as f64,
            )?;
        }
        gauge(
            &mut enc,
            "process_start_time_seconds",
            "Start time of the process since the Unix epoch in seconds.",
            self.started,
        )
    }
}

/// Starting the operations endpoint failed.
#[derive(Debug, thiserror::Error)]
#[error("cannot serve metrics on {addr}: {source}; change metrics_listen or free the port")]
pub struct OpsError {
    /// The configured address.
    pub addr: SocketAddr,
    /// Why.
    pub source: std::io::Error,
}

/// A running operations endpoint; stops when dropped or [`OpsServer::stop`]ped.
pub struct OpsServer {
    /// Where it listens.
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl OpsServer {
    /// Stops serving.
    pub fn stop(self) {}
}

impl Drop for OpsServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[derive(Clone)]
struct Shared {
    registry: Arc<Registry>,
    ready: Readiness,
}

/// The content type of the OpenMetrics text exposition.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Serves `/metrics` from `registry` (plus [`ProcessCollector`]), `/livez` and `/readyz` (from
/// `ready`) on `listen` over plain HTTP/1.1. Logs "Metrics serving." with the bound address.
pub async fn serve(
    listen: SocketAddr,
    mut registry: Registry,
    ready: Readiness,
) -> Result<OpsServer, OpsError> {
    use axum::http::{header, StatusCode};
    use axum::routing::get;
    registry.register_collector(Box::new(ProcessCollector::default()));
    let shared = Shared {
        registry: Arc::new(registry),
        ready,
    };
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|source| OpsError {
            addr: listen,
            source,
        })?;
    let addr = listener.local_addr().map_err(|source| OpsError {
        addr: listen,
        source,
    })?;
    let app = axum::Router::new()
        .route(
            "/metrics",
            get(
                |axum::extract::State(s): axum::extract::State<Shared>| async move {
                    let mut text = String::new();
                    match prometheus_client::encoding::text::encode(&mut text, &s.registry) {
                        Ok(()) => (StatusCode::OK, [(header::CONTENT_TYPE, CONTENT_TYPE)], text),
                        Err(_) => (
                            StatusCode::INTERNAL_SERVER_ERROR,
                            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
                            "metrics could not be encoded\n".to_string(),
                        ),
                    }
                },
            ),
        )
        .route("/livez", get(|| async { "ok\n" }))
        .route(
            "/readyz",
            get(
                |axum::extract::State(s): axum::extract::State<Shared>| async move {
                    match (s.ready)() {
                        Ok(()) => (StatusCode::OK, "ok\n".to_string()),
                        Err(why) => (
                            StatusCode::SERVICE_UNAVAILABLE,
                            format!("not ready: {why}\n"),
                        ),
                    }
                },
            ),
        )
        .with_state(shared);
    let task = tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::warn!(message = "The metrics endpoint stopped.", error = %e);
        }
    });
    tracing::info!(message = "Metrics serving.", %addr);
    Ok(OpsServer { addr, task })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Fixed;

    impl Collector for Fixed {
        fn encode(&self, mut enc: DescriptorEncoder) -> std::fmt::Result {
            counter(&mut enc, "ferry_things", "Things.", 7)?;
            gauges(
                &mut enc,
                "ferry_by_kind",
                "By kind.",
                [
                    (vec![("kind", "a".to_string())], 1.0),
                    (vec![("kind", "b\"c".to_string())], 2.5),
                ],
            )
        }
    }

    async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        let status = out[9..12].parse().unwrap();
        let body = out.split_once("\r\n\r\n").unwrap().1.to_string();
        (status, body)
    }

    #[tokio::test]
    async fn serves_metrics_liveness_and_readiness() {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(Fixed));
        let ready = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let r = ready.clone();
        let server = serve(
            "127.0.0.1:0".parse().unwrap(),
            registry,
            Arc::new(move || {
                if r.load(std::sync::atomic::Ordering::SeqCst) {
                    Ok(())
                } else {
                    Err("no leader known".into())
                }
            }),
        )
        .await
        .unwrap();
        let (status, body) = get(server.addr, "/metrics").await;
        assert_eq!(status, 200);
        assert!(
            body.contains("# TYPE ferry_things counter\nferry_things_total 7\n"),
            "{body}"
        );
        assert!(body.contains("ferry_by_kind{kind=\"a\"} 1.0\n"), "{body}");
        assert!(
            body.contains("ferry_by_kind{kind=\"b\\\"c\"} 2.5\n"),
            "{body}"
        );
        assert!(body.contains("process_resident_memory_bytes "), "{body}");
        assert!(body.ends_with("# EOF\n"), "{body}");
        assert_eq!(get(server.addr, "/livez").await, (200, "ok\n".into()));
        assert_eq!(
            get(server.addr, "/readyz").await,
            (503, "not ready: no leader known\n".into())
        );
        ready.store(true, std::sync::atomic::Ordering::SeqCst);
        assert_eq!(get(server.addr, "/readyz").await, (200, "ok\n".into()));
        assert_eq!(get(server.addr, "/nope").await.0, 404);
        let addr = server.addr;
        server.stop();
        tokio::task::yield_now().await;
        // The listener is closed once the task is gone.
        let mut refused = false;
        for _ in 0..100 {
            if tokio::net::TcpStream::connect(addr).await.is_err() {
                refused = true;
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert!(refused, "the endpoint still accepts connections after stop");
    }
}
