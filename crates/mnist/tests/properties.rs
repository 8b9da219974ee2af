//! Property tests of the IDX reader: any bytes give a value or an error, never a panic; every well-formed
//! file (raw or gzip) reads back exactly what was written.

use std::io::Write;
use std::path::Path;

use mnist::{decode_idx, IdxKind};
use proptest::prelude::*;

fn idx(magic: u32, dims: &[u32], data: &[u8]) -> Vec<u8> {
    let mut v = magic.to_be_bytes().to_vec();
    dims.iter().for_each(|d| v.extend_from_slice(&d.to_be_bytes()));
    v.extend_from_slice(data);
    v
}

proptest! {
    #[test]
    fn arbitrary_bytes_are_read_or_refused_without_panicking(raw in proptest::collection::vec(any::<u8>(), 0..64), images in any::<bool>()) {
        let kind = if images { IdxKind::Images } else { IdxKind::Labels };
        let _ = decode_idx(Path::new("x"), raw, kind);
    }

    #[test]
    fn a_header_with_random_dimensions_never_panics(dims in proptest::collection::vec(any::<u32>(), 3), tail in proptest::collection::vec(any::<u8>(), 0..32)) {
        let _ = decode_idx(Path::new("x"), idx(2051, &dims, &tail), IdxKind::Images);
    }

    #[test]
    fn well_formed_images_round_trip_raw_and_gzipped(n in 1u32..5, rows in 1u32..6, cols in 1u32..6, seed in any::<u8>(), gz in any::<bool>()) {
        let data: Vec<u8> = (0..n * rows * cols).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect();
        let mut raw = idx(2051, &[n, rows, cols], &data);
        if gz {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            e.write_all(&raw).unwrap();
            raw = e.finish().unwrap();
        }
        let got = decode_idx(Path::new("x"), raw, IdxKind::Images).unwrap();
        prop_assert_eq!(got.dims, vec![n as usize, rows as usize, cols as usize]);
        prop_assert_eq!(got.data, data);
    }

    #[test]
    fn labels_above_nine_are_refused_by_index(labels in proptest::collection::vec(0u8..12, 1..20)) {
        let r = decode_idx(Path::new("x"), idx(2049, &[labels.len() as u32], &labels), IdxKind::Labels);
        match labels.iter().position(|&l| l > 9) {
            Some(i) => {
                let e = r.unwrap_err().to_string();
                prop_assert!(e.contains(&format!("label {}", labels[i])), "{}", e);
            }
            None => prop_assert_eq!(r.unwrap().data, labels),
        }
    }
}
