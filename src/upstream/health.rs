//! Active health checks (`health_path`): every `health_interval`, a GET to each instance's
//! health path; `unhealthy_threshold` failures in a row take it out of rotation,
//! `healthy_threshold` good answers in a row bring it back (and end a passive ejection).
//!
//! A check is good when the instance answers 2xx within `health_timeout`; anything else (a
//! refused connection, a timeout, 503) is a failure. Instances start healthy, and the first
//! check runs at once.

use std::sync::Arc;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request};
use http_body_util::BodyExt;
use tokio_util::sync::CancellationToken;

use super::{ClientBody, HealthCheck, Upstream};

impl Upstream {
    /// Check instance `i` until `shutdown`.
    pub async fn health_loop(
        self: Arc<Self>,
        i: usize,
        check: HealthCheck,
        shutdown: CancellationToken,
    ) {
        let mut interval = tokio::time::interval(check.interval);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let (mut good, mut bad) = (0u32, 0u32);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = interval.tick() => {}
            }
            let label = &self.instances.target(i).label;
            match self.probe(i, &check).await {
                Ok(()) => {
                    (good, bad) = (good.saturating_add(1), 0);
                    let healthy = self.instances.healthy(i);
                    let back = !healthy && good >= check.healthy_threshold;
                    if back {
                        tracing::info!(event = "upstream_instance_up", instance = %label, checks = good, "upstream instance healthy again: back in rotation");
                    }
                    // Still up or back: either way a passive ejection ends.
                    if healthy || back {
                        self.instances.set_healthy(i, true);
                    }
                }
                Err(why) => {
                    (good, bad) = (0, bad.saturating_add(1));
                    if self.instances.healthy(i) && bad >= check.unhealthy_threshold {
                        tracing::warn!(event = "upstream_instance_down", instance = %label, checks = bad, reason = %why, "upstream instance failed its health checks: out of rotation");
                        self.instances.set_healthy(i, false);
                    } else {
                        tracing::debug!(instance = %label, reason = %why, "upstream health check failed");
                    }
                }
            }
        }
    }

    /// One check: `Ok` for a 2xx within the timeout, else why not.
    async fn probe(&self, i: usize, check: &HealthCheck) -> Result<(), String> {
        let target = self.instances.target(i);
        let uri = target
            .uri(&check.path, None)
            .map_err(|_| "the health path is not a valid path".to_string())?;
        let mut req = Request::new(ClientBody::whole(Bytes::new()));
        *req.method_mut() = Method::GET;
        *req.uri_mut() = uri;
        if self.config.protocol == super::UpstreamProtocol::Http2 {
            *req.version_mut() = http::Version::HTTP_2;
        }
        req.headers_mut().insert(header::HOST, target.host.clone());
        req.headers_mut().insert(
            header::USER_AGENT,
            HeaderValue::from_static("portcullis-health-check"),
        );
        let exchange = async {
            let resp = self
                .client
                .request(req)
                .await
                .map_err(|e| crate::error::chain(&e).to_string())?;
            let status = resp.status();
            // Read (a little of) the answer so the connection can be used again.
            let _ = http_body_util::Limited::new(resp.into_body(), 64 * 1024)
                .collect()
                .await;
            if status.is_success() {
                Ok(())
            } else {
                Err(format!("status {}", status.as_u16()))
            }
        };
        match tokio::time::timeout(check.timeout, exchange).await {
            Ok(r) => r,
            Err(_) => Err(format!("no answer within {:?}", check.timeout)),
        }
    }
}
