//! Admission of TLS handshakes: the hub accepts every TCP connection at once and asks the gate
//! whether its handshake may proceed. A source address holds at most `per_source` handshakes;
//! all sources together at most `total`. When every slot is taken, a newcomer takes the oldest
//! slot of the source holding the most — so a flood from a few addresses cannot keep out an
//! edge from another, and a flood from many addresses is shared out fairly instead of winning
//! by arriving first. Pure bookkeeping (no I/O, no time): the shell adds the deadlines.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::oneshot;

/// Bounds on handshakes in progress.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GateLimits {
    /// Handshakes in progress from one source address.
    pub per_source: usize,
    /// Handshakes in progress in all.
    pub total: usize,
}

/// Why a handshake was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    /// Its source address already holds `per_source` handshakes.
    #[error("too many handshakes in progress from this address")]
    SourceFull,
    /// Every slot is taken and no source holds more than this one would.
    #[error("too many handshakes in progress")]
    Full,
}

/// The gate (shared by the accept loop and the handshake tasks).
#[derive(Debug)]
pub struct HandshakeGate {
    limits: GateLimits,
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    by_source: HashMap<IpAddr, VecDeque<(u64, oneshot::Sender<()>)>>,
    total: usize,
    next: u64,
}

/// A handshake's slot; dropping it frees the slot. `evicted` resolves when a newcomer took it:
/// the handshake must then be abandoned.
#[derive(Debug)]
pub struct Ticket {
    gate: Arc<HandshakeGate>,
    source: IpAddr,
    id: u64,
    /// Resolves when the slot was given to another source.
    pub evicted: oneshot::Receiver<()>,
}

impl HandshakeGate {
    /// A gate with these limits (each at least 1).
    pub fn new(limits: GateLimits) -> Arc<Self> {
        Arc::new(Self {
            limits: GateLimits {
                per_source: limits.per_source.max(1),
                total: limits.total.max(1),
            },
            inner: Mutex::new(Inner::default()),
        })
    }

    /// Admits a handshake from `source`, or says why not.
    pub fn admit(self: &Arc<Self>, source: IpAddr) -> Result<Ticket, Refused> {
        let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        let mine = inner.by_source.get(&source).map_or(0, VecDeque::len);
        if mine >= self.limits.per_source {
            return Err(Refused::SourceFull);
        }
        if inner.total >= self.limits.total {
            let busiest = inner
                .by_source
                .iter()
                .max_by_key(|(_, slots)| slots.len())
                .map(|(ip, slots)| (*ip, slots.len()));
            match busiest {
                Some((ip, held)) if held > mine + 1 => {
                    if let Some(slots) = inner.by_source.get_mut(&ip) {
                        // Dropping the sender wakes the evicted handshake.
                        slots.pop_front();
                        if slots.is_empty() {
                            inner.by_source.remove(&ip);
                        }
                    }
                    inner.total -= 1;
                }
                _ => return Err(Refused::Full),
            }
        }
        let (tx, evicted) = oneshot::channel();
        let id = inner.next;
        inner.next += 1;
        inner
            .by_source
            .entry(source)
            .or_default()
            .push_back((id, tx));
        inner.total += 1;
        Ok(Ticket {
            gate: self.clone(),
            source,
            id,
            evicted,
        })
    }

    /// Handshakes in progress.
    pub fn in_progress(&self) -> usize {
        self.inner
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .total
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut inner = self
            .gate
            .inner
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let Some(slots) = inner.by_source.get_mut(&self.source) else {
            return;
        };
        let before = slots.len();
        slots.retain(|(id, _)| *id != self.id);
        let freed = before - slots.len();
        if slots.is_empty() {
            inner.by_source.remove(&self.source);
        }
        inner.total -= freed;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([127, 0, 0, last])
    }

    #[test]
    fn one_source_cannot_hold_more_than_its_share() {
        let gate = HandshakeGate::new(GateLimits {
            per_source: 3,
            total: 100,
        });
        let held: Vec<Ticket> = (0..3).map(|_| gate.admit(ip(2)).unwrap()).collect();
        assert_eq!(gate.admit(ip(2)).unwrap_err(), Refused::SourceFull);
        assert!(gate.admit(ip(1)).is_ok(), "another address still gets in");
        drop(held);
        assert_eq!(gate.in_progress(), 0);
        assert!(gate.admit(ip(2)).is_ok());
    }

    #[test]
    fn when_full_a_newcomer_takes_the_oldest_slot_of_the_busiest_source() {
        let gate = HandshakeGate::new(GateLimits {
            per_source: 10,
            total: 4,
        });
        let mut flood: Vec<Ticket> = (0..4).map(|_| gate.admit(ip(2)).unwrap()).collect();
        let edge = gate.admit(ip(1)).unwrap();
        assert_eq!(gate.in_progress(), 4);
        // The oldest of the flood's handshakes was told to give up; the others were not.
        assert!(
            flood[0]
                .evicted
                .try_recv()
                .is_err_and(|e| e == oneshot::error::TryRecvError::Closed)
        );
        for t in &mut flood[1..] {
            assert_eq!(
                t.evicted.try_recv(),
                Err(oneshot::error::TryRecvError::Empty)
            );
        }
        // Dropping the evicted ticket frees nothing more.
        flood.remove(0);
        assert_eq!(gate.in_progress(), 4);
        // Newcomers keep taking the flood's slots while it holds more than they would…
        let _third = gate.admit(ip(3)).unwrap();
        let _fourth = gate.admit(ip(4)).unwrap();
        // …and are refused once every source holds one: nobody is evicted for an equal share.
        assert_eq!(gate.admit(ip(5)).unwrap_err(), Refused::Full);
        assert_eq!(gate.in_progress(), 4);
        drop(edge);
        assert_eq!(gate.in_progress(), 3);
        assert!(gate.admit(ip(5)).is_ok());
    }
}
