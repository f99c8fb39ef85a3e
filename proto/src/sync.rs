//! The incremental-resync encoding both sides share.
//!
//! On (re)connect the edge summarises its inventory — the (uid, resourceVersion) pairs it
//! holds — as one 32-bit digest per bucket; the hub computes the same digests for what the
//! node should hold and answers only for buckets that differ, with their exact pairs (a
//! [`Manifest`](crate::channel::Manifest)); the edge then asks for the objects it lacks or holds
//! stale (a [`Want`](crate::channel::Want)). With a few changes among thousands of objects, the
//! digest and the manifests cost a small fraction of the objects themselves.

use std::collections::BTreeMap;

/// The fewest and most buckets a digest uses.
pub const MIN_BUCKETS: u32 = 16;
/// See [`MIN_BUCKETS`].
pub const MAX_BUCKETS: u32 = 1 << 16;

/// The number of buckets for an inventory of `entries` pairs: about four pairs per bucket,
/// a power of two between [`MIN_BUCKETS`] and [`MAX_BUCKETS`].
pub fn bucket_count(entries: usize) -> u32 {
    let target = (entries / 4).max(1) as u32;
    target
        .checked_next_power_of_two()
        .unwrap_or(MAX_BUCKETS)
        .clamp(MIN_BUCKETS, MAX_BUCKETS)
}

/// 64-bit FNV-1a: small, stable across versions and platforms.
fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for b in *part {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    h
}

/// The bucket of a uid. `buckets` must be a power of two.
pub fn bucket_of(uid: &str, buckets: u32) -> u32 {
    (fnv1a(&[uid.as_bytes()]) as u32) & (buckets.max(1) - 1)
}

fn pair_hash(uid: &str, rv: u64) -> u32 {
    let h = fnv1a(&[uid.as_bytes(), &[0xff], &rv.to_le_bytes()]);
    (h ^ (h >> 32)) as u32
}

/// Digests of an inventory: per bucket, the XOR of its pairs' hashes.
pub fn digests<'a>(pairs: impl IntoIterator<Item = (&'a str, u64)>, buckets: u32) -> Vec<u32> {
    let mut out = vec![0u32; buckets as usize];
    for (uid, rv) in pairs {
        out[bucket_of(uid, buckets) as usize] ^= pair_hash(uid, rv);
    }
    out
}

/// Packs digests as little-endian u32s.
pub fn pack_digests(digests: &[u32]) -> Vec<u8> {
    digests.iter().flat_map(|d| d.to_le_bytes()).collect()
}

/// Unpacks digests; `None` if the byte count does not match `buckets`, or `buckets` is not a
/// power of two within bounds.
pub fn unpack_digests(bytes: &[u8], buckets: u32) -> Option<Vec<u32>> {
    let valid = buckets.is_power_of_two() && (MIN_BUCKETS..=MAX_BUCKETS).contains(&buckets);
    if !valid || bytes.len() != buckets as usize * 4 {
        return None;
    }
    Some(
        bytes
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
    )
}

/// Packs uids: a canonical UUID as its 16 bytes, anything else as `0xff`, a length byte and
/// the UTF-8 bytes (uids longer than 255 bytes are truncated by no one: they are refused).
pub fn pack_uids<'a>(uids: impl IntoIterator<Item = &'a str>) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    for uid in uids {
        match parse_uuid(uid) {
            Some(bytes) if bytes[0] != 0xff => out.extend_from_slice(&bytes),
            _ => {
                let len = u8::try_from(uid.len()).ok()?;
                out.push(0xff);
                out.push(len);
                out.extend_from_slice(uid.as_bytes());
            }
        }
    }
    Some(out)
}

/// Unpacks uids packed by [`pack_uids`]; `None` on malformed input.
pub fn unpack_uids(mut bytes: &[u8]) -> Option<Vec<String>> {
    let mut out = Vec::new();
    while let Some(&first) = bytes.first() {
        if first == 0xff {
            let len = *bytes.get(1)? as usize;
            let s = bytes.get(2..2 + len)?;
            out.push(String::from_utf8(s.to_vec()).ok()?);
            bytes = &bytes[2 + len..];
        } else {
            let raw: [u8; 16] = bytes.get(..16)?.try_into().ok()?;
            out.push(format_uuid(&raw));
            bytes = &bytes[16..];
        }
    }
    Some(out)
}

fn parse_uuid(s: &str) -> Option<[u8; 16]> {
    let hex: Vec<u8> = s.bytes().filter(|b| *b != b'-').collect();
    let canonical = s.len() == 36
        && [8, 13, 18, 23].iter().all(|i| s.as_bytes()[*i] == b'-')
        && hex.len() == 32
        && hex
            .iter()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(b));
    if !canonical {
        return None;
    }
    let mut out = [0u8; 16];
    for (i, pair) in hex.chunks_exact(2).enumerate() {
        let text = std::str::from_utf8(pair).ok()?;
        out[i] = u8::from_str_radix(text, 16).ok()?;
    }
    Some(out)
}

fn format_uuid(b: &[u8; 16]) -> String {
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

/// The buckets whose digests differ between the edge's and the hub's.
pub fn differing_buckets(edge: &[u32], hub: &[u32]) -> Vec<u32> {
    edge.iter()
        .zip(hub)
        .enumerate()
        .filter(|(_, (a, b))| a != b)
        .map(|(i, _)| i as u32)
        .collect()
}

/// Groups pairs by bucket.
pub fn by_bucket<'a>(
    pairs: impl IntoIterator<Item = (&'a str, u64)>,
    buckets: u32,
) -> BTreeMap<u32, Vec<(&'a str, u64)>> {
    let mut out: BTreeMap<u32, Vec<(&'a str, u64)>> = BTreeMap::new();
    for (uid, rv) in pairs {
        out.entry(bucket_of(uid, buckets))
            .or_default()
            .push((uid, rv));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_counts_grow_with_the_inventory() {
        assert_eq!(bucket_count(0), MIN_BUCKETS);
        assert_eq!(bucket_count(10_000), 4096);
        assert_eq!(bucket_count(10_000_000), MAX_BUCKETS);
    }

    #[test]
    fn digests_are_order_independent_and_see_every_change() {
        let a = [("u1", 1), ("u2", 2), ("u3", 3)];
        let b = [("u3", 3), ("u1", 1), ("u2", 2)];
        assert_eq!(digests(a, 16), digests(b, 16));
        let changed = [("u1", 1), ("u2", 5), ("u3", 3)];
        let diff = differing_buckets(&digests(a, 16), &digests(changed, 16));
        assert_eq!(diff, [bucket_of("u2", 16)]);
        let missing = [("u1", 1), ("u3", 3)];
        assert_eq!(
            differing_buckets(&digests(a, 16), &digests(missing, 16)).len(),
            1
        );
    }

    #[test]
    fn uids_pack_compactly_and_round_trip() {
        let uuid = "3ef3fd24-8d74-46ae-b187-eecce2047e44";
        let uids = [uuid, "not-a-uuid", ""];
        let packed = pack_uids(uids).unwrap();
        assert_eq!(packed.len(), 16 + 2 + 10 + 2);
        assert_eq!(unpack_uids(&packed).unwrap(), uids);
        assert!(unpack_uids(&[1, 2, 3]).is_none());
        assert!(unpack_uids(&[0xff, 9, b'a']).is_none());
        let upper = "3EF3FD24-8D74-46AE-B187-EECCE2047E44";
        assert_eq!(unpack_uids(&pack_uids([upper]).unwrap()).unwrap(), [upper]);
    }

    #[test]
    fn digests_pack_and_refuse_bad_sizes() {
        let d = vec![1, 2, 3, 0xdead_beef];
        assert!(
            unpack_digests(&pack_digests(&d), 4).is_none(),
            "fewer than MIN_BUCKETS"
        );
        let d = vec![7u32; 16];
        assert_eq!(unpack_digests(&pack_digests(&d), 16).unwrap(), d);
        assert!(unpack_digests(&pack_digests(&d), 32).is_none());
    }
}
