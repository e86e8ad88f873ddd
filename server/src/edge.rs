//! What the frontend decides before a request reaches the node: who the
//! client is (its CurveZMQ key), what it may do (its rights in the
//! authorized-keys file), and which of a batch's sensors it may send for.
//! Pure functions, so every rule is unit-tested without sockets.

use fog_protocol::{Refusal, RefusedReadings, Request, SensorBatch};
use fog_transport::{AccessList, PublicKey, Rights};

/// How a server authenticates its clients and its peer.
#[derive(Debug, Clone)]
pub enum Security {
    /// No keys: NULL mechanism, every client has every right. Only on
    /// loopback unless `allow_remote` (`--insecure`).
    None { allow_remote: bool },
    /// CurveZMQ with this node's keys; clients and the peer are checked
    /// against the authorized-keys file at `access`.
    Curve { keys: fog_transport::Keypair, access: std::path::PathBuf },
}

/// The rights of the client that sent a message: every right without
/// security; those of its key otherwise (none for a key no longer listed:
/// its rights end with the reload that removed it).
pub fn rights_of(access: Option<&AccessList>, user: Option<&PublicKey>) -> Option<Rights> {
    match access {
        None => Some(Rights::all()),
        Some(list) => user.and_then(|k| list.get(k)).map(|c| c.rights.clone()),
    }
}

/// What to do with one decoded request.
#[derive(Debug, PartialEq)]
pub enum Admission {
    /// Hand it to the node; `refused` lists the sensors taken out of a
    /// batch, to be added to its reply.
    Serve { request: Request, refused: Vec<RefusedReadings> },
    /// Answer at once with this refusal.
    Refuse(Refusal),
}

/// Checks `request` against `rights`: status needs `admin`, a batch is
/// stripped of sensors the key may not send for.
pub fn admit(rights: Option<&Rights>, request: Request) -> Admission {
    let Some(rights) = rights else { return Admission::Refuse(Refusal::NotAuthorized) };
    match request {
        Request::Status if rights.admin => Admission::Serve { request: Request::Status, refused: Vec::new() },
        Request::Status => Admission::Refuse(Refusal::NotAuthorized),
        Request::Batch { batch_id, epoch, seal, sensors } => {
            if rights.sensors.is_empty() {
                return Admission::Refuse(Refusal::NotAuthorized);
            }
            let (kept, foreign): (Vec<SensorBatch>, Vec<SensorBatch>) =
                sensors.into_iter().partition(|s| rights.may_send_for(s.sensor_id));
            let refused = foreign
                .iter()
                .map(|s| RefusedReadings {
                    sensor_id: s.sensor_id,
                    reason: Refusal::ForeignSensor,
                    count: u32::try_from(s.readings.len()).unwrap_or(u32::MAX),
                })
                .collect();
            Admission::Serve { request: Request::Batch { batch_id, epoch, seal, sensors: kept }, refused }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fog_protocol::Reading;

    fn batch(ids: &[u32]) -> Request {
        let sensors = ids
            .iter()
            .map(|&sensor_id| SensorBatch {
                sensor_id,
                incarnation: 1,
                segment: 0,
                readings: vec![Reading { seq: 0, speed_kmh: 90, timestamp_ms: 1 }; 2],
                average_cursor: None,
            })
            .collect();
        Request::Batch { batch_id: 9, epoch: 0, seal: [0; 16], sensors }
    }

    fn rights(text: &str) -> Rights {
        let key = fog_transport::Keypair::generate().unwrap();
        let list = AccessList::parse(&format!("{} h {text}\n", key.public), "t").unwrap();
        rights_of(Some(&list), Some(&key.public)).unwrap()
    }

    #[test]
    fn a_batch_keeps_only_the_sensors_of_the_key() {
        let Admission::Serve { request: Request::Batch { sensors, .. }, refused } = admit(Some(&rights("sensors=1-3")), batch(&[1, 7, 3, 4]))
        else {
            panic!("not served")
        };
        assert_eq!(sensors.iter().map(|s| s.sensor_id).collect::<Vec<_>>(), vec![1, 3]);
        assert_eq!(refused, vec![
            RefusedReadings { sensor_id: 7, reason: Refusal::ForeignSensor, count: 2 },
            RefusedReadings { sensor_id: 4, reason: Refusal::ForeignSensor, count: 2 },
        ]);
    }

    #[test]
    fn status_needs_admin_and_batches_need_sensors() {
        assert_eq!(admit(Some(&rights("sensors=1-3")), Request::Status), Admission::Refuse(Refusal::NotAuthorized));
        assert!(matches!(admit(Some(&rights("admin")), Request::Status), Admission::Serve { .. }));
        assert_eq!(admit(Some(&rights("admin")), batch(&[1])), Admission::Refuse(Refusal::NotAuthorized));
        assert_eq!(admit(None, Request::Status), Admission::Refuse(Refusal::NotAuthorized), "a key no longer listed");
        assert!(matches!(admit(Some(&Rights::all()), Request::Status), Admission::Serve { .. }));
    }

    #[test]
    fn an_unknown_key_has_no_rights_and_no_keys_means_every_right() {
        let list = AccessList::default();
        let stranger = fog_transport::Keypair::generate().unwrap().public;
        assert_eq!(rights_of(Some(&list), Some(&stranger)), None);
        assert_eq!(rights_of(Some(&list), None), None);
        assert_eq!(rights_of(None, None), Some(Rights::all()));
    }
}
