//! The rule maps, one per family: the rest of the agent deals in [`UdpMatchKey`]s, IPv4 keys
//! go to their own map in its shorter form ([`UdpMatchKeyV4`]).

use aya::{
    Ebpf,
    maps::{HashMap as BpfHashMap, MapData, MapError},
};
use edgeplane_common::udp_forward::{
    RULES_MAP, RULES_V4_MAP, UdpForwardAction, UdpMatchKey, UdpMatchKeyV4,
};

use crate::kernel::{loader::LoadError, maps};

pub struct RuleMaps {
    v4: BpfHashMap<MapData, UdpMatchKeyV4, UdpForwardAction>,
    v6: BpfHashMap<MapData, UdpMatchKey, UdpForwardAction>,
}

impl RuleMaps {
    /// Takes both maps out of the loaded object.
    pub fn take(ebpf: &mut Ebpf) -> Result<Self, LoadError> {
        Ok(Self {
            v4: maps::take(ebpf, RULES_V4_MAP)?,
            v6: maps::take(ebpf, RULES_MAP)?,
        })
    }

    pub fn insert(
        &mut self,
        key: &UdpMatchKey,
        action: &UdpForwardAction,
    ) -> Result<(), (&'static str, MapError)> {
        match UdpMatchKeyV4::from_key(key) {
            Some(k) => self.v4.insert(k, action, 0).map_err(|e| (RULES_V4_MAP, e)),
            None => self.v6.insert(key, action, 0).map_err(|e| (RULES_MAP, e)),
        }
    }

    pub fn remove(&mut self, key: &UdpMatchKey) -> Result<(), (&'static str, MapError)> {
        match UdpMatchKeyV4::from_key(key) {
            Some(k) => self.v4.remove(&k).map_err(|e| (RULES_V4_MAP, e)),
            None => self.v6.remove(key).map_err(|e| (RULES_MAP, e)),
        }
    }

    /// Every entry of both maps, IPv4 keys in their family-neutral form.
    pub fn entries(
        &self,
    ) -> Result<Vec<(UdpMatchKey, UdpForwardAction)>, (&'static str, MapError)> {
        let mut out = Vec::new();
        for entry in self.v4.iter() {
            let (k, v) = entry.map_err(|e| (RULES_V4_MAP, e))?;
            out.push((k.to_key(), v));
        }
        for entry in self.v6.iter() {
            out.push(entry.map_err(|e| (RULES_MAP, e))?);
        }
        Ok(out)
    }
}
