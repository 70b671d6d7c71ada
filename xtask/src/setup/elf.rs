//! Just enough ELF to list a binary's DT_NEEDED libraries: reading the few
//! hundred bytes involved is far cheaper than scanning a 40 MB bpf-linker, and
//! `setup` runs before every command.
use std::{fs::File, os::unix::fs::FileExt as _, path::Path};

use anyhow::{Context as _, bail};

/// Section type of `.dynamic`.
const SHT_DYNAMIC: u32 = 6;
/// Dynamic entry naming a needed library.
const DT_NEEDED: u64 = 1;
/// Dynamic entry ending the table.
const DT_NULL: u64 = 0;

/// The DT_NEEDED entries of a little-endian ELF64 file, in order; empty for a
/// static binary.
pub fn needed_libraries(path: &Path) -> anyhow::Result<Vec<String>> {
    let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let read = |offset: u64, len: u64| -> anyhow::Result<Vec<u8>> {
        let len = usize::try_from(len).context("length does not fit in memory")?;
        let mut buf = vec![0; len];
        file.read_exact_at(&mut buf, offset)
            .with_context(|| format!("reading {} bytes at {offset} of {}", len, path.display()))?;
        Ok(buf)
    };

    let header = read(0, 64)?;
    if header[..4] != *b"\x7fELF" || header[4] != 2 || header[5] != 1 {
        bail!("{} is not a little-endian ELF64 file", path.display());
    }
    let section_offset = u64_at(&header, 0x28);
    let section_size = u64::from(u16_at(&header, 0x3a));
    let section_count = u64::from(u16_at(&header, 0x3c));
    if section_size < 64 {
        bail!(
            "{}: section headers of {section_size} bytes",
            path.display()
        );
    }
    let sections = read(section_offset, section_size * section_count)?;
    let section = |index: u64| -> anyhow::Result<&[u8]> {
        let start = usize::try_from(index * section_size)?;
        sections
            .get(start..start + 64)
            .with_context(|| format!("{}: no section {index}", path.display()))
    };

    for index in 0..section_count {
        let dynamic = section(index)?;
        if u32_at(dynamic, 4) != SHT_DYNAMIC {
            continue;
        }
        let strings = section(u64::from(u32_at(dynamic, 40)))?;
        let strings = read(u64_at(strings, 24), u64_at(strings, 32))?;
        let entries = read(u64_at(dynamic, 24), u64_at(dynamic, 32))?;
        let mut needed = Vec::new();
        for entry in entries.chunks_exact(16) {
            match u64_at(entry, 0) {
                DT_NULL => break,
                DT_NEEDED => {
                    let start = usize::try_from(u64_at(entry, 8))?;
                    let name = strings
                        .get(start..)
                        .and_then(|rest| rest.split(|&b| b == 0).next())
                        .with_context(|| format!("{}: bad DT_NEEDED offset", path.display()))?;
                    needed.push(String::from_utf8_lossy(name).into_owned());
                }
                _ => {}
            }
        }
        return Ok(needed);
    }
    Ok(Vec::new())
}

fn u16_at(bytes: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([bytes[at], bytes[at + 1]])
}

fn u32_at(bytes: &[u8], at: usize) -> u32 {
    let mut word = [0; 4];
    word.copy_from_slice(&bytes[at..at + 4]);
    u32::from_le_bytes(word)
}

fn u64_at(bytes: &[u8], at: usize) -> u64 {
    let mut word = [0; 8];
    word.copy_from_slice(&bytes[at..at + 8]);
    u64::from_le_bytes(word)
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::needed_libraries;

    #[test]
    fn this_test_binary_needs_libc() {
        let exe = std::env::current_exe().unwrap();
        let needed = needed_libraries(&exe).unwrap();
        assert!(
            needed.iter().any(|lib| lib.starts_with("libc.so")),
            "{needed:?}"
        );
    }

    #[test]
    fn non_elf_is_an_error() {
        let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml");
        assert!(needed_libraries(&manifest).is_err());
    }
}
