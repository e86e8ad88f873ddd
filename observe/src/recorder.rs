//! The process's metrics recorder: `metrics-exporter-prometheus`, installed
//! once as the global recorder of the `metrics` macros, with histogram
//! buckets fit for what fog measures. Without it (libraries in tests, the
//! simulation) the macros record nothing and cost next to nothing.

use std::sync::OnceLock;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Latencies from 100 µs to 10 s: acks, batches, disk syncs, snapshots.
pub const LATENCY_BUCKETS: &[f64] = &[0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];
/// Calls into a sensor, from 100 ns to 10 ms.
pub const CALL_BUCKETS: &[f64] = &[1e-7, 2.5e-7, 5e-7, 1e-6, 2.5e-6, 5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 1e-3, 1e-2];

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the recorder (the first call; later ones return its handle).
/// Histograms whose name ends in `_call_seconds` get [`CALL_BUCKETS`], all
/// others [`LATENCY_BUCKETS`].
pub fn install() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets(LATENCY_BUCKETS)
                .and_then(|b| b.set_buckets_for_metric(Matcher::Suffix("_call_seconds".into()), CALL_BUCKETS))
                .expect("the bucket lists are not empty");
            let recorder = builder.build_recorder();
            let handle = recorder.handle();
            // Fails only when another recorder was installed first: then
            // that one gets the macros' figures and this handle renders
            // nothing, which the process's tests would show.
            if metrics::set_global_recorder(recorder).is_err() {
                tracing::warn!("another metrics recorder is installed: /metrics will be empty");
            }
            handle
        })
        .clone()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_render_with_their_buckets() {
        let handle = install();
        metrics::histogram!("fog_test_ack_seconds").record(0.002);
        metrics::histogram!("fog_test_sensor_call_seconds").record(2e-6);
        metrics::counter!("fog_test_things_total", "reason" => "busy").increment(3);
        let text = handle.render();
        assert!(text.contains("fog_test_ack_seconds_bucket{le=\"0.0025\"} 1"), "{text}");
        assert!(text.contains("fog_test_sensor_call_seconds_bucket{le=\"0.0000025\"} 1") || text.contains("fog_test_sensor_call_seconds_bucket{le=\"2.5e-6\"} 1"), "{text}");
        assert!(text.contains("fog_test_things_total{reason=\"busy\"} 3"), "{text}");
        // A second install hands out the same recorder.
        assert!(install().render().contains("fog_test_things_total"));
    }
}
