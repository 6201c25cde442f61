// SPDX-License-Identifier: MIT OR Apache-2.0
//! Small in-memory images for the fault and flush tests: 4 MiB, 4 KiB clusters, one-cluster
//! tables, with or without a raw backing file.

#![allow(dead_code)]

use qed::storage::{MemStorage, Storage};
use qed::{Backing, BackingFormat, CreateOptions, Image, OpenOptions};
use std::sync::Arc;

pub const CS: u64 = 4096;

/// A new image on memory; with `backing`, it names a raw backing file "base".
pub fn create(backing: bool) -> Arc<MemStorage> {
    let s = Arc::new(MemStorage::new());
    Image::create_on(
        &*s,
        &CreateOptions {
            size: 4 << 20,
            cluster_size: CS as u32,
            table_size: 1,
            backing_file: backing.then(|| "base".into()),
            backing_format: backing.then_some(BackingFormat::Raw),
        },
    )
    .unwrap();
    s
}

/// Read-write open options whose backing file (if any) is `backing`.
pub fn rw(backing: Option<Arc<MemStorage>>) -> OpenOptions {
    OpenOptions {
        writable: true,
        backing_resolver: backing.map(|b| {
            Arc::new(move |_: &str, _: Option<BackingFormat>| {
                Ok(Backing::Raw(b.clone() as Arc<dyn Storage>))
            }) as qed::image::BackingResolver
        }),
        ..Default::default()
    }
}

/// `len` guest bytes at `off`.
pub fn read(img: &Image, off: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    img.read_at(off, &mut v).unwrap();
    v
}
