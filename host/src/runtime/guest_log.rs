//! A sensor's stdout and stderr, as lines of the host's log that carry the
//! sensor's id: a Python sensor's traceback, or a print left in for
//! debugging, is where an operator looks, instead of lost. A sensor cannot
//! flood the log with them: each stream keeps at most
//! [`LINES_PER_SECOND`] lines a second (the rest are counted, and the count
//! logged), and a line is cut at [`MAX_LINE`] bytes.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::io::AsyncWrite;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamResult};

/// Lines per second and stream that reach the log.
pub const LINES_PER_SECOND: u32 = 20;
/// Longest line kept, in bytes; the rest of it is cut.
pub const MAX_LINE: usize = 1024;

/// One stream (stdout or stderr) of one sensor.
#[derive(Clone)]
pub struct GuestLog {
    lines: Arc<Mutex<Lines>>,
}

struct Lines {
    sensor_id: u32,
    stream: &'static str,
    partial: Vec<u8>,
    cut: bool,
    window: Option<Instant>,
    in_window: u32,
    dropped: u64,
}

impl GuestLog {
    /// `stream` is `stdout` or `stderr`; stderr lines are warnings.
    pub fn new(sensor_id: u32, stream: &'static str) -> GuestLog {
        let lines = Lines { sensor_id, stream, partial: Vec::new(), cut: false, window: None, in_window: 0, dropped: 0 };
        GuestLog { lines: Arc::new(Mutex::new(lines)) }
    }

    fn write(&self, bytes: &[u8]) {
        self.lines.lock().unwrap_or_else(PoisonError::into_inner).take(bytes);
    }
}

impl Lines {
    fn take(&mut self, bytes: &[u8]) {
        for &b in bytes {
            if b == b'\n' {
                self.end_line();
            } else if self.partial.len() < MAX_LINE {
                self.partial.push(b);
            } else {
                self.cut = true;
            }
        }
    }

    fn end_line(&mut self) {
        let now = Instant::now();
        if self.window.is_none_or(|start| now >= start + Duration::from_secs(1)) {
            if self.dropped > 0 {
                tracing::warn!(sensor_id = self.sensor_id, "the sensor wrote {} more lines to {} than the log takes; they were dropped", self.dropped, self.stream);
                self.dropped = 0;
            }
            self.window = Some(now);
            self.in_window = 0;
        }
        self.in_window += 1;
        if self.in_window > LINES_PER_SECOND {
            self.dropped += 1;
        } else {
            let text = String::from_utf8_lossy(&self.partial);
            let cut = if self.cut { " [cut]" } else { "" };
            if self.stream == "stderr" {
                tracing::warn!(sensor_id = self.sensor_id, "sensor stderr: {text}{cut}");
            } else {
                tracing::info!(sensor_id = self.sensor_id, "sensor stdout: {text}{cut}");
            }
        }
        self.partial.clear();
        self.cut = false;
    }
}

impl Drop for Lines {
    /// What is left without a newline (a sensor that trapped mid-line).
    fn drop(&mut self) {
        if !self.partial.is_empty() {
            self.end_line();
        }
        if self.dropped > 0 {
            tracing::warn!(sensor_id = self.sensor_id, "the sensor wrote {} more lines to {} than the log takes; they were dropped", self.dropped, self.stream);
        }
    }
}

impl IsTerminal for GuestLog {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for GuestLog {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }

    fn async_stream(&self) -> Box<dyn AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

#[wasmtime_wasi::async_trait]
impl OutputStream for GuestLog {
    fn write(&mut self, bytes: Bytes) -> StreamResult<()> {
        GuestLog::write(self, &bytes);
        Ok(())
    }

    fn flush(&mut self) -> StreamResult<()> {
        Ok(())
    }

    fn check_write(&mut self) -> StreamResult<usize> {
        Ok(64 * 1024)
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for GuestLog {
    async fn ready(&mut self) {}
}

impl AsyncWrite for GuestLog {
    fn poll_write(self: Pin<&mut Self>, _: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        self.write(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(bytes: &[u8]) -> Lines {
        let mut lines = Lines { sensor_id: 1, stream: "stderr", partial: Vec::new(), cut: false, window: None, in_window: 0, dropped: 0 };
        lines.take(bytes);
        lines
    }

    #[test]
    fn a_flood_is_cut_to_the_rate_and_counted() {
        let flood = "Traceback (most recent call last):\n".repeat(1_000);
        let l = lines(flood.as_bytes());
        assert_eq!(l.in_window, 1_000);
        assert_eq!(l.dropped, u64::from(1_000 - LINES_PER_SECOND));
        assert!(l.partial.is_empty());
    }

    #[test]
    fn a_long_line_is_cut_and_a_partial_one_kept_until_its_newline() {
        let l = lines(&vec![b'x'; 10 * MAX_LINE]);
        assert_eq!(l.partial.len(), MAX_LINE);
        assert!(l.cut);
        let l = lines(b"no newline yet");
        assert_eq!(l.in_window, 0);
        assert_eq!(l.partial, b"no newline yet");
    }
}
