//! One Unix user per pod, when the agent runs as root (as systemd's `DynamicUser`): each pod
//! gets a uid (and the group of the same number) from a configured range, held while the pod
//! is on the node; its processes run under it with no supplementary groups, and only its own
//! home and volumes belong to it. The agent's data, keys, store and the other pods' files are
//! then out of its reach.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use sha2::{Digest, Sha256};

/// A range of uids handed to pods.
pub struct PodUsers {
    first: u32,
    last: u32,
    taken: Mutex<HashMap<u32, String>>,
}

impl std::fmt::Debug for PodUsers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PodUsers({}-{})", self.first, self.last)
    }
}

/// The smallest first uid accepted: below it live the system's and people's accounts.
pub const MIN_UID: u32 = 10_000;

impl PodUsers {
    /// `FIRST-LAST`, e.g. `524288-589823`; refused with the reason when not a range of at
    /// least one uid at or above [`MIN_UID`] (and below the overflow uid 65534 … 2³²−2).
    pub fn parse(range: &str) -> Result<PodUsers, String> {
        let bad = |why: &str| {
            format!("pod uid range {range:?}: {why} (expected FIRST-LAST, e.g. 524288-589823)")
        };
        let (a, b) = range.split_once('-').ok_or_else(|| bad("no '-'"))?;
        let first: u32 = a.trim().parse().map_err(|_| bad("FIRST is not a number"))?;
        let last: u32 = b.trim().parse().map_err(|_| bad("LAST is not a number"))?;
        if first < MIN_UID {
            return Err(bad(&format!("FIRST must be at least {MIN_UID}")));
        }
        if last < first || last >= u32::MAX - 1 || (first..=last).contains(&65534) {
            return Err(bad(
                "LAST must be at least FIRST, and the range must leave out 65534 and 2³²−1",
            ));
        }
        Ok(PodUsers {
            first,
            last,
            taken: Mutex::new(HashMap::new()),
        })
    }

    /// A uid for pod `pod_uid` (one lease per pod): where the range has room, the same one
    /// after an agent restart (a hash of the pod's uid, then the next free one), or `None`
    /// when every uid is taken.
    pub fn lease(self: &Arc<Self>, pod_uid: &str) -> Option<UidLease> {
        let mut taken = self
            .taken
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let count = u64::from(self.last - self.first) + 1;
        let digest = Sha256::digest(pod_uid.as_bytes());
        let mut start = [0u8; 8];
        start.copy_from_slice(&digest[..8]);
        let start = u64::from_be_bytes(start) % count;
        for i in 0..count {
            let uid = self.first + u32::try_from((start + i) % count).ok()?;
            if taken.contains_key(&uid) {
                continue;
            }
            taken.insert(uid, pod_uid.to_owned());
            return Some(UidLease {
                users: self.clone(),
                uid,
            });
        }
        None
    }
}

/// A uid held by a pod; released when dropped.
#[derive(Debug)]
pub struct UidLease {
    users: Arc<PodUsers>,
    /// The uid (and gid).
    pub uid: u32,
}

impl Drop for UidLease {
    fn drop(&mut self) {
        self.users
            .taken
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&self.uid);
    }
}

/// Gives `path` itself (not what a symlink there points to) to `uid`.
pub fn give(path: &Path, uid: u32) -> std::io::Result<()> {
    std::os::unix::fs::lchown(path, Some(uid), Some(uid))
}

/// Gives `dir` and everything under it to `uid`, never following symlinks.
pub fn give_tree(dir: &Path, uid: u32) -> std::io::Result<()> {
    give(dir, uid)?;
    if std::fs::symlink_metadata(dir)?.is_dir() {
        for entry in std::fs::read_dir(dir)? {
            give_tree(&entry?.path(), uid)?;
        }
    }
    Ok(())
}

/// Whether this process may hand out uids (it runs as root).
pub fn can_switch_users() -> bool {
    nix::unistd::geteuid().is_root()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_are_checked() {
        assert!(PodUsers::parse("524288-589823").is_ok());
        for bad in [
            "",
            "5",
            "100-200",
            "600000-500000",
            "60000-70000",
            "x-y",
            "100000-4294967295",
        ] {
            assert!(PodUsers::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn each_pod_gets_its_own_uid_and_frees_it_when_it_goes() {
        let users = Arc::new(PodUsers::parse("100000-100002").unwrap());
        let a = users.lease("pod-a").unwrap();
        let b = users.lease("pod-b").unwrap();
        let c = users.lease("pod-c").unwrap();
        let mut uids = vec![a.uid, b.uid, c.uid];
        uids.sort();
        uids.dedup();
        assert_eq!(uids.len(), 3, "three pods, three uids: {uids:?}");
        assert!(users.lease("pod-d").is_none(), "the range is full");
        let freed = b.uid;
        drop(b);
        assert_eq!(users.lease("pod-d").map(|d| d.uid), Some(freed));
        // The first choice depends on the pod alone: the same after a restart.
        let fresh = Arc::new(PodUsers::parse("100000-100002").unwrap());
        assert_eq!(fresh.lease("pod-a").map(|l| l.uid), Some(a.uid));
        drop((a, c));
    }
}
