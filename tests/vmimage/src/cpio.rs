//! A writer for "newc" cpio archives (the format the kernel unpacks as initramfs).

/// Fixed mtime for every entry, so archives are reproducible.
pub const MTIME: u32 = 1_600_000_000;

const S_IFDIR: u32 = 0o040_000;
const S_IFREG: u32 = 0o100_000;
const S_IFLNK: u32 = 0o120_000;
const S_IFCHR: u32 = 0o020_000;

/// Builds a newc archive in memory. Paths are relative ("bin/sh"); parents must
/// be added before their children (the kernel does not create them).
#[derive(Default)]
pub struct CpioWriter {
    out: Vec<u8>,
    next_ino: u32,
}

impl CpioWriter {
    pub fn new() -> CpioWriter {
        CpioWriter {
            out: Vec::new(),
            next_ino: 1,
        }
    }

    pub fn dir(&mut self, path: &str, mode: u32) {
        self.entry(path, S_IFDIR | (mode & 0o7777), 2, (0, 0), &[]);
    }

    pub fn file(&mut self, path: &str, mode: u32, data: &[u8]) {
        self.entry(path, S_IFREG | (mode & 0o7777), 1, (0, 0), data);
    }

    pub fn symlink(&mut self, path: &str, target: &str) {
        self.entry(path, S_IFLNK | 0o777, 1, (0, 0), target.as_bytes());
    }

    pub fn char_device(&mut self, path: &str, mode: u32, major: u32, minor: u32) {
        self.entry(path, S_IFCHR | (mode & 0o7777), 1, (major, minor), &[]);
    }

    /// Appends the trailer and returns the archive.
    pub fn finish(mut self) -> Vec<u8> {
        self.header("TRAILER!!!", 0, 0, 1, (0, 0), 0);
        self.out
    }

    fn entry(&mut self, path: &str, mode: u32, nlink: u32, rdev: (u32, u32), data: &[u8]) {
        let ino = self.next_ino;
        self.next_ino += 1;
        self.header(path, ino, mode, nlink, rdev, data.len());
        self.out.extend_from_slice(data);
        self.pad();
    }

    fn header(&mut self, name: &str, ino: u32, mode: u32, nlink: u32, rdev: (u32, u32), size: usize) {
        let size = u32::try_from(size).expect("cpio newc entries are limited to 4 GiB");
        let name_size = name.len() as u32 + 1;
        // magic, ino, mode, uid, gid, nlink, mtime, filesize, devmajor, devminor,
        // rdevmajor, rdevminor, namesize, check: 8 hex digits each.
        let fields = [ino, mode, 0, 0, nlink, MTIME, size, 0, 0, rdev.0, rdev.1, name_size, 0];
        self.out.extend_from_slice(b"070701");
        for field in fields {
            self.out.extend_from_slice(format!("{field:08x}").as_bytes());
        }
        self.out.extend_from_slice(name.as_bytes());
        self.out.push(0);
        self.pad();
    }

    /// Header+name and data are each padded to a multiple of 4 bytes.
    fn pad(&mut self) {
        while !self.out.len().is_multiple_of(4) {
            self.out.push(0);
        }
    }
}

/// Entry names of a newc archive (for tests).
#[cfg(test)]
pub(crate) fn names(archive: &[u8]) -> Vec<String> {
    let field = |at: usize, i: usize| {
        let hex = std::str::from_utf8(&archive[at + 6 + i * 8..at + 14 + i * 8]).unwrap();
        usize::from_str_radix(hex, 16).unwrap()
    };
    let align = |n: usize| n.div_ceil(4) * 4;
    let (mut at, mut names) = (0, Vec::new());
    loop {
        assert_eq!(&archive[at..at + 6], b"070701", "bad magic at {at}");
        let (size, name_size) = (field(at, 6), field(at, 11));
        let name = String::from_utf8(archive[at + 110..at + 110 + name_size - 1].to_vec()).unwrap();
        if name == "TRAILER!!!" {
            return names;
        }
        names.push(name);
        at = align(align(at + 110 + name_size) + size);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::{Command, Stdio};

    #[test]
    fn header_layout() {
        let mut w = CpioWriter::new();
        w.file("a", 0o644, b"xyz");
        let out = w.finish();
        assert_eq!(&out[..6], b"070701");
        // 110-byte header + "a\0" = 112 (aligned), then 3 data bytes + 1 pad.
        assert_eq!(&out[110..112], b"a\0");
        assert_eq!(&out[112..116], b"xyz\0");
        assert_eq!(&out[116..122], b"070701");
        assert_eq!(out.len() % 4, 0);
        let mode = u32::from_str_radix(std::str::from_utf8(&out[14..22]).unwrap(), 16).unwrap();
        assert_eq!(mode, 0o100_644);
        assert_eq!(names(&out), ["a"]);
    }

    /// GNU cpio (if installed) lists what we wrote.
    #[test]
    fn gnu_cpio_reads_archive() {
        let mut w = CpioWriter::new();
        w.dir("bin", 0o755);
        w.file("bin/x", 0o755, b"#!/bin/sh\n");
        w.symlink("bin/y", "x");
        w.char_device("console", 0o600, 5, 1);
        let archive = w.finish();
        let Ok(mut child) = Command::new("cpio")
            .args(["-t", "-v", "--quiet"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
        else {
            eprintln!("cpio not installed; skipping");
            return;
        };
        std::io::Write::write_all(&mut child.stdin.take().unwrap(), &archive).unwrap();
        let out = child.wait_with_output().unwrap();
        let listing = String::from_utf8(out.stdout).unwrap();
        assert!(out.status.success(), "{listing}");
        assert!(listing.contains("bin/y -> x"), "{listing}");
        assert!(listing.contains("5,") && listing.contains("console"), "{listing}");
        assert_eq!(listing.lines().count(), 4, "{listing}");
    }
}
