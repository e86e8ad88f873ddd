//! The host's own binding of the WIT `visit` record, the argument of
//! `tick`, and of the `average` records it carries.
//!
//! Every sensor takes every average, so the averages are by far the most
//! lowered values of the host: at half a million sensors and a few
//! averages a second, millions of records a second. Lowered the way
//! wasmtime's derived code lowers a record (each field on its own, each
//! looking up the guest's memory and working out its offset again), a list
//! of averages took over a quarter of the host's CPU. Here a list of
//! averages is written with one look-up of the memory, each record from
//! offsets fixed at compile time.
//!
//! Both types are checked against the component's WIT types when a sensor
//! is instantiated ([`wasmtime::component::Func::typed`]), like every
//! binding, so a field out of place fails the load, not a call.

use std::mem::MaybeUninit;

use wasmtime::component::__internal::{InterfaceType, LowerContext, bad_type_info, map_maybe_uninit};
use wasmtime::component::{ComponentType, Lower};

use super::WitAck;

/// The WIT `visit` (see `wit/sensor.wit`).
#[derive(ComponentType, Lower, Clone, Debug)]
#[component(record)]
pub struct Visit {
    pub ack: Option<WitAck>,
    pub averages: Option<Vec<Average>>,
    pub make: u32,
    #[component(name = "every-ms")]
    pub every_ms: u32,
}

/// The WIT `average` (see `wit/sensor.wit`).
#[derive(ComponentType, Clone, Copy, Debug, PartialEq)]
#[component(record)]
pub struct Average {
    pub seq: u64,
    pub epoch: u64,
    pub segment: u32,
    #[component(name = "window-end-ms")]
    pub window_end_ms: u64,
    pub count: u32,
    #[component(name = "sum-kmh")]
    pub sum_kmh: u64,
    #[component(name = "mean-kmh")]
    pub mean_kmh: f32,
    pub revision: u32,
    pub chain: u64,
}

/// The size of each field of [`Average`], in order; each is also its
/// alignment (all are plain numbers).
const FIELD_SIZES: [usize; 9] = [8, 8, 4, 8, 4, 8, 4, 4, 8];

/// Where each field of an [`Average`] lies in guest memory, and the
/// record's size: the canonical ABI puts each field at the next offset
/// aligned to it and pads the record to its largest alignment.
const LAYOUT: ([usize; 9], usize) = {
    let (mut offsets, mut at, mut i, mut align) = ([0; 9], 0usize, 0, 1);
    while i < FIELD_SIZES.len() {
        let size = FIELD_SIZES[i];
        at = at.next_multiple_of(size);
        offsets[i] = at;
        at += size;
        if size > align {
            align = size;
        }
        i += 1;
    }
    (offsets, at.next_multiple_of(align))
};
const OFFSETS: [usize; 9] = LAYOUT.0;
const SIZE: usize = LAYOUT.1;
// The layout above is the one wasmtime derives from the same fields.
const _: () = assert!(SIZE == <Average as ComponentType>::SIZE32);
const _: () = assert!(<Average as ComponentType>::ALIGN32 == 8);

impl Average {
    /// Writes the record as the canonical ABI lays it out.
    fn store(&self, dst: &mut [u8; SIZE]) {
        fn put<const N: usize>(dst: &mut [u8; SIZE], at: usize, bytes: [u8; N]) {
            dst[at..at + N].copy_from_slice(&bytes);
        }
        put(dst, OFFSETS[0], self.seq.to_le_bytes());
        put(dst, OFFSETS[1], self.epoch.to_le_bytes());
        put(dst, OFFSETS[2], self.segment.to_le_bytes());
        put(dst, OFFSETS[3], self.window_end_ms.to_le_bytes());
        put(dst, OFFSETS[4], self.count.to_le_bytes());
        put(dst, OFFSETS[5], self.sum_kmh.to_le_bytes());
        put(dst, OFFSETS[6], self.mean_kmh.to_bits().to_le_bytes());
        put(dst, OFFSETS[7], self.revision.to_le_bytes());
        put(dst, OFFSETS[8], self.chain.to_le_bytes());
    }
}

// SAFETY: `Average` derives its `ComponentType` (the ABI and the typecheck
// against the component's `average`); lowering writes exactly that layout
// (checked above), within the bounds wasmtime allocated for it.
unsafe impl Lower for Average {
    fn linear_lower_to_flat<T>(
        &self,
        cx: &mut LowerContext<'_, T>,
        ty: InterfaceType,
        dst: &mut MaybeUninit<Self::Lower>,
    ) -> wasmtime::Result<()> {
        // As derived: an average is lowered flat only as a lone argument,
        // which the sensor world never passes.
        let ty = match ty {
            InterfaceType::Record(i) => &cx.types[i],
            _ => bad_type_info(),
        };
        let field = |i: usize| ty.fields[i].ty;
        let (f0, f1, f2, f3, f4, f5, f6, f7, f8) =
            (field(0), field(1), field(2), field(3), field(4), field(5), field(6), field(7), field(8));
        self.seq.linear_lower_to_flat(cx, f0, map_maybe_uninit!(dst.seq))?;
        self.epoch.linear_lower_to_flat(cx, f1, map_maybe_uninit!(dst.epoch))?;
        self.segment.linear_lower_to_flat(cx, f2, map_maybe_uninit!(dst.segment))?;
        self.window_end_ms.linear_lower_to_flat(cx, f3, map_maybe_uninit!(dst.window_end_ms))?;
        self.count.linear_lower_to_flat(cx, f4, map_maybe_uninit!(dst.count))?;
        self.sum_kmh.linear_lower_to_flat(cx, f5, map_maybe_uninit!(dst.sum_kmh))?;
        self.mean_kmh.linear_lower_to_flat(cx, f6, map_maybe_uninit!(dst.mean_kmh))?;
        self.revision.linear_lower_to_flat(cx, f7, map_maybe_uninit!(dst.revision))?;
        self.chain.linear_lower_to_flat(cx, f8, map_maybe_uninit!(dst.chain))?;
        Ok(())
    }

    fn linear_lower_to_memory<T>(
        &self,
        cx: &mut LowerContext<'_, T>,
        _ty: InterfaceType,
        offset: usize,
    ) -> wasmtime::Result<()> {
        self.store(cx.get::<SIZE>(offset));
        Ok(())
    }

    fn linear_store_list_to_memory<T>(
        cx: &mut LowerContext<'_, T>,
        _ty: InterfaceType,
        offset: usize,
        items: &[Self],
    ) -> wasmtime::Result<()> {
        let len = items.len().checked_mul(SIZE);
        let dst = len
            .and_then(|len| cx.as_slice_mut().get_mut(offset..)?.get_mut(..len))
            .ok_or_else(|| wasmtime::format_err!("a list of averages out of bounds of the sensor's memory"))?;
        let (records, _) = dst.as_chunks_mut::<SIZE>();
        for (record, average) in records.iter_mut().zip(items) {
            average.store(record);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::runtime::{BUILTIN_SENSOR, Limits, SensorConfig, SensorEngine, needs_of};

    /// `n` averages of varied fields (so a field written in another's place
    /// shows), chained as a server chains them.
    fn chained(n: u64) -> Vec<Average> {
        let mut chain = 0;
        (1..=n)
            .map(|seq| {
                let (count, sum_kmh) = (u32::try_from(seq).unwrap() * 3, seq * 250 + 7);
                let mut a = Average {
                    seq,
                    epoch: 2 + seq % 3,
                    segment: u32::try_from(seq % 4).unwrap(),
                    window_end_ms: 1_700_000_000_000 + seq * 1_000,
                    count,
                    sum_kmh,
                    mean_kmh: sum_kmh as f32 / count as f32,
                    revision: u32::try_from(seq % 5).unwrap(),
                    chain: 0,
                };
                chain = fog_protocol::Average::from(&a).link(chain);
                a.chain = chain;
                a
            })
            .collect()
    }

    /// The built-in sensor checks every average against its chain, which
    /// covers every field but the mean: lowered anywhere else than the
    /// canonical ABI puts it, a field breaks the chain and the sensor
    /// stops applying.
    #[test]
    fn a_list_of_averages_lowered_in_one_copy_is_what_the_sensor_chains() {
        let needs = needs_of("built-in", BUILTIN_SENSOR).unwrap();
        let limits = Limits { max_memory_bytes: 4 << 20, call_deadline: Duration::from_secs(5), max_instances: 1, per_instance: Limits::pool_for(&needs, 0) };
        let engine = SensorEngine::new(limits, None).unwrap();
        let component = engine.from_bytes("built-in".into(), BUILTIN_SENSOR).unwrap();
        let config = SensorConfig { sensor_id: 1, segment: 1, resend_after_ms: 1_000, max_buffered: 100, settings: Vec::new() };
        let mut sensor = engine.instantiate(&component, config, 7).unwrap();
        sensor.init().unwrap();
        let averages = chained(40);
        let last = averages[39];
        for part in averages.chunks(13) {
            let visit = Visit { ack: None, averages: Some(part.to_vec()), make: 0, every_ms: 0 };
            sensor.tick(&visit).unwrap();
        }
        let status = sensor.status().unwrap();
        assert_eq!(status.averages_applied, 40);
        assert_eq!(status.averages_missed, 0);
        assert_eq!(status.averages_digest, last.chain);
        let at = status.last_average.map(|c| (c.seq, c.epoch, c.chain));
        assert_eq!(at, Some((last.seq, last.epoch, last.chain)));
    }
}
