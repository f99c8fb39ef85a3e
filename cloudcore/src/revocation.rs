//! Revoked node certificates. Deleting a Node revokes every certificate issued to that name
//! until then: node certificates carry their issuance time (milliseconds since the Unix epoch)
//! as their serial number, so a certificate is revoked when it was issued at or before its
//! node's revocation. A node that joins again afterwards (with a new token) gets a new,
//! valid certificate. Revocations are kept in the ConfigMap `kube-system/sedna-revoked-nodes`
//! (node name → revocation time), so every hub and every restart sees them.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Mutex, PoisonError};

use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, Patch, PatchParams};

/// Where revocations are kept.
pub const REVOCATIONS_CONFIGMAP: (&str, &str) = ("kube-system", "sedna-revoked-nodes");

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The issuance time a node certificate's serial number carries, if it carries one.
pub fn issued_ms(serial: &[u8]) -> Option<u64> {
    let serial = match serial {
        [0, rest @ ..] => rest, // DER's sign byte
        other => other,
    };
    if serial.is_empty() || serial.len() > 8 {
        return None;
    }
    Some(
        serial
            .iter()
            .fold(0u64, |acc, b| (acc << 8) | u64::from(*b)),
    )
}

/// The revocations a hub knows (pure; the hub persists and reloads them).
#[derive(Debug, Default)]
pub struct Revocations(Mutex<HashMap<String, u64>>);

impl Revocations {
    /// Revokes every certificate of `node` issued at or before `at_ms`; whether that revokes
    /// more than before.
    pub fn revoke(&self, node: &str, at_ms: u64) -> bool {
        let mut map = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let entry = map.entry(node.to_owned()).or_insert(0);
        let newer = at_ms > *entry;
        *entry = (*entry).max(at_ms);
        newer
    }

    /// Takes in the revocations of the kept ConfigMap's `data`; the nodes whose revocation
    /// is newer than what was known (their sessions must end).
    pub fn merge(&self, data: &BTreeMap<String, String>) -> Vec<String> {
        data.iter()
            .filter_map(|(node, at)| {
                let at: u64 = at.parse().ok()?;
                self.revoke(node, at).then(|| node.clone())
            })
            .collect()
    }

    /// Whether a certificate of `node` issued at `issued_ms` (`None`: an old certificate
    /// without the time) is revoked.
    pub fn is_revoked(&self, node: &str, issued_ms: Option<u64>) -> bool {
        let map = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        match map.get(node) {
            None => false,
            Some(at) => issued_ms.is_none_or(|issued| issued <= *at),
        }
    }

    /// Reads the revocations kept in the API (absent: none).
    pub async fn load(&self, client: &kube::Client) -> Result<(), kube::Error> {
        let api: Api<ConfigMap> = Api::namespaced(client.clone(), REVOCATIONS_CONFIGMAP.0);
        let data = api
            .get_opt(REVOCATIONS_CONFIGMAP.1)
            .await?
            .and_then(|c| c.data)
            .unwrap_or_default();
        self.merge(&data);
        Ok(())
    }

    /// Records a revocation in the API.
    pub async fn persist(client: &kube::Client, node: &str, at_ms: u64) -> Result<(), kube::Error> {
        let api: Api<ConfigMap> = Api::namespaced(client.clone(), REVOCATIONS_CONFIGMAP.0);
        let cm = serde_json::json!({
            "apiVersion": "v1", "kind": "ConfigMap",
            "metadata": { "name": REVOCATIONS_CONFIGMAP.1, "namespace": REVOCATIONS_CONFIGMAP.0 },
            "data": BTreeMap::from([(node.to_owned(), at_ms.to_string())]),
        });
        api.patch(
            REVOCATIONS_CONFIGMAP.1,
            &PatchParams::apply(&format!("sedna-cloudcore-revoke-{node}")).force(),
            &Patch::Apply(&cm),
        )
        .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn certificates_issued_up_to_the_revocation_are_refused_later_ones_pass() {
        let r = Revocations::default();
        assert!(!r.is_revoked("a", Some(5)));
        r.revoke("a", 1_000);
        assert!(r.is_revoked("a", Some(999)));
        assert!(r.is_revoked("a", Some(1_000)));
        assert!(!r.is_revoked("a", Some(1_001)), "joined again afterwards");
        assert!(r.is_revoked("a", None), "a certificate without its time");
        assert!(!r.is_revoked("b", Some(1)));
        assert!(!r.revoke("a", 10), "an older revocation changes nothing");
        assert!(
            r.is_revoked("a", Some(999)),
            "an older revocation does not undo a newer"
        );
    }

    #[test]
    fn merging_the_kept_revocations_names_the_nodes_newly_revoked() {
        let r = Revocations::default();
        r.revoke("a", 100);
        let kept = BTreeMap::from([
            ("a".to_owned(), "100".to_owned()),
            ("b".to_owned(), "200".to_owned()),
            ("c".to_owned(), "not a time".to_owned()),
        ]);
        assert_eq!(r.merge(&kept), vec!["b".to_owned()]);
        assert!(r.merge(&kept).is_empty(), "nothing new the second time");
        assert!(r.is_revoked("b", Some(200)));
        assert!(!r.is_revoked("c", Some(1)));
    }

    #[test]
    fn serial_numbers_carry_the_issuance_time() {
        let ms = 1_764_500_000_123u64;
        let serial: rcgen::SerialNumber = ms.into();
        assert_eq!(issued_ms(serial.as_ref()), Some(ms));
        let mut signed = vec![0];
        signed.extend(0xff00_0000_0000_0001u64.to_be_bytes());
        assert_eq!(issued_ms(&signed), Some(0xff00_0000_0000_0001));
        assert_eq!(issued_ms(&[1; 9]), None);
    }
}
