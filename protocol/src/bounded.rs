//! Lists decoded within bounds: a list whose length prefix is over its
//! bound, or over what is left of the whole message's budget, fails the
//! decode before anything is allocated for it. Without this a 16 MiB frame
//! of one-byte varints decodes into a list of 16.7 M `u64`s (134 MB, and a
//! tenth of a second) before any check of the decoded message could refuse
//! it.
//!
//! The budget is per decode ([`within`]) and counts the elements of every
//! bounded list in the message, nested ones included: a reply of 256 acks
//! of 65 535 selective acks each passes each list's bound but not the
//! budget. Outside [`within`] only each list's own bound applies.

use std::cell::Cell;
use std::fmt;
use std::marker::PhantomData;

use serde::de::{Deserialize, Deserializer, Error, SeqAccess, Visitor};

thread_local! {
    /// Elements the decode in progress may still take (`None`: no budget),
    /// and the list that failed it, if one did.
    static BUDGET: Cell<Option<usize>> = const { Cell::new(None) };
    static OVER: Cell<Option<Over>> = const { Cell::new(None) };
}

/// A list longer than its bound (`max`), or than what was left of the
/// message's budget (`max: None`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Over {
    pub elements: usize,
    pub max: Option<usize>,
}

impl fmt::Display for Over {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match self.max {
            Some(max) => write!(f, "a list of {} elements, at most {max}", self.elements),
            None => write!(f, "a list of {} elements past what the whole message may hold", self.elements),
        }
    }
}

/// Runs `decode` with at most `elements` elements in its bounded lists;
/// says which list was over, if one was.
pub fn within<T>(elements: usize, decode: impl FnOnce() -> T) -> (T, Option<Over>) {
    let outer = BUDGET.with(|b| b.replace(Some(elements)));
    OVER.with(|o| o.set(None));
    let out = decode();
    BUDGET.with(|b| b.set(outer));
    (out, OVER.with(Cell::take))
}

/// Takes `n` elements from the budget; false when it has fewer.
fn take(n: usize) -> bool {
    BUDGET.with(|b| match b.get() {
        None => true,
        Some(left) if n <= left => {
            b.set(Some(left - n));
            true
        }
        Some(_) => false,
    })
}

fn over<E: Error>(elements: usize, max: Option<usize>) -> E {
    let o = Over { elements, max };
    OVER.with(|c| c.set(Some(o)));
    E::custom(o)
}

/// `#[serde(deserialize_with = "bounded::vec::<_, _, MAX>")]`: a list of at
/// most `MAX` elements, within the budget.
pub fn vec<'de, D, T, const MAX: usize>(deserializer: D) -> Result<Vec<T>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    deserializer.deserialize_seq(Bounded::<T, MAX>(PhantomData))
}

struct Bounded<T, const MAX: usize>(PhantomData<T>);

impl<'de, T: Deserialize<'de>, const MAX: usize> Visitor<'de> for Bounded<T, MAX> {
    type Value = Vec<T>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "a list of at most {MAX} elements")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<T>, A::Error> {
        // postcard gives the exact length before any element.
        let n = seq.size_hint().unwrap_or(0);
        if n > MAX {
            return Err(over(n, Some(MAX)));
        }
        if !take(n) {
            return Err(over(n, None));
        }
        let mut out = Vec::with_capacity(n);
        while let Some(x) = seq.next_element()? {
            if out.len() == MAX {
                return Err(over(MAX + 1, Some(MAX)));
            }
            // More elements than the prefix said (a format without one):
            // each is taken from the budget as it comes.
            if out.len() >= n && !take(1) {
                return Err(over(out.len() + 1, None));
            }
            out.push(x);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use serde::{Deserialize, Serialize};

    #[derive(Debug, Serialize, Deserialize, PartialEq)]
    struct Outer {
        #[serde(deserialize_with = "super::vec::<_, _, 4>")]
        inner: Vec<Inner>,
    }

    #[derive(Debug, Serialize, Deserialize, PartialEq)]
    struct Inner {
        #[serde(deserialize_with = "super::vec::<_, _, 3>")]
        xs: Vec<u64>,
    }

    fn bytes(lists: &[usize]) -> Vec<u8> {
        let outer = Outer { inner: lists.iter().map(|&n| Inner { xs: vec![7; n] }).collect() };
        postcard::to_allocvec(&outer).expect("encodes")
    }

    #[test]
    fn each_list_within_its_bound_and_all_within_the_budget() {
        let decode = |b: &[u8]| postcard::from_bytes::<Outer>(b);
        assert!(decode(&bytes(&[3, 3, 3, 3])).is_ok());
        assert!(decode(&bytes(&[3, 4])).is_err(), "an inner list past its bound");
        assert!(decode(&bytes(&[1, 1, 1, 1, 1])).is_err(), "the outer list past its bound");
        // Budget of 10: the outer list (4) and its lists (3 + 3) fit; a
        // fourth element more does not.
        let (ok, over) = super::within(10, || decode(&bytes(&[3, 3, 0, 0])));
        assert!(ok.is_ok() && over.is_none());
        let (err, over) = super::within(10, || decode(&bytes(&[3, 3, 1, 0])));
        assert!(err.is_err());
        assert_eq!(over, Some(super::Over { elements: 1, max: None }));
        // The budget is the decode's own: afterwards none applies.
        assert!(decode(&bytes(&[3, 3, 3, 3])).is_ok());
    }

    #[test]
    fn a_list_without_a_length_prefix_is_charged_as_it_comes() {
        use serde::de::value::{Error, SeqDeserializer};
        let unhinted = |n: u64| {
            let mut i = 0;
            SeqDeserializer::<_, Error>::new(std::iter::from_fn(move || (i < n).then(|| {
                i += 1;
                i
            })))
        };
        let (ok, _) = super::within(5, || super::vec::<_, u64, 10>(unhinted(5)));
        assert_eq!(ok.expect("within the budget"), vec![1, 2, 3, 4, 5]);
        let (err, over) = super::within(5, || super::vec::<_, u64, 10>(unhinted(6)));
        assert!(err.is_err());
        assert_eq!(over, Some(super::Over { elements: 6, max: None }));
        let (err, over) = super::within(100, || super::vec::<_, u64, 10>(unhinted(11)));
        assert!(err.is_err());
        assert_eq!(over, Some(super::Over { elements: 11, max: Some(10) }));
    }

    #[test]
    fn a_list_past_its_bound_is_named_and_a_huge_length_prefix_fails_at_once() {
        let (err, over) = super::within(usize::MAX, || postcard::from_bytes::<Outer>(&bytes(&[4])));
        assert!(err.is_err());
        assert_eq!(over, Some(super::Over { elements: 4, max: Some(3) }));
        // One outer element whose list claims u32::MAX elements and holds
        // none: an error at once, nothing read or allocated for it.
        let mut b = vec![1u8];
        b.extend([0xff, 0xff, 0xff, 0xff, 0x0f]);
        let (err, _) = super::within(usize::MAX, || postcard::from_bytes::<Outer>(&b));
        assert!(err.is_err());
    }

    #[test]
    fn a_reply_of_16_mib_of_selective_acks_is_refused_long_before_its_end_and_a_status_report_unread() {
        use crate::{BatchReply, DecodeError, MAX_READINGS_PER_BATCH, Reply, SensorAck, decode_reply, encode};
        // 256 acks of 65 535 selective acks of one byte each: every list
        // within its bound, 16.7 M u64s (134 MB) in all.
        let ack = SensorAck { sensor_id: 1, incarnation: 1, next_seq: 1, also: vec![1; MAX_READINGS_PER_BATCH - 1] };
        let frame = encode(&Reply::Batch(BatchReply { acks: vec![ack; 255], ..BatchReply::default() })).expect("under 16 MiB");
        match decode_reply(&frame) {
            Err(DecodeError::ListTooLong(why)) => assert!(why.contains("past what the whole message may hold"), "{why}"),
            other => panic!("decoded: {:?}", other.map(|_| ())),
        }
        // A host never asks for a status report: one is refused unread.
        // (A real decode of these bytes would fail as malformed.)
        let mut frame = vec![crate::PROTOCOL_VERSION, 2];
        frame.extend(std::iter::repeat_n(0xffu8, 64));
        assert!(matches!(decode_reply(&frame), Err(DecodeError::ReplyOutOfBounds(_))));
    }
}
