// SPDX-License-Identifier: MIT OR Apache-2.0
//! Creates an image, writes to it, checks it and reads it back: the README's main job in Rust.

use qed::{CheckFix, CreateOptions, Image, OpenOptions};

fn main() -> qed::Result<()> {
    let path = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "quickstart.qed".into());
    Image::create(&path, &CreateOptions::new(1 << 30))?;
    let img = Image::open(&path, &OpenOptions::read_write())?;
    let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    img.write_at(123_456, &data)?;
    img.flush()?;
    let r = img.check(CheckFix::NONE)?;
    println!(
        "check: {} corruptions, {} leaks, {}/{} clusters allocated",
        r.corruptions, r.leaks, r.allocated_clusters, r.total_clusters
    );
    let mut back = vec![0u8; data.len()];
    img.read_at(123_456, &mut back)?;
    assert_eq!(back, data, "read back differs from what was written");
    img.close()?;
    println!("{path}: wrote, checked and read back {} bytes", data.len());
    Ok(())
}
