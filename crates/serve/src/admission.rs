//! Admission control: at most `--max-concurrent-requests` completions and predictions are in the server
//! at once (queued or running), as TGI's `max_concurrent_requests`; one more is refused at once with a
//! 503 and `Retry-After`, before its body is read.
//!
//! A request takes a [`Permit`] before its body is read and holds it until its response body has been
//! written out or dropped (a stream holds it to its end): the permit rides in the body ([`HeldBody`]).
//! So the queues behind it are bounded too: the job queue and a worker's waiting list hold at most
//! `max_concurrent_requests × max_prompts` sequences, and the request bodies being read at most
//! `max_concurrent_requests × max_body_bytes` bytes.

use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::body::{Body, Bytes, HttpBody};
use prometheus_client::metrics::gauge::Gauge;

/// The count of requests admitted and the limit.
#[derive(Debug)]
pub struct Admission {
    limit: usize,
    in_flight: AtomicUsize,
    gauge: Gauge,
}

/// One admitted request; dropping it frees its place.
#[derive(Debug)]
pub struct Permit(Arc<Admission>);

impl Admission {
    /// At most `limit` (≥ 1) requests at once, the count mirrored in `gauge`.
    pub fn new(limit: usize, gauge: Gauge) -> Arc<Self> {
        Arc::new(Admission { limit: limit.max(1), in_flight: AtomicUsize::new(0), gauge })
    }

    /// A place, or `None` when all `limit` are taken.
    pub fn try_admit(self: &Arc<Self>) -> Option<Permit> {
        let mut now = self.in_flight.load(Ordering::Relaxed);
        loop {
            if now >= self.limit {
                return None;
            }
            match self.in_flight.compare_exchange_weak(now, now + 1, Ordering::AcqRel, Ordering::Relaxed) {
                Ok(_) => {
                    self.gauge.inc();
                    return Some(Permit(self.clone()));
                }
                Err(seen) => now = seen,
            }
        }
    }

    /// Requests admitted now.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// The limit.
    pub fn limit(&self) -> usize {
        self.limit
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
        self.0.gauge.dec();
    }
}

/// A response body that holds its request's [`Permit`] until it ends or is dropped.
pub struct HeldBody {
    inner: Body,
    permit: Option<Permit>,
}

impl HeldBody {
    /// `inner`, holding `permit`.
    pub fn new(inner: Body, permit: Permit) -> Self {
        HeldBody { inner, permit: Some(permit) }
    }
}

impl HttpBody for HeldBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_frame(cx);
        if let Poll::Ready(None) = r {
            this.permit = None; // written out: the place is free before the connection is
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn places_are_given_up_to_the_limit_and_freed_when_dropped() {
        let gauge = Gauge::default();
        let a = Admission::new(2, gauge.clone());
        let p1 = a.try_admit().unwrap();
        let p2 = a.try_admit().unwrap();
        assert!(a.try_admit().is_none(), "a third place past the limit of 2");
        assert_eq!((a.in_flight(), gauge.get()), (2, 2));
        drop(p1);
        let p3 = a.try_admit().expect("a freed place is given again");
        drop((p2, p3));
        assert_eq!((a.in_flight(), gauge.get()), (0, 0));
    }

    #[test]
    fn threads_racing_for_places_never_hold_more_than_the_limit() {
        let a = Admission::new(3, Gauge::default());
        let most = Arc::new(AtomicUsize::new(0));
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let (a, most) = (a.clone(), most.clone());
                std::thread::spawn(move || {
                    let mut admitted = 0;
                    for _ in 0..2000 {
                        if let Some(p) = a.try_admit() {
                            admitted += 1;
                            most.fetch_max(a.in_flight(), Ordering::Relaxed);
                            drop(p);
                        }
                    }
                    admitted
                })
            })
            .collect();
        let admitted: usize = threads.into_iter().map(|t| t.join().unwrap()).sum();
        assert!(admitted > 0);
        assert!(most.load(Ordering::Relaxed) <= 3, "{} held at once", most.load(Ordering::Relaxed));
        assert_eq!(a.in_flight(), 0);
    }

    #[tokio::test]
    async fn a_held_body_keeps_its_place_until_written_out() {
        use http_body_util::BodyExt;
        let a = Admission::new(1, Gauge::default());
        let body = HeldBody::new(Body::from("hello"), a.try_admit().unwrap());
        assert!(a.try_admit().is_none(), "the place is free before the body is written");
        let bytes = Body::new(body).collect().await.unwrap().to_bytes();
        assert_eq!(&bytes[..], b"hello");
        assert_eq!(a.in_flight(), 0);
        // Dropped unwritten (a client gone): freed too.
        let body = HeldBody::new(Body::from("x"), a.try_admit().unwrap());
        drop(body);
        assert_eq!(a.in_flight(), 0);
    }
}
