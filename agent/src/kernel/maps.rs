//! Small helpers over aya maps shared by the subsystems.

use aya::{
    Ebpf, Pod,
    maps::{Map, MapData, MapError, PerCpuArray, PerCpuValues},
    util::nr_cpus,
};

use crate::kernel::loader::LoadError;

/// Takes a map out of the loaded object with its expected type.
pub fn take<T: TryFrom<Map, Error = MapError>>(
    ebpf: &mut Ebpf,
    name: &'static str,
) -> Result<T, LoadError> {
    let map = ebpf.take_map(name).ok_or(LoadError::MissingMap(name))?;
    T::try_from(map).map_err(|source| LoadError::MapType {
        map: name,
        source: Box::new(source),
    })
}

/// Zeroes one slot of a per-CPU array on every CPU, so a reused slot starts from nothing.
pub fn clear_slot<T: Pod + Default>(
    map: &mut PerCpuArray<MapData, T>,
    slot: u32,
) -> Result<(), MapError> {
    let cpus = nr_cpus().map_err(|(_, io_error)| {
        MapError::SyscallError(aya::sys::SyscallError {
            call: "nr_cpus",
            io_error,
        })
    })?;
    let zero = PerCpuValues::try_from(vec![T::default(); cpus]).map_err(|io_error| {
        MapError::SyscallError(aya::sys::SyscallError {
            call: "PerCpuValues",
            io_error,
        })
    })?;
    map.set(slot, zero, 0)
}

/// Sums a per-CPU value over all CPUs with `add`; an unreadable slot gives the default.
pub fn sum_slot<T: Pod + Default>(
    map: &PerCpuArray<MapData, T>,
    slot: u32,
    add: impl Fn(&mut T, &T),
) -> T {
    let mut total = T::default();
    if let Ok(values) = map.get(&slot, 0) {
        for v in values.iter() {
            add(&mut total, v);
        }
    }
    total
}
