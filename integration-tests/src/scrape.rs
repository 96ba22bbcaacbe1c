//! Reading a daemon's operations endpoint the way Prometheus and a load balancer do: a plain
//! HTTP/1.1 GET, and the OpenMetrics text parsed into samples.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;

use anyhow::{bail, Context};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// `GET path` from `addr`: the status code and the body.
pub async fn get(addr: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    let mut s = tokio::net::TcpStream::connect(addr)
        .await
        .with_context(|| format!("connect to {addr}"))?;
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).await?;
    let text = String::from_utf8(raw).context("the answer is not UTF-8")?;
    let Some((head, body)) = text.split_once("\r\n\r\n") else {
        bail!("no HTTP answer from {addr}{path}: {text:?}");
    };
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("no status in {head:?}"))?;
    Ok((status, body.to_string()))
}

/// One scrape: each sample's value by its series (`name{labels}` exactly as exposed), and the
/// names a query may use (families with their type's suffixes: `_total`, `_bucket`, …).
#[derive(Debug, Default)]
pub struct Scrape {
    /// Value by series.
    pub samples: BTreeMap<String, f64>,
    /// Sample names the families declare.
    pub names: BTreeSet<String>,
}

impl Scrape {
    /// Parses OpenMetrics text.
    pub fn parse(text: &str) -> anyhow::Result<Scrape> {
        let mut out = Scrape::default();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let mut w = rest.split_whitespace();
                let (Some(name), Some(kind)) = (w.next(), w.next()) else {
                    bail!("bad TYPE line {line:?}");
                };
                let suffixes: &[&str] = match kind {
                    "counter" => &["_total", "_created"],
                    "histogram" => &["_bucket", "_sum", "_count", "_created"],
                    _ => &[""],
                };
                for s in suffixes {
                    out.names.insert(format!("{name}{s}"));
                }
                continue;
            }
            if line.starts_with('#') || line.is_empty() {
                continue;
            }
            let Some((series, value)) = line.rsplit_once(' ') else {
                bail!("bad sample line {line:?}");
            };
            let v: f64 = value
                .parse()
                .with_context(|| format!("bad value in {line:?}"))?;
            out.samples.insert(series.to_string(), v);
        }
        Ok(out)
    }

    /// The value of `series`, if exposed.
    pub fn get(&self, series: &str) -> Option<f64> {
        self.samples.get(series).copied()
    }

    /// The value of `series`, or 0 when it is not exposed (yet).
    pub fn value(&self, series: &str) -> f64 {
        self.get(series).unwrap_or(0.0)
    }
}

/// Scrapes `/metrics` at `addr`.
pub async fn metrics(addr: SocketAddr) -> anyhow::Result<Scrape> {
    let (status, body) = get(addr, "/metrics").await?;
    if status != 200 {
        bail!("/metrics at {addr} answered {status}: {body}");
    }
    Scrape::parse(&body)
}

/// The `ferry_…` metric names a PromQL text (a dashboard's or an alert rule's) refers to.
pub fn metric_names_in(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let b = text.as_bytes();
    let mut i = 0;
    while let Some(at) = text[i..].find("ferry_") {
        let start = i + at;
        let before_ok =
            start == 0 || !(b[start - 1].is_ascii_alphanumeric() || b[start - 1] == b'_');
        let mut end = start;
        while end < b.len() && (b[end].is_ascii_alphanumeric() || b[end] == b'_') {
            end += 1;
        }
        if before_ok {
            out.insert(text[start..end].to_string());
        }
        i = end;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_samples_and_family_names() {
        let s = Scrape::parse(
            "# HELP a_b Things.\n# TYPE a_b counter\na_b_total{x=\"1 2\"} 3\n# TYPE h histogram\nh_bucket{le=\"+Inf\"} 2\nh_count 2\n# EOF\n",
        )
        .unwrap();
        assert_eq!(s.get("a_b_total{x=\"1 2\"}"), Some(3.0));
        assert_eq!(s.value("h_count"), 2.0);
        assert!(s.names.contains("a_b_total") && s.names.contains("h_sum"));
        assert!(!s.names.contains("a_b"));
    }

    #[test]
    fn finds_the_metric_names_a_query_uses() {
        let n = metric_names_in(
            "sum(rate(ferry_bytes_sent_total[5m])) / max by (migration) (ferry_migration_bytes{x=\"ferry_no\"}) + my_ferry_x",
        );
        let want: BTreeSet<String> = [
            "ferry_bytes_sent_total",
            "ferry_migration_bytes",
            "ferry_no",
        ]
        .map(String::from)
        .into();
        assert_eq!(n, want);
    }
}
