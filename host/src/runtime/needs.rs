//! What one instance of a component needs from the instance pool: core
//! instances, memories and tables, and the smallest memory and table it
//! starts with. Read from the component's binary before the engine is
//! made, so the pool is sized for the component actually loaded (a Rust
//! sensor is 3 core instances, a componentize-py one 14), and checked again
//! for a component swapped in later.

use wasmparser::{Instance, Parser, Payload, TypeRef};

/// A component's needs per instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Needs {
    /// Core module instantiations.
    pub core_instances: u32,
    /// Memories and tables defined by its core modules (imports are
    /// someone else's).
    pub memories: u32,
    pub tables: u32,
    /// The largest initial size of any memory, in bytes, and of any table,
    /// in elements.
    pub min_memory_bytes: u64,
    pub min_table_elements: u64,
    /// Bytes of data its memories start with (all its data segments).
    pub image_bytes: u64,
}

impl Needs {
    /// Reads the needs of the component in `bytes`; an error says why the
    /// binary cannot be read.
    pub fn of(bytes: &[u8]) -> Result<Needs, String> {
        let mut needs = Needs::default();
        for payload in Parser::new(0).parse_all(bytes) {
            match payload.map_err(|e| e.to_string())? {
                Payload::InstanceSection(reader) => {
                    for instance in reader {
                        if matches!(instance.map_err(|e| e.to_string())?, Instance::Instantiate { .. }) {
                            needs.core_instances += 1;
                        }
                    }
                }
                Payload::MemorySection(reader) => {
                    for memory in reader {
                        let memory = memory.map_err(|e| e.to_string())?;
                        needs.memories += 1;
                        let page = 1u64 << memory.page_size_log2.unwrap_or(16);
                        needs.min_memory_bytes = needs.min_memory_bytes.max(memory.initial.saturating_mul(page));
                    }
                }
                Payload::TableSection(reader) => {
                    for table in reader {
                        let table = table.map_err(|e| e.to_string())?;
                        needs.tables += 1;
                        needs.min_table_elements = needs.min_table_elements.max(table.ty.initial);
                    }
                }
                Payload::DataSection(reader) => {
                    for data in reader {
                        needs.image_bytes += data.map_err(|e| e.to_string())?.data.len() as u64;
                    }
                }
                Payload::ImportSection(reader) => {
                    // Imported memories and tables are defined elsewhere, but
                    // their declared minimum must still fit.
                    for import in reader.into_imports() {
                        match import.map_err(|e| e.to_string())?.ty {
                            TypeRef::Memory(m) => {
                                let page = 1u64 << m.page_size_log2.unwrap_or(16);
                                needs.min_memory_bytes = needs.min_memory_bytes.max(m.initial.saturating_mul(page));
                            }
                            TypeRef::Table(t) => needs.min_table_elements = needs.min_table_elements.max(t.initial),
                            _ => {}
                        }
                    }
                }
                _ => {}
            }
        }
        Ok(needs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_built_in_sensor_is_three_core_instances_with_small_memories() {
        let needs = Needs::of(crate::runtime::BUILTIN_SENSOR).unwrap();
        assert_eq!(needs.core_instances, 3, "{needs:?}");
        assert!(needs.memories >= 1 && needs.memories <= 3, "{needs:?}");
        assert!(needs.min_memory_bytes > 0 && needs.min_memory_bytes <= 4 << 20, "{needs:?}");
        assert!(needs.image_bytes > 0 && needs.image_bytes <= super::super::COPY_IMAGES_UP_TO, "{needs:?}");
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert!(Needs::of(b"\0asm\x0d\0\x01\0\xff\xff\xff").is_err());
        assert!(Needs::of(b"").is_err());
        let built_in = crate::runtime::BUILTIN_SENSOR;
        assert!(Needs::of(&built_in[..built_in.len() / 2]).is_err(), "a truncated component");
    }
}
