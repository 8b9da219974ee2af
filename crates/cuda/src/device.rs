//! `DeviceSpec`: where a computation runs, as users write it: `cpu`, `cuda` (device 0) or `cuda:N`.
//! Parsed by clap (`FromStr`) and serde (a string), errors naming the value.

use std::str::FromStr;

/// A device named on the command line or in a config file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum DeviceSpec {
    /// The CPU (lora-kernels).
    #[default]
    Cpu,
    /// CUDA device N (ordinal, as the driver numbers them).
    Cuda(usize),
}

/// A device string that is not `cpu`, `cuda` or `cuda:N`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("device {value:?}: {reason} (expected cpu, cuda or cuda:N, N a device number)")]
pub struct DeviceSpecError {
    /// The value given.
    pub value: String,
    /// What is wrong with it.
    pub reason: &'static str,
}

impl FromStr for DeviceSpec {
    type Err = DeviceSpecError;
    fn from_str(s: &str) -> Result<DeviceSpec, DeviceSpecError> {
        let err = |reason| DeviceSpecError { value: s.to_string(), reason };
        match s {
            "cpu" => Ok(DeviceSpec::Cpu),
            "cuda" => Ok(DeviceSpec::Cuda(0)),
            _ => match s.strip_prefix("cuda:") {
                Some(n) if !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) => {
                    n.parse().map(DeviceSpec::Cuda).map_err(|_| err("the device number is too large"))
                }
                Some(_) => Err(err("the device number must be a non-negative integer")),
                None => Err(err("unknown device")),
            },
        }
    }
}

impl std::fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeviceSpec::Cpu => write!(f, "cpu"),
            DeviceSpec::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl serde::Serialize for DeviceSpec {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for DeviceSpec {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<DeviceSpec, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_specs_parse_and_print_back() {
        for (s, d) in
            [("cpu", DeviceSpec::Cpu), ("cuda", DeviceSpec::Cuda(0)), ("cuda:0", DeviceSpec::Cuda(0)), ("cuda:3", DeviceSpec::Cuda(3))]
        {
            assert_eq!(s.parse::<DeviceSpec>().unwrap(), d, "{s}");
        }
        assert_eq!(DeviceSpec::Cuda(3).to_string(), "cuda:3");
        assert_eq!("cuda".parse::<DeviceSpec>().unwrap().to_string(), "cuda:0");
    }

    #[test]
    fn a_bad_device_spec_is_an_error_naming_the_value() {
        for (s, why) in [
            ("gpu", "unknown device"),
            ("cuda:", "non-negative integer"),
            ("cuda:-1", "non-negative integer"),
            ("cuda:x", "non-negative integer"),
            ("CUDA", "unknown device"),
            ("cuda:99999999999999999999999", "too large"),
        ] {
            let e = s.parse::<DeviceSpec>().unwrap_err();
            let msg = e.to_string();
            assert!(msg.contains(&format!("{s:?}")) && msg.contains(why) && msg.contains("cpu, cuda or cuda:N"), "{s}: {msg}");
        }
    }

    #[test]
    fn device_specs_round_trip_through_serde_and_a_bad_one_names_the_value() {
        #[derive(serde::Serialize, serde::Deserialize, PartialEq, Debug)]
        struct Cfg {
            device: DeviceSpec,
        }
        let c: Cfg = serde_json::from_str(r#"{"device": "cuda:1"}"#).unwrap();
        assert_eq!(c, Cfg { device: DeviceSpec::Cuda(1) });
        assert_eq!(serde_json::to_string(&c).unwrap(), r#"{"device":"cuda:1"}"#);
        let e = serde_json::from_str::<Cfg>(r#"{"device": "tpu"}"#).unwrap_err().to_string();
        assert!(e.contains("\"tpu\""), "{e}");
    }
}
