//! What the guard may do with the shared block device before its app starts: format it (only
//! a device that is provably empty), mount it, or refuse. The shell probes the device
//! (`wipefs --no-act --json` lists every signature it knows: filesystems, partition tables,
//! LVM, RAID, swap; and it reads the first MiB) and reads `/proc/self/mountinfo`; these
//! functions turn what it saw into the decision.
//!
//! A device is formatted only when it carries no signature at all *and* its first MiB reads as
//! zeros: a database written to the raw device, or a filesystem wipefs does not know, is data
//! too, and formatting it would destroy a plant's records. An operator who really wants such a
//! device formatted wipes it first (`wipefs -a`, `blkdiscard`).

use serde::Deserialize;
use std::fmt;
use std::str::FromStr;

/// How much of the device's start must read as zeros before it counts as empty.
pub const HEAD_BYTES: usize = 1024 * 1024;

/// The filesystems the guard formats and mounts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Filesystem {
    Xfs,
    Ext4,
}

impl Filesystem {
    /// The name `wipefs`, `mount -t` and `mkfs.<name>` use.
    pub fn name(self) -> &'static str {
        match self {
            Filesystem::Xfs => "xfs",
            Filesystem::Ext4 => "ext4",
        }
    }
}

impl fmt::Display for Filesystem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown filesystem {0:?}: use xfs or ext4")]
pub struct UnknownFilesystem(pub String);

impl FromStr for Filesystem {
    type Err = UnknownFilesystem;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "xfs" => Ok(Filesystem::Xfs),
            "ext4" => Ok(Filesystem::Ext4),
            other => Err(UnknownFilesystem(other.to_string())),
        }
    }
}

/// One signature on the device, as wipefs reports it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Signature {
    #[serde(rename = "type")]
    pub kind: String,
    pub offset: String,
}

/// What the shell saw on the device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceProbe {
    pub signatures: Vec<Signature>,
    /// The first [`HEAD_BYTES`] (or the whole device, if smaller) read as zeros.
    pub head_is_zero: bool,
}

/// What to do with the device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Preparation {
    /// Provably empty: format it with the requested filesystem, then mount it.
    Format,
    /// It holds the requested filesystem: mount it.
    Mount,
    /// Touch nothing.
    Refuse(Refusal),
}

/// Why the guard will not use the device.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error(
        "the device holds {found} where {wanted} was asked for; refusing to touch it (it is \
         never formatted over)"
    )]
    OtherSignature { wanted: Filesystem, found: String },
    #[error(
        "the device carries no signature wipefs knows, but its first MiB is not zeros: it holds \
         data; refusing to format it (wipe it first if it really is free)"
    )]
    UnknownData,
}

/// The decision for a device asked to carry `wanted`.
pub fn prepare(wanted: Filesystem, probe: &DeviceProbe) -> Preparation {
    match probe.signatures.as_slice() {
        [] if probe.head_is_zero => Preparation::Format,
        [] => Preparation::Refuse(Refusal::UnknownData),
        [only] if only.kind == wanted.name() => Preparation::Mount,
        many => Preparation::Refuse(Refusal::OtherSignature {
            wanted,
            found: many
                .iter()
                .map(|s| format!("{} at {}", s.kind, s.offset))
                .collect::<Vec<_>>()
                .join(", "),
        }),
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot read wipefs's answer: {0}")]
pub struct WipefsOutput(pub String);

/// The signatures in `wipefs --no-act --json DEVICE`'s output (older versions print nothing at
/// all for a device without signatures).
pub fn parse_wipefs(json: &str) -> Result<Vec<Signature>, WipefsOutput> {
    #[derive(Deserialize)]
    struct Out {
        signatures: Vec<Signature>,
    }
    if json.trim().is_empty() {
        return Ok(Vec::new());
    }
    serde_json::from_str::<Out>(json)
        .map(|o| o.signatures)
        .map_err(|e| WipefsOutput(e.to_string()))
}

/// Where the device `major:minor` is mounted, from `/proc/self/mountinfo` (field 3 is the
/// mounted device's number, field 5 the mount point).
pub fn mounts_of(mountinfo: &str, major: u32, minor: u32) -> Vec<String> {
    let dev = format!("{major}:{minor}");
    mountinfo
        .lines()
        .filter_map(|line| {
            let mut fields = line.split(' ');
            let device = fields.nth(2)?;
            let point = fields.nth(1)?;
            (device == dev).then(|| point.to_string())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sig(kind: &str) -> Signature {
        Signature {
            kind: kind.into(),
            offset: "0x438".into(),
        }
    }

    #[test]
    fn only_a_provably_empty_device_is_formatted() {
        let empty = DeviceProbe {
            signatures: vec![],
            head_is_zero: true,
        };
        assert_eq!(prepare(Filesystem::Xfs, &empty), Preparation::Format);
        let data = DeviceProbe {
            signatures: vec![],
            head_is_zero: false,
        };
        assert_eq!(
            prepare(Filesystem::Xfs, &data),
            Preparation::Refuse(Refusal::UnknownData)
        );
        let ext4 = DeviceProbe {
            signatures: vec![sig("ext4")],
            head_is_zero: false,
        };
        assert_eq!(prepare(Filesystem::Ext4, &ext4), Preparation::Mount);
        assert!(matches!(
            prepare(Filesystem::Xfs, &ext4),
            Preparation::Refuse(Refusal::OtherSignature { .. })
        ));
        // A filesystem inside a partition table is not ours to mount whole.
        let table = DeviceProbe {
            signatures: vec![sig("ext4"), sig("gpt")],
            head_is_zero: false,
        };
        assert!(matches!(
            prepare(Filesystem::Ext4, &table),
            Preparation::Refuse(Refusal::OtherSignature { .. })
        ));
        // Signatures win over zeros: a swap signature sits past the first KiB.
        let swap = DeviceProbe {
            signatures: vec![sig("swap")],
            head_is_zero: true,
        };
        assert!(matches!(
            prepare(Filesystem::Ext4, &swap),
            Preparation::Refuse(_)
        ));
    }

    #[test]
    fn wipefs_output_is_read_and_garbage_is_an_error() {
        let out = r#"{"signatures": [{"device": "loop0", "offset": "0x438", "type": "ext4",
            "uuid": "3f3d", "label": null}]}"#;
        assert_eq!(parse_wipefs(out), Ok(vec![sig("ext4")]));
        assert_eq!(parse_wipefs("{\n \"signatures\": [\n\n ]\n}\n"), Ok(vec![]));
        assert_eq!(parse_wipefs(""), Ok(vec![]));
        assert!(parse_wipefs("wipefs: error").is_err());
    }

    #[test]
    fn mounts_of_a_device_are_found_by_number() {
        let info = "22 1 0:21 / /proc rw,nosuid - proc proc rw\n\
                    95 30 7:0 / /mnt/data rw,relatime - xfs /dev/loop0 rw\n\
                    96 30 7:1 / /mnt/other rw - ext4 /dev/loop1 rw\n";
        assert_eq!(mounts_of(info, 7, 0), vec!["/mnt/data".to_string()]);
        assert!(mounts_of(info, 8, 0).is_empty());
    }

    #[test]
    fn filesystems_parse_and_unknown_ones_are_named() {
        assert_eq!("xfs".parse::<Filesystem>(), Ok(Filesystem::Xfs));
        assert_eq!(
            "btrfs".parse::<Filesystem>(),
            Err(UnknownFilesystem("btrfs".into()))
        );
    }
}
