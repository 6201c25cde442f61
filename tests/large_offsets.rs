// SPDX-License-Identifier: MIT OR Apache-2.0
//! Offsets past 4 GiB, in the guest and in the host file: the test that catches 32-bit file
//! offsets (`off_t` on i686 glibc) and `u64 as usize` truncation when the suite runs for i686
//! (scripts/test-platforms). It runs, unchanged, on 64-bit hosts too.
//!
//! 4 MiB clusters with 2-cluster tables (near the largest geometry QEMU opens: its maximum-size
//! computation overflows beyond, and it refuses table_size 1) make the file pass 4 GiB after
//! some 1030 small writes: each allocates a cluster, whose unwritten rest stays a hole of the
//! sparse file, so little is written.

mod common;

use common::*;
use qed::{CreateOptions, ExtentKind, Image, OpenOptions};

const GIB: u64 = 1 << 30;
const CLUSTER: u64 = 4 << 20;

#[test]
fn guest_and_host_offsets_past_4_gib() {
    require_qemu();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("big.qed");
    Image::create(
        &path,
        &CreateOptions {
            size: 20 * GIB,
            cluster_size: CLUSTER as u32,
            table_size: 2,
            ..Default::default()
        },
    )
    .unwrap();
    let img = Image::open(&path, &OpenOptions::read_write()).unwrap();
    let chunk = vec![0xabu8; 64 << 10];
    // One write per cluster, into the middle of each: guest offsets 0..4.7 GiB, then two far out
    // (one straddling a cluster boundary past 16 GiB).
    let mut offsets: Vec<u64> = (0..1200).map(|k| k * CLUSTER + CLUSTER / 2 + 512).collect();
    offsets.push(13 * GIB + 12345);
    offsets.push(17 * GIB - 1000);
    for &off in &offsets {
        img.write_at(off, &chunk).unwrap();
    }
    img.flush().unwrap();
    let file_len = std::fs::metadata(&path).unwrap().len();
    assert!(
        file_len > 4 * GIB + 100 * CLUSTER,
        "file is {file_len} bytes, expected past 4.4 GiB (4 GiB and 100 clusters)"
    );

    // Every chunk reads back, with zeros around it.
    let mut buf = vec![0u8; chunk.len() + 2048];
    for &off in &offsets {
        img.read_at(off - 1024, &mut buf).unwrap();
        assert!(buf[..1024].iter().all(|&b| b == 0), "before {off}");
        assert_bytes_equal("chunk", off, &buf[1024..1024 + chunk.len()], &chunk);
        assert!(
            buf[1024 + chunk.len()..].iter().all(|&b| b == 0),
            "after {off}"
        );
    }

    // The far guest offsets sit at host offsets past 4 GiB, and hold the bytes there.
    let mut past_4g = 0;
    for &off in &offsets {
        for e in our_map(&img, off, chunk.len() as u64) {
            let ExtentKind::Data { host_offset } = e.kind else {
                panic!("{off}: not data: {e:?}");
            };
            if host_offset > 4 * GIB {
                past_4g += 1;
                let f = std::fs::File::open(&path).unwrap();
                let mut raw = vec![0u8; e.length.min(4096) as usize];
                read_raw(&f, &mut raw, host_offset);
                assert!(raw.iter().all(|&b| b == 0xab), "host offset {host_offset}");
            }
        }
    }
    assert!(
        past_4g >= 10,
        "only {past_4g} extents past 4 GiB in the host file"
    );
    drop(img);

    // QEMU agrees: the image is clean and every chunk reads back as written.
    qemu_img(&["check", "-f", "qed", p(&path)]).ok();
    let mut args = vec!["-f".to_string(), "qed".into(), "-r".into()];
    for off in &offsets {
        args.extend(["-c".into(), format!("read -P 0xab {off} {}", chunk.len())]);
    }
    args.extend(["-c".into(), format!("read -P 0 {} 4096", 19 * GIB)]);
    args.push(p(&path).into());
    let out = run_in(
        None,
        "qemu-io",
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    let text = out.text();
    assert!(
        out.success() && !text.contains("fail") && !text.contains("error"),
        "qemu-io -r: {text}"
    );
    assert_eq!(
        text.matches("read 65536/65536 bytes").count(),
        offsets.len(),
        "{text}"
    );

    // And the other way: QEMU writes past 4 GiB, we read it back.
    let far = 19 * GIB + 777;
    qemu_io(&path, &[format!("write -P 0xcd {far} 8192")]);
    let img = Image::open(&path, &OpenOptions::read_write()).unwrap();
    let mut back = vec![0u8; 8192];
    img.read_at(far, &mut back).unwrap();
    assert!(back.iter().all(|&b| b == 0xcd));
    let r = img.check(qed::CheckFix::NONE).unwrap();
    assert_eq!((r.corruptions, r.leaks, r.check_errors), (0, 0, 0), "{r:?}");
}
