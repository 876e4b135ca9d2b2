//! What the saved-state format accepts and refuses, step by step.

use super::*;
use crate::vmm::GuestImage;

fn config(vcpus: u32) -> PartitionConfig {
    PartitionConfig {
        name: Some("p".into()),
        mem_size: 4 << 20,
        vcpus,
        image: GuestImage::Builtin("idle".into()),
        args: "rate=10".into(),
    }
}

/// The payload of an encoded state, as `SavedPartition` would read it, for surgery.
fn payload_of(bytes: &[u8]) -> Vec<u8> {
    bytes[HEADER_LEN..].to_vec()
}

#[test]
fn states_round_trip_byte_for_byte() {
    let snapshot = sample_snapshot(config(2));
    let bytes = encode(&snapshot);
    let decoded = decode(&bytes, &config(2)).expect("decodes");
    assert_eq!(decoded.vcpus.len(), 2);
    assert_eq!(decoded.vcpus[1].regs.rip, 0x20_0001);
    assert_eq!(decoded.vcpus[0].xsave.region[6], 0x1f80);
    assert_eq!(decoded.vcpus[0].xcrs.map(|x| x.xcrs[0].value), Some(3));
    assert!(decoded.vcpus[1].xcrs.is_none());
    assert_eq!(decoded.console, snapshot.console);
    assert_eq!(encode(&decoded), bytes);
}

#[test]
fn a_bad_header_is_refused_before_the_payload() {
    let bytes = encode(&sample_snapshot(config(1)));
    let expected = config(1);
    assert!(matches!(
        decode(&[0; HEADER_LEN], &expected),
        Err(StateError::Magic(_))
    ));
    assert!(matches!(
        decode(&bytes[..10], &expected),
        Err(StateError::Truncated(10))
    ));
    let mut bad = bytes.clone();
    // Version 1, the bincode payload of earlier builds.
    bad[8] = 1;
    assert!(matches!(
        decode(&bad, &expected),
        Err(StateError::Version(1))
    ));
    let mut bad = bytes.clone();
    bad[12] = 1;
    assert!(matches!(decode(&bad, &expected), Err(StateError::Reserved)));
    assert!(matches!(
        decode(&bytes[..bytes.len() - 1], &expected),
        Err(StateError::Length { .. })
    ));
    let mut bad = bytes.clone();
    bad[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
    assert!(matches!(
        decode(&bad, &expected),
        Err(StateError::TooLarge(_))
    ));
    let mut bad = bytes.clone();
    let last = bad.len() - 1;
    bad[last] ^= 1;
    assert!(matches!(
        decode(&bad, &expected),
        Err(StateError::Checksum { .. })
    ));
    assert!(matches!(
        decode(&wrap(b"not postcard"), &expected),
        Err(StateError::Payload(_))
    ));
    let mut trailing = payload_of(&bytes);
    trailing.push(0);
    assert!(matches!(
        decode(&wrap(&trailing), &expected),
        Err(StateError::Trailing(1))
    ));
    assert!(matches!(
        decode(&bytes, &config(2)),
        Err(StateError::Config { .. })
    ));
}

#[test]
fn a_vcpu_state_of_the_wrong_shape_is_refused() {
    let expected = config(1);
    // Three vCPU states for a one-vCPU partition, under the digest of a config of one.
    let mut three = sample_snapshot(config(3));
    three.config = config(1);
    assert!(matches!(
        decode(&encode(&three), &expected),
        Err(StateError::VcpuCount { got: 3, want: 1 })
    ));
    // Registers one byte short: the payload as read, one byte cut, written again.
    let snapshot = sample_snapshot(config(1));
    let mut saved: SavedPartition =
        postcard::from_bytes(&payload_of(&encode(&snapshot))).expect("decodes");
    saved.vcpus[0].regs.pop();
    let short = postcard::to_stdvec(&saved).expect("encodes");
    let err = decode(&wrap(&short), &expected).expect_err("refused");
    assert!(
        matches!(
            &err,
            StateError::Vcpu {
                index: 0,
                source: ShapeError::Size {
                    field: "registers",
                    ..
                }
            }
        ),
        "{err:?}"
    );
    let mut unknown = sample_snapshot(config(1));
    unknown.vcpus[0].msrs.push((0xdead, 1));
    assert!(matches!(
        decode(&encode(&unknown), &expected),
        Err(StateError::Vcpu {
            source: ShapeError::UnknownMsr(0xdead),
            ..
        })
    ));
    let mut twice = sample_snapshot(config(1));
    let first = twice.vcpus[0].msrs[0];
    twice.vcpus[0].msrs.push(first);
    assert!(matches!(
        decode(&encode(&twice), &expected),
        Err(StateError::Vcpu {
            source: ShapeError::DuplicateMsr(0x10),
            ..
        })
    ));
    let mut many = sample_snapshot(config(1));
    many.vcpus[0].msrs = vec![(0x10, 0); SAVED_MSRS.len() + 1];
    assert!(matches!(
        decode(&encode(&many), &expected),
        Err(StateError::Vcpu {
            source: ShapeError::TooManyMsrs(_),
            ..
        })
    ));
    let mut chatty = sample_snapshot(config(1));
    chatty.console = vec![b'x'; CONSOLE_KEEP + 1];
    assert!(matches!(
        decode(&encode(&chatty), &expected),
        Err(StateError::Console(_))
    ));
}

#[test]
fn an_unknown_tsc_rate_is_refused() {
    let snapshot = sample_snapshot(config(1));
    let mut saved: SavedPartition =
        postcard::from_bytes(&payload_of(&encode(&snapshot))).expect("decodes");
    assert_eq!(saved.cpu.tsc_khz, 2_500_000);
    saved.cpu.tsc_khz = 0;
    let unknown = postcard::to_stdvec(&saved).expect("encodes");
    assert!(matches!(
        decode(&wrap(&unknown), &config(1)),
        Err(StateError::TscUnknown)
    ));
}

#[test]
fn the_cpu_the_guest_was_given_round_trips() {
    let snapshot = sample_snapshot(config(1));
    let decoded = decode(&encode(&snapshot), &config(1)).expect("decodes");
    assert_eq!(decoded.cpu, snapshot.cpu);
    assert_eq!(&decoded.cpu.vendor, b"AuthenticAMD");
}

#[test]
fn the_state_carries_the_configs_digest_not_the_config() {
    let mut big = config(1);
    big.image = GuestImage::Elf(vec![0x7f; 8 << 20]);
    assert_eq!(
        config_digest(&big),
        xxh3_64(&postcard::to_stdvec(&big).expect("encodes")),
        "hashed as it is serialized, the digest is that of the encoding"
    );
    let bytes = encode(&sample_snapshot(big.clone()));
    assert!(bytes.len() < 64 << 10, "{} bytes", bytes.len());
    let decoded = decode(&bytes, &big).expect("decodes");
    assert_eq!(
        decoded.config, big,
        "the config is rebuilt from the expected one"
    );
    // One byte of the image differs: another partition.
    let mut other = big.clone();
    if let GuestImage::Elf(image) = &mut other.image {
        image[4 << 20] ^= 1;
    }
    assert_ne!(config_digest(&other), config_digest(&big));
    assert!(matches!(
        decode(&bytes, &other),
        Err(StateError::Config { saved, expected })
            if saved == config_digest(&big) && expected == config_digest(&other)
    ));
    // Every field counts.
    for changed in [
        PartitionConfig {
            name: None,
            ..config(1)
        },
        PartitionConfig {
            mem_size: 8 << 20,
            ..config(1)
        },
        PartitionConfig {
            args: "rate=11".into(),
            ..config(1)
        },
        PartitionConfig {
            image: GuestImage::Builtin("kv-zipf".into()),
            ..config(1)
        },
    ] {
        assert_ne!(
            config_digest(&changed),
            config_digest(&config(1)),
            "{changed:?}"
        );
    }
}

#[test]
fn an_image_serializes_as_a_byte_string_with_an_unchanged_encoding() {
    /// `GuestImage` as it was derived before its image became a byte string.
    #[derive(Serialize)]
    enum Plain {
        #[allow(dead_code)]
        Builtin(String),
        Elf(Vec<u8>),
    }
    let bytes: Vec<u8> = (0..=255).chain(0..10).collect();
    let image = GuestImage::Elf(bytes.clone());
    assert_eq!(
        postcard::to_stdvec(&image).expect("encodes"),
        postcard::to_stdvec(&Plain::Elf(bytes.clone())).expect("encodes")
    );
    assert_eq!(
        serde_json::to_string(&image).expect("encodes"),
        serde_json::to_string(&Plain::Elf(bytes)).expect("encodes")
    );
}
