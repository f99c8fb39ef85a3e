//! Admission of TLS handshakes: the hub accepts every TCP connection at once and asks the gate
//! whether its handshake may proceed. A source address holds at most `per_source` handshakes;
//! all sources together at most `total`. When every slot is taken, a newcomer takes the oldest
//! slot of the source holding the most — so a flood from a few addresses cannot keep out an
//! edge from another, and a flood from many addresses is shared out fairly instead of winning
//! by arriving first.
//!
//! When no slot can be had, the connection waits its turn in a bounded waiting room (first
//! come, first served; at most `waiting` in all and `per_source` from one address, and when the
//! room is full a newcomer takes the place of the latest arrival of the address waiting with
//! the most). A reconnection storm is thereby queued instead of refused: a refused edge backs
//! off, its delay doubling with each refusal, which leaves a long tail of nodes that come back
//! long after the hub could have taken them. Pure bookkeeping (no I/O, no time): the shell adds
//! the deadlines, including how long a connection may wait.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::oneshot;

/// Bounds on handshakes in progress and waiting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GateLimits {
    /// Handshakes in progress from one source address (and, separately, connections waiting
    /// from one source address).
    pub per_source: usize,
    /// Handshakes in progress in all.
    pub total: usize,
    /// Connections waiting for a slot in all (0: none wait, a connection without a slot is
    /// refused at once).
    pub waiting: usize,
}

/// Why a handshake was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    /// Its source address already holds `per_source` handshakes and `per_source` waiting.
    #[error("too many handshakes in progress and waiting from this address")]
    SourceFull,
    /// Every slot and every waiting place is taken, and no source holds more than this one
    /// would.
    #[error("too many handshakes in progress and waiting")]
    Full,
    /// The hub holds as many connections as it may (sessions, handshakes and waiting).
    #[error("the hub is at its connection limit")]
    AtCapacity,
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
    /// The waiting room, in order of arrival.
    queue: VecDeque<Waiter>,
    /// How many of the waiting come from each source.
    queued_by_source: HashMap<IpAddr, usize>,
    next: u64,
}

#[derive(Debug)]
struct Waiter {
    id: u64,
    source: IpAddr,
    turn: oneshot::Sender<Ticket>,
}

/// The answer to a connection: a slot now, or a place in the waiting room.
#[derive(Debug)]
pub enum Admission {
    /// A slot: the handshake may start.
    Now(Ticket),
    /// A place in the waiting room: [`Queued::turn`] resolves with a slot.
    Queued(Queued),
}

/// A handshake's slot; dropping it frees the slot (for the first in the waiting room). `evicted`
/// resolves when a newcomer took it: the handshake must then be abandoned.
#[derive(Debug)]
pub struct Ticket {
    gate: Arc<HandshakeGate>,
    source: IpAddr,
    id: u64,
    /// Resolves when the slot was given to another source.
    pub evicted: oneshot::Receiver<()>,
}

/// A place in the waiting room; dropping it (a deadline passed) leaves the room.
#[derive(Debug)]
pub struct Queued {
    gate: Arc<HandshakeGate>,
    id: u64,
    turn: Option<oneshot::Receiver<Ticket>>,
}

impl HandshakeGate {
    /// A gate with these limits (slots at least 1).
    pub fn new(limits: GateLimits) -> Arc<Self> {
        Arc::new(Self {
            limits: GateLimits {
                per_source: limits.per_source.max(1),
                total: limits.total.max(1),
                waiting: limits.waiting,
            },
            inner: Mutex::new(Inner::default()),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Admits a handshake from `source` now or into the waiting room, or says why not.
    pub fn admit(self: &Arc<Self>, source: IpAddr) -> Result<Admission, Refused> {
        self.admit_below(source, 0, usize::MAX)
    }

    /// [`HandshakeGate::admit`], unless `sessions` (connections past their handshake) and the
    /// gate's own (in progress and waiting) already make `max` connections.
    pub fn admit_below(
        self: &Arc<Self>,
        source: IpAddr,
        sessions: usize,
        max: usize,
    ) -> Result<Admission, Refused> {
        let mut inner = self.lock();
        if sessions
            .saturating_add(inner.total)
            .saturating_add(inner.queue.len())
            >= max
        {
            return Err(Refused::AtCapacity);
        }
        let mine = inner.by_source.get(&source).map_or(0, VecDeque::len);
        if mine < self.limits.per_source {
            // Nobody overtakes the waiting room for a free slot…
            if inner.total < self.limits.total && inner.queue.is_empty() {
                return Ok(Admission::Now(self.slot(&mut inner, source)));
            }
            // …but a source hogging slots loses one to a source holding fewer.
            if inner.total >= self.limits.total && self.evict_busiest_slot(&mut inner, mine) {
                return Ok(Admission::Now(self.slot(&mut inner, source)));
            }
        }
        if self.limits.waiting == 0 {
            return Err(if mine >= self.limits.per_source {
                Refused::SourceFull
            } else {
                Refused::Full
            });
        }
        let waiting = inner.queued_by_source.get(&source).copied().unwrap_or(0);
        if waiting >= self.limits.per_source {
            return Err(Refused::SourceFull);
        }
        if inner.queue.len() >= self.limits.waiting && !evict_busiest_waiter(&mut inner, waiting) {
            return Err(Refused::Full);
        }
        let (turn, rx) = oneshot::channel();
        let id = inner.next;
        inner.next += 1;
        inner.queue.push_back(Waiter { id, source, turn });
        *inner.queued_by_source.entry(source).or_default() += 1;
        drop(inner);
        // A slot may have been freed between the checks above and the push: hand it out.
        self.promote();
        Ok(Admission::Queued(Queued {
            gate: self.clone(),
            id,
            turn: Some(rx),
        }))
    }

    /// Frees the oldest slot of the source holding the most, if it holds more than one more
    /// than a source holding `mine`, and at least a quarter of its share (so the handshakes of
    /// a fleet spread over many addresses, a slot or two each, are not cut short for one
    /// another: those wait their turn).
    fn evict_busiest_slot(&self, inner: &mut Inner, mine: usize) -> bool {
        let Some((ip, held)) = busiest(inner.by_source.iter().map(|(ip, s)| (*ip, s.len()))) else {
            return false;
        };
        if held <= mine + 1 || held < (self.limits.per_source / 4).max(2) {
            return false;
        }
        if let Some(slots) = inner.by_source.get_mut(&ip) {
            // Dropping the sender wakes the evicted handshake.
            slots.pop_front();
            if slots.is_empty() {
                inner.by_source.remove(&ip);
            }
        }
        inner.total -= 1;
        true
    }

    /// Registers a slot for `source` (the caller checked the bounds).
    fn slot(self: &Arc<Self>, inner: &mut Inner, source: IpAddr) -> Ticket {
        let (tx, evicted) = oneshot::channel();
        let id = inner.next;
        inner.next += 1;
        inner
            .by_source
            .entry(source)
            .or_default()
            .push_back((id, tx));
        inner.total += 1;
        Ticket {
            gate: self.clone(),
            source,
            id,
            evicted,
        }
    }

    /// Gives free slots to the waiting room, first come first served; a waiter whose source
    /// already holds its share of slots lets the next one pass.
    fn promote(self: &Arc<Self>) {
        let mut handed = Vec::new();
        {
            let mut inner = self.lock();
            let mut i = 0;
            while inner.total < self.limits.total && i < inner.queue.len() {
                let source = inner.queue[i].source;
                if inner.by_source.get(&source).map_or(0, VecDeque::len) >= self.limits.per_source {
                    i += 1;
                    continue;
                }
                let Some(waiter) = inner.queue.remove(i) else {
                    break;
                };
                leave_room(&mut inner, source);
                if waiter.turn.is_closed() {
                    continue;
                }
                let ticket = self.slot(&mut inner, source);
                handed.push((waiter.turn, ticket));
            }
        }
        // Sent outside the lock: a waiter gone meanwhile drops the ticket, which frees the slot
        // (and promotes again) through `Ticket::drop`.
        for (turn, ticket) in handed {
            let _ = turn.send(ticket);
        }
    }

    /// Handshakes in progress.
    pub fn in_progress(&self) -> usize {
        self.lock().total
    }

    /// Connections waiting for a slot.
    pub fn waiting(&self) -> usize {
        self.lock().queue.len()
    }
}

/// Makes room by dropping the latest arrival of the source waiting with the most, if it waits
/// with more than one more than a source waiting with `mine`; its connection is then closed.
fn evict_busiest_waiter(inner: &mut Inner, mine: usize) -> bool {
    let Some((ip, held)) = busiest(inner.queued_by_source.iter().map(|(ip, n)| (*ip, *n))) else {
        return false;
    };
    if held <= mine + 1 {
        return false;
    }
    let Some(at) = inner.queue.iter().rposition(|w| w.source == ip) else {
        return false;
    };
    // Dropping the sender wakes the waiter with nothing.
    inner.queue.remove(at);
    leave_room(inner, ip);
    true
}

/// The source holding the most, and how many.
fn busiest(held: impl Iterator<Item = (IpAddr, usize)>) -> Option<(IpAddr, usize)> {
    held.max_by_key(|(_, n)| *n)
}

fn leave_room(inner: &mut Inner, source: IpAddr) {
    if let Some(n) = inner.queued_by_source.get_mut(&source) {
        *n -= 1;
        if *n == 0 {
            inner.queued_by_source.remove(&source);
        }
    }
}

impl Queued {
    /// Waits for a slot; `None` when this place was given to a newcomer from a less busy
    /// address (the connection should then be closed).
    pub async fn turn(mut self) -> Option<Ticket> {
        let ticket = match self.turn.as_mut() {
            Some(turn) => turn.await.ok(),
            None => None,
        };
        // Handed a slot or evicted: either way no longer in the room.
        self.turn = None;
        ticket
    }
}

impl Drop for Queued {
    fn drop(&mut self) {
        // Dropped while waiting (a deadline passed): leave the room now, so the place is free
        // at once rather than when its turn would have come.
        if self.turn.is_some() {
            let mut inner = self.gate.lock();
            if let Some(at) = inner.queue.iter().position(|w| w.id == self.id)
                && let Some(w) = inner.queue.remove(at)
            {
                leave_room(&mut inner, w.source);
            }
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        {
            let mut inner = self.gate.lock();
            let Some(slots) = inner.by_source.get_mut(&self.source) else {
                drop(inner);
                self.gate.promote();
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
        self.gate.promote();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([127, 0, 0, last])
    }

    fn gate(per_source: usize, total: usize, waiting: usize) -> Arc<HandshakeGate> {
        HandshakeGate::new(GateLimits {
            per_source,
            total,
            waiting,
        })
    }

    /// A slot at once, or a panic.
    fn now(gate: &Arc<HandshakeGate>, source: IpAddr) -> Ticket {
        match gate.admit(source) {
            Ok(Admission::Now(t)) => t,
            other => panic!("no slot at once: {other:?}"),
        }
    }

    /// A place in the waiting room, or a panic.
    fn queued(gate: &Arc<HandshakeGate>, source: IpAddr) -> Queued {
        match gate.admit(source) {
            Ok(Admission::Queued(q)) => q,
            other => panic!("not queued: {other:?}"),
        }
    }

    /// The slot a waiter was handed, if any yet.
    fn handed(turn: &mut Queued) -> Option<Ticket> {
        turn.turn.as_mut().and_then(|t| t.try_recv().ok())
    }

    #[test]
    fn one_source_cannot_hold_more_than_its_share() {
        let gate = gate(3, 100, 0);
        let held: Vec<Ticket> = (0..3).map(|_| now(&gate, ip(2))).collect();
        assert_eq!(gate.admit(ip(2)).unwrap_err(), Refused::SourceFull);
        assert!(gate.admit(ip(1)).is_ok(), "another address still gets in");
        drop(held);
        assert_eq!(gate.in_progress(), 0);
        assert!(gate.admit(ip(2)).is_ok());
    }

    #[test]
    fn when_full_a_newcomer_takes_the_oldest_slot_of_the_busiest_source() {
        let gate = gate(10, 4, 0);
        let mut flood: Vec<Ticket> = (0..4).map(|_| now(&gate, ip(2))).collect();
        let edge = now(&gate, ip(1));
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
        let _third = now(&gate, ip(3));
        let _fourth = now(&gate, ip(4));
        // …and are refused once every source holds one: nobody is evicted for an equal share.
        assert_eq!(gate.admit(ip(5)).unwrap_err(), Refused::Full);
        assert_eq!(gate.in_progress(), 4);
        drop(edge);
        assert_eq!(gate.in_progress(), 3);
        assert!(gate.admit(ip(5)).is_ok());
    }

    #[test]
    fn without_a_slot_a_connection_waits_and_slots_go_to_the_waiting_in_order_of_arrival() {
        let gate = gate(4, 2, 10);
        let a = now(&gate, ip(1));
        let b = now(&gate, ip(2));
        let mut c = queued(&gate, ip(3));
        let mut d = queued(&gate, ip(4));
        assert_eq!((gate.in_progress(), gate.waiting()), (2, 2));
        assert!(handed(&mut c).is_none() && handed(&mut d).is_none());
        // A newcomer does not overtake them, although it holds nothing either.
        let mut e = queued(&gate, ip(5));
        drop(b);
        let c_slot = handed(&mut c).expect("the first to wait gets the first freed slot");
        assert!(handed(&mut d).is_none() && handed(&mut e).is_none());
        assert_eq!((gate.in_progress(), gate.waiting()), (2, 2));
        drop(a);
        let _d_slot = handed(&mut d).expect("the second to wait gets the next slot");
        assert!(handed(&mut e).is_none());
        drop(c_slot);
        assert!(handed(&mut e).is_some());
        assert_eq!(gate.waiting(), 0);
    }

    #[tokio::test]
    async fn a_waiter_is_woken_with_its_slot() {
        let gate = gate(4, 1, 10);
        let first = now(&gate, ip(1));
        let waiter = tokio::spawn(queued(&gate, ip(2)).turn());
        tokio::task::yield_now().await;
        drop(first);
        let ticket = waiter.await.unwrap().expect("a slot");
        assert_eq!(ticket.source, ip(2));
        assert_eq!(gate.in_progress(), 1);
    }

    #[test]
    fn a_waiter_past_its_deadline_leaves_the_room_at_once_and_its_turn_passes_on() {
        let gate = gate(4, 1, 2);
        let held = now(&gate, ip(1));
        let gone = queued(&gate, ip(2));
        let mut next = queued(&gate, ip(3));
        assert_eq!(gate.admit(ip(4)).unwrap_err(), Refused::Full);
        drop(gone);
        assert_eq!(gate.waiting(), 1, "the place is free at once");
        let mut last = queued(&gate, ip(4));
        drop(held);
        let _next = handed(&mut next).expect("the next in line gets the slot");
        assert!(handed(&mut last).is_none());
    }

    #[test]
    fn a_slot_handed_to_a_waiter_that_left_meanwhile_goes_to_the_next() {
        let gate = gate(4, 1, 4);
        let held = now(&gate, ip(1));
        let mut gone = queued(&gate, ip(2));
        let mut next = queued(&gate, ip(3));
        // The waiter's end closes (its task ended) without leaving the room through `Drop`.
        if let Some(t) = gone.turn.as_mut() {
            t.close();
        }
        drop(held);
        assert!(handed(&mut gone).is_none());
        let _next = handed(&mut next).expect("the next in line gets the slot");
        assert_eq!((gate.in_progress(), gate.waiting()), (1, 0));
    }

    #[test]
    fn the_waiting_room_is_bounded_per_source_and_a_full_room_sheds_the_busiest_source() {
        let gate = gate(3, 1, 4);
        let _held = now(&gate, ip(1));
        let mut flood: Vec<Queued> = (0..3).map(|_| queued(&gate, ip(2))).collect();
        assert_eq!(gate.admit(ip(2)).unwrap_err(), Refused::SourceFull);
        let _edge = queued(&gate, ip(3));
        assert_eq!(gate.waiting(), 4);
        // The room is full: a newcomer takes the place of the flood's latest arrival…
        let _other = queued(&gate, ip(4));
        assert_eq!(gate.waiting(), 4);
        assert!(handed(&mut flood[2]).is_none());
        assert!(
            flood[2]
                .turn
                .as_mut()
                .is_some_and(|t| matches!(t.try_recv(), Err(oneshot::error::TryRecvError::Closed))),
            "the flood's latest arrival was told to go"
        );
        // …until no address waits with more than one more than a newcomer would.
        let _fifth = queued(&gate, ip(5));
        assert_eq!(gate.admit(ip(6)).unwrap_err(), Refused::Full);
    }

    #[test]
    fn a_waiter_whose_source_holds_its_share_of_slots_lets_the_next_pass() {
        let gate = gate(1, 2, 4);
        let a = now(&gate, ip(1));
        let _b = now(&gate, ip(2));
        let mut again = queued(&gate, ip(1));
        let mut other = queued(&gate, ip(3));
        // A slot frees, but not ip(1)'s: ip(1) still holds its one.
        drop(_b);
        assert!(handed(&mut again).is_none());
        let _other = handed(&mut other).expect("the next source in line gets it");
        drop(a);
        assert!(handed(&mut again).is_some());
    }

    #[test]
    fn a_fleet_spread_over_many_addresses_waits_instead_of_cutting_handshakes_short() {
        let gate = gate(32, 4, 100);
        // Two handshakes from one address (a couple of nodes behind one NAT), two from others.
        let mut slots: Vec<Ticket> = vec![now(&gate, ip(2)), now(&gate, ip(2))];
        slots.push(now(&gate, ip(3)));
        slots.push(now(&gate, ip(4)));
        let _newcomer = queued(&gate, ip(5));
        for t in &mut slots {
            assert_eq!(
                t.evicted.try_recv(),
                Err(oneshot::error::TryRecvError::Empty),
                "no handshake cut short"
            );
        }
    }

    #[test]
    fn a_hub_at_its_connection_limit_admits_nobody_counting_its_sessions_and_its_own() {
        let gate = gate(4, 4, 4);
        let _held = now(&gate, ip(1));
        // One session elsewhere and one handshake here make two of at most two.
        assert!(matches!(
            gate.admit_below(ip(2), 1, 2),
            Err(Refused::AtCapacity)
        ));
        assert!(matches!(
            gate.admit_below(ip(2), 0, 2),
            Ok(Admission::Now(_))
        ));
    }
}
