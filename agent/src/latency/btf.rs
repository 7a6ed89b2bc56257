//! Struct field offsets from the kernel's BTF (/sys/kernel/btf/vmlinux), read in place.
//!
//! The latency programs need a handful of offsets (`sk_buff.tstamp`, ...). A general BTF
//! library builds a map of every type the kernel has (about 48 MB of heap for 6.18's 5.5 MB
//! of BTF); this reads the type section once into an index of where each type starts
//! (4 bytes a type) and answers from the bytes themselves. Every read is bounds-checked: a
//! short or malformed blob is an error, never a panic.

const MAGIC: u16 = 0xeb9f;
const HEADER_LEN: usize = 24;
const TYPE_HEADER_LEN: usize = 12;

const KIND_INT: u32 = 1;
const KIND_ARRAY: u32 = 3;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_ENUM: u32 = 6;
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
const KIND_FUNC_PROTO: u32 = 13;
const KIND_VAR: u32 = 14;
const KIND_DATASEC: u32 = 15;
const KIND_DECL_TAG: u32 = 17;
const KIND_TYPE_TAG: u32 = 18;
const KIND_ENUM64: u32 = 19;
const KIND_MAX: u32 = 19;

/// Why an offset could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BtfError {
    #[error("not BTF (bad magic or header)")]
    Header,
    #[error("truncated at byte {0}")]
    Truncated(usize),
    #[error("unknown type kind {kind} (type {id}): a BTF newer than this agent")]
    UnknownKind { kind: u32, id: u32 },
    #[error("no struct {0}")]
    NoStruct(String),
    #[error("no member {0}")]
    NoMember(String),
    #[error("{0} is a bitfield")]
    Bitfield(String),
    #[error("{0} is not byte-aligned")]
    Unaligned(String),
    #[error("type {0} is out of range or not a struct or union")]
    BadType(u32),
}

/// A BTF blob and where each of its types starts.
pub struct Btf<'a> {
    types: &'a [u8],
    strings: &'a [u8],
    /// Offset into `types` of type id `i + 1` (id 0 is `void`).
    starts: Vec<u32>,
}

fn u32_at(b: &[u8], at: usize) -> Result<u32, BtfError> {
    b.get(at..at + 4)
        .map(|s| u32::from_le_bytes(s.try_into().expect("4 bytes")))
        .ok_or(BtfError::Truncated(at))
}

struct Type {
    name_off: u32,
    kind: u32,
    vlen: usize,
    kind_flag: bool,
    /// `size` for structs and unions, `type` for typedefs and modifiers.
    size_or_type: u32,
    /// Where its members start in the type section.
    members: usize,
}

struct Member {
    name_off: u32,
    type_id: u32,
    bit_offset: u32,
    bitfield_size: u32,
}

impl<'a> Btf<'a> {
    /// Indexes a little-endian BTF blob (the kernel's own byte order on every target here).
    pub fn parse(data: &'a [u8]) -> Result<Self, BtfError> {
        if data.len() < HEADER_LEN || u16::from_le_bytes([data[0], data[1]]) != MAGIC {
            return Err(BtfError::Header);
        }
        let hdr_len = u32_at(data, 4)? as usize;
        let field = |at| u32_at(data, at).map(|v| v as usize);
        let (type_off, type_len, str_off, str_len) =
            (field(8)?, field(12)?, field(16)?, field(20)?);
        let section = |off: usize, len: usize| {
            let start = hdr_len.checked_add(off).ok_or(BtfError::Header)?;
            let end = start.checked_add(len).ok_or(BtfError::Header)?;
            data.get(start..end).ok_or(BtfError::Truncated(end))
        };
        let types = section(type_off, type_len)?;
        let strings = section(str_off, str_len)?;
        let mut starts = Vec::with_capacity(types.len() / 24);
        let mut at = 0usize;
        while at < types.len() {
            let id = u32::try_from(starts.len() + 1).map_err(|_| BtfError::Header)?;
            starts.push(u32::try_from(at).map_err(|_| BtfError::Header)?);
            let info = u32_at(types, at + 4)?;
            let (kind, vlen) = ((info >> 24) & 0x1f, (info & 0xffff) as usize);
            let extra = match kind {
                KIND_INT | KIND_VAR | KIND_DECL_TAG => 4,
                KIND_ARRAY => 12,
                KIND_STRUCT | KIND_UNION | KIND_DATASEC | KIND_ENUM64 => 12 * vlen,
                KIND_ENUM | KIND_FUNC_PROTO => 8 * vlen,
                k if k <= KIND_MAX => 0,
                kind => return Err(BtfError::UnknownKind { kind, id }),
            };
            at += TYPE_HEADER_LEN + extra;
        }
        if at != types.len() {
            return Err(BtfError::Truncated(types.len()));
        }
        Ok(Self {
            types,
            strings,
            starts,
        })
    }

    fn ty(&self, id: u32) -> Result<Type, BtfError> {
        let start = *id
            .checked_sub(1)
            .and_then(|i| self.starts.get(i as usize))
            .ok_or(BtfError::BadType(id))? as usize;
        let info = u32_at(self.types, start + 4)?;
        Ok(Type {
            name_off: u32_at(self.types, start)?,
            kind: (info >> 24) & 0x1f,
            vlen: (info & 0xffff) as usize,
            kind_flag: info >> 31 == 1,
            size_or_type: u32_at(self.types, start + 8)?,
            members: start + TYPE_HEADER_LEN,
        })
    }

    fn name(&self, off: u32) -> &[u8] {
        let rest = self.strings.get(off as usize..).unwrap_or_default();
        &rest[..rest.iter().position(|&b| b == 0).unwrap_or(rest.len())]
    }

    fn member(&self, ty: &Type, i: usize) -> Result<Member, BtfError> {
        let at = ty.members + 12 * i;
        let offset = u32_at(self.types, at + 8)?;
        let (bit_offset, bitfield_size) = if ty.kind_flag {
            (offset & 0xff_ffff, offset >> 24)
        } else {
            (offset, 0)
        };
        Ok(Member {
            name_off: u32_at(self.types, at)?,
            type_id: u32_at(self.types, at + 4)?,
            bit_offset,
            bitfield_size,
        })
    }

    /// The struct or union behind typedefs and qualifiers.
    fn composite(&self, mut id: u32) -> Result<Type, BtfError> {
        // Bounded: a malformed blob may loop typedefs into each other.
        for _ in 0..32 {
            let ty = self.ty(id)?;
            match ty.kind {
                KIND_STRUCT | KIND_UNION => return Ok(ty),
                KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG => {
                    id = ty.size_or_type;
                }
                _ => break,
            }
        }
        Err(BtfError::BadType(id))
    }

    /// `name`'s member (searched through anonymous structs and unions as C does): its bit
    /// offset from the start of `ty`, and the member.
    fn find(&self, ty: &Type, name: &[u8], depth: u32) -> Result<Option<(u32, Member)>, BtfError> {
        if depth > 8 {
            return Ok(None);
        }
        for i in 0..ty.vlen {
            let m = self.member(ty, i)?;
            if self.name(m.name_off) == name {
                return Ok(Some((m.bit_offset, m)));
            }
            if m.name_off == 0
                && let Ok(inner) = self.composite(m.type_id)
                && let Some((off, found)) = self.find(&inner, name, depth + 1)?
            {
                return Ok(Some((m.bit_offset + off, found)));
            }
        }
        Ok(None)
    }

    /// The byte offset of `path` (`field` or `field.inner...`) in struct `name`.
    pub fn offset_of(&self, name: &str, path: &str) -> Result<u32, BtfError> {
        let id = (1..=self.starts.len() as u32)
            .find(|&id| {
                self.ty(id).is_ok_and(|t| {
                    t.kind == KIND_STRUCT && t.vlen > 0 && self.name(t.name_off) == name.as_bytes()
                })
            })
            .ok_or_else(|| BtfError::NoStruct(name.to_owned()))?;
        let mut ty = self.ty(id)?;
        let mut bits = 0u32;
        let mut parts = path.split('.').peekable();
        while let Some(part) = parts.next() {
            let (off, member) = self
                .find(&ty, part.as_bytes(), 0)?
                .ok_or_else(|| BtfError::NoMember(format!("{name}.{path}")))?;
            bits = bits.checked_add(off).ok_or(BtfError::BadType(id))?;
            if parts.peek().is_some() {
                ty = self.composite(member.type_id)?;
            } else if member.bitfield_size != 0 {
                return Err(BtfError::Bitfield(format!("{name}.{path}")));
            }
        }
        if !bits.is_multiple_of(8) {
            return Err(BtfError::Unaligned(format!("{name}.{path}")));
        }
        Ok(bits / 8)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A blob with `struct outer { int a; union { int b; struct inner c; }; }` and
    /// `struct inner { int x; int y; }`.
    fn blob() -> Vec<u8> {
        let strings = b"\0int\0outer\0a\0b\0c\0inner\0x\0y\0";
        let s = |name: &str| {
            let pos = strings
                .windows(name.len() + 2)
                .position(|w| {
                    w[0] == 0 && &w[1..=name.len()] == name.as_bytes() && w[name.len() + 1] == 0
                })
                .unwrap();
            (pos + 1) as u32
        };
        let mut types = Vec::new();
        let mut put = |v: &[u32]| v.iter().for_each(|x| types.extend(x.to_le_bytes()));
        // 1: int
        put(&[s("int"), KIND_INT << 24, 4, 32]);
        // 2: struct inner { int x @0; int y @32 bits }
        put(&[s("inner"), KIND_STRUCT << 24 | 2, 8]);
        put(&[s("x"), 1, 0, s("y"), 1, 32]);
        // 3: anonymous union { int b; struct inner c; }
        put(&[0, KIND_UNION << 24 | 2, 8]);
        put(&[s("b"), 1, 0, s("c"), 2, 0]);
        // 4: struct outer { int a @0; union @64 bits }
        put(&[s("outer"), KIND_STRUCT << 24 | 2, 16]);
        put(&[s("a"), 1, 0, 0, 3, 64]);
        let mut out = Vec::new();
        out.extend(MAGIC.to_le_bytes());
        out.extend([1, 0]);
        for v in [
            24u32,
            0,
            types.len() as u32,
            types.len() as u32,
            strings.len() as u32,
        ] {
            out.extend(v.to_le_bytes());
        }
        out.extend(&types);
        out.extend(strings);
        out
    }

    #[test]
    fn offsets_are_found_through_anonymous_unions_and_nested_structs() {
        let data = blob();
        let btf = Btf::parse(&data).unwrap();
        assert_eq!(btf.offset_of("outer", "a"), Ok(0));
        assert_eq!(btf.offset_of("outer", "b"), Ok(8));
        assert_eq!(btf.offset_of("outer", "c.y"), Ok(12));
        assert_eq!(btf.offset_of("inner", "y"), Ok(4));
        assert!(matches!(
            btf.offset_of("outer", "z"),
            Err(BtfError::NoMember(_))
        ));
        assert!(matches!(
            btf.offset_of("nope", "a"),
            Err(BtfError::NoStruct(_))
        ));
    }

    #[test]
    fn a_cut_or_foreign_blob_is_an_error() {
        let data = blob();
        for len in 0..data.len() {
            // Cut anywhere: an error or (cut inside the strings) a missing name, never a panic.
            if let Ok(btf) = Btf::parse(&data[..len]) {
                let _ = btf.offset_of("outer", "c.y");
            }
        }
        let mut bad = data.clone();
        bad[0] = 0;
        assert_eq!(Btf::parse(&bad).err(), Some(BtfError::Header));
    }

    /// Against btfparse, the general library this replaced, on the running kernel's BTF.
    #[test]
    fn the_running_kernel_gives_what_btfparse_gives() {
        let Ok(bytes) = std::fs::read("/sys/kernel/btf/vmlinux") else {
            eprintln!("no /sys/kernel/btf/vmlinux: skipped");
            return;
        };
        struct Bytes<'a>(&'a [u8]);
        impl btfparse::Readable for Bytes<'_> {
            fn read(&self, offset: u64, buffer: &mut [u8]) -> btfparse::Result<()> {
                let s = offset as usize;
                let src = self.0.get(s..s + buffer.len()).ok_or_else(|| {
                    btfparse::Error::new(btfparse::ErrorKind::EOF, "read past the end")
                })?;
                buffer.copy_from_slice(src);
                Ok(())
            }
        }
        let reference = btfparse::TypeInformation::new(&Bytes(&bytes)).unwrap();
        let btf = Btf::parse(&bytes).unwrap();
        for (ty, path) in [
            ("sk_buff", "tstamp"),
            ("sk_buff", "skb_iif"),
            ("sk_buff", "head"),
            ("sk_buff", "network_header"),
            ("sk_buff", "transport_header"),
            ("sock", "__sk_common.skc_family"),
        ] {
            let id = reference.id_of(ty).unwrap();
            let want = match reference.offset_of(id, path).unwrap().1 {
                btfparse::Offset::ByteOffset(o) => o,
                other => panic!("{ty}.{path}: {other:?}"),
            };
            assert_eq!(btf.offset_of(ty, path), Ok(want), "{ty}.{path}");
        }
    }
}
