//! The client's transport loop: connects (directly or through the node's cloud proxy), joins,
//! answers the aggregator's frames with the [`FederatedLearning`] state machine (training runs
//! on a blocking thread), and reconnects with jittered, growing backoff when the connection
//! drops or the aggregator asks it to come back — the round resumes where it was (a round
//! already answered is answered again from the kept update, never trained twice).

use std::future::Future;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};

use super::wire::{self, WireLimits};
use super::{ClientState, Estimator, FederatedLearning, FlError};
use crate::joint::Backoff;

/// How the loop behaves.
#[derive(Debug, Clone, Copy)]
pub struct ClientOptions {
    /// First wait before reconnecting (jittered, doubling).
    pub backoff_base: Duration,
    /// Longest wait between attempts.
    pub backoff_cap: Duration,
    /// Give up after this many failed connection attempts in a row (`None`: never).
    pub max_attempts: Option<u32>,
    /// Frame limits.
    pub limits: WireLimits,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            backoff_base: Duration::from_millis(500),
            backoff_cap: Duration::from_secs(30),
            max_attempts: None,
            limits: WireLimits::default(),
        }
    }
}

/// Why the loop ended without the job finishing.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The protocol failed for good (rejected, malformed frames, the estimator's error on a
    /// message it cannot answer).
    #[error(transparent)]
    Protocol(#[from] FlError),
    /// The aggregator stayed unreachable for `max_attempts` attempts.
    #[error("the aggregator stayed unreachable ({attempts} attempts): {last}")]
    Unreachable {
        /// Attempts made.
        attempts: u32,
        /// The last error.
        last: String,
    },
}

/// Runs `client` until the job finishes (the estimator then holds the final weights) or fails
/// for good; `connect` opens a new stream for each attempt.
pub async fn run<E, C, F, S>(
    mut client: FederatedLearning<E>,
    mut connect: C,
    options: ClientOptions,
) -> Result<FederatedLearning<E>, ClientError>
where
    E: Estimator + Send + 'static,
    C: FnMut() -> F,
    F: Future<Output = std::io::Result<S>>,
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let mut backoff = Backoff::new(options.backoff_base, options.backoff_cap);
    let mut failures = 0u32;
    loop {
        let stream = match connect().await {
            Ok(stream) => stream,
            Err(e) => {
                failures += 1;
                if options.max_attempts.is_some_and(|max| failures >= max) {
                    return Err(ClientError::Unreachable {
                        attempts: failures,
                        last: e.to_string(),
                    });
                }
                let wait = backoff.next_wait();
                tracing::warn!(error = %e, wait_ms = wait.as_millis() as u64, "aggregator unreachable; retrying");
                tokio::time::sleep(wait).await;
                continue;
            }
        };
        failures = 0;
        let (mut reader, mut writer) = tokio::io::split(stream);
        let join = client.join();
        if let Err(e) = wire::write_message(&mut writer, &join, client.encoding()).await {
            tracing::warn!(error = %e, "joining failed; reconnecting");
            tokio::time::sleep(backoff.next_wait()).await;
            continue;
        }
        loop {
            let message = match wire::read_message(&mut reader, &options.limits).await {
                Ok(Some((message, _))) => message,
                Ok(None) => {
                    tracing::warn!("the aggregator closed the connection; reconnecting");
                    break;
                }
                Err(e) if e.is_retryable() => {
                    tracing::warn!(error = %e, "connection to the aggregator lost; reconnecting");
                    break;
                }
                Err(wire::WireError::Frame(e)) => return Err(e.into()),
                Err(wire::WireError::Io(e)) => return Err(FlError::Frame(e.to_string()).into()),
            };
            let kind = message.kind();
            // Training is CPU work: off the async threads.
            let (back, result) = tokio::task::spawn_blocking(move || {
                let result = client.handle(message);
                (client, result)
            })
            .await
            .map_err(|e| FlError::Frame(format!("the training thread failed: {e}")))?;
            client = back;
            match result {
                Ok(Some(reply)) => {
                    backoff.reset();
                    if let Err(e) =
                        wire::write_message(&mut writer, &reply, client.encoding()).await
                    {
                        tracing::warn!(error = %e, "sending the {} failed; reconnecting", reply.kind());
                        break;
                    }
                }
                Ok(None) => {
                    if matches!(client.state(), ClientState::Finished { .. }) {
                        return Ok(client);
                    }
                }
                Err(FlError::Rejected {
                    reason,
                    retryable: true,
                }) => {
                    tracing::warn!(%reason, "the aggregator asked us to join again");
                    break;
                }
                Err(e @ FlError::Estimator { .. }) => {
                    // The aggregator sends the round again after we rejoin.
                    tracing::warn!(error = %e, "local training failed; rejoining");
                    break;
                }
                Err(e) => {
                    tracing::error!(error = %e, message = kind, "federated learning failed");
                    return Err(e.into());
                }
            }
        }
        tokio::time::sleep(backoff.next_wait()).await;
    }
}
