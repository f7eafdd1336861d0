//! A minimal in-memory ustar writer: enough for Docker build contexts of a few regular files.
#![allow(dead_code)]

/// Builds a tar archive of regular files `(path, mode, contents)`, owned by root, mtime 0.
pub fn tar_files(files: &[(&str, u32, &[u8])]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, mode, data) in files {
        assert!(
            name.len() < 100,
            "tar_files: name `{name}` too long for ustar"
        );
        let mut h = [0u8; 512];
        h[..name.len()].copy_from_slice(name.as_bytes());
        put_octal(&mut h[100..108], u64::from(*mode));
        put_octal(&mut h[108..116], 0); // uid
        put_octal(&mut h[116..124], 0); // gid
        put_octal(&mut h[124..136], data.len() as u64);
        put_octal(&mut h[136..148], 0); // mtime
        h[156] = b'0'; // regular file
        h[257..263].copy_from_slice(b"ustar\0");
        h[263..265].copy_from_slice(b"00");
        // Checksum: sum of header bytes with the checksum field as spaces.
        h[148..156].copy_from_slice(b"        ");
        let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
        let chk = format!("{sum:06o}\0 ");
        h[148..156].copy_from_slice(chk.as_bytes());
        out.extend_from_slice(&h);
        out.extend_from_slice(data);
        let pad = (512 - data.len() % 512) % 512;
        out.extend(std::iter::repeat_n(0u8, pad));
    }
    out.extend(std::iter::repeat_n(0u8, 1024));
    out
}

/// Writes `value` as zero-padded octal filling `field` minus a trailing NUL.
fn put_octal(field: &mut [u8], value: u64) {
    let width = field.len() - 1;
    let s = format!("{value:0width$o}");
    assert!(s.len() == width, "tar_files: value {value} does not fit");
    field[..width].copy_from_slice(s.as_bytes());
    field[width] = 0;
}
