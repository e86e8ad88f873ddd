//! The built-in sensor as a component: [`SensorCore`] with its own traffic
//! model, exported through the shared glue.

use crate::core::{SensorConfig, SensorCore};
use crate::glue::{SensorLogic, restore_core};

pub struct BuiltIn(SensorCore);

impl SensorLogic for BuiltIn {
    fn start(config: &SensorConfig, seed: u64, now_ms: u64) -> Self {
        BuiltIn(SensorCore::new(config, seed, now_ms))
    }

    fn core(&mut self) -> &mut SensorCore {
        &mut self.0
    }

    /// The snapshot must be of this sensor id; identity, sequence, unacked
    /// readings, average cursor and limit come from it.
    fn restore(bytes: &[u8], config: &SensorConfig, _now_ms: u64) -> Result<Self, String> {
        restore_core(bytes, config).map(BuiltIn)
    }
}

crate::export_sensor!("../wit", BuiltIn);
