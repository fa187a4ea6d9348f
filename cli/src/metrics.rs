//! What the binaries' Prometheus metrics share: label values from outside the code (coin names
//! from a config file or the control plane) escaped as the text formats require, which
//! prometheus-client 0.24 does not do itself (it writes label values as they are).

use std::fmt::{self, Write as _};

use prometheus_client::encoding::{EncodeLabelValue, LabelValueEncoder};

/// A label value escaped as the OpenMetrics and Prometheus text formats require (`\\`, `\"`,
/// `\n`).
#[derive(Debug, Clone, Hash, PartialEq, Eq, PartialOrd, Ord)]
pub struct Escaped<T>(pub T);

impl<T: AsRef<str>> EncodeLabelValue for Escaped<T> {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), fmt::Error> {
        let mut rest = self.0.as_ref();
        while let Some(i) = rest.find(['\\', '"', '\n']) {
            encoder.write_str(&rest[..i])?;
            encoder.write_str(match rest.as_bytes()[i] {
                b'\\' => "\\\\",
                b'"' => "\\\"",
                _ => "\\n",
            })?;
            rest = &rest[i + 1..];
        }
        encoder.write_str(rest)
    }
}

#[cfg(test)]
mod tests {
    use prometheus_client::{
        encoding::{EncodeLabelSet, text::encode},
        metrics::{counter::Counter, family::Family},
        registry::Registry,
    };

    use super::Escaped;

    #[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
    struct Labels {
        coin: Escaped<String>,
    }

    #[test]
    fn quotes_backslashes_and_newlines_are_escaped() {
        let mut registry = Registry::default();
        let family = Family::<Labels, Counter>::default();
        registry.register("t", "test", family.clone());
        family
            .get_or_create(&Labels {
                coin: Escaped("we\"ird\\co\nin".into()),
            })
            .inc();
        let mut text = String::new();
        encode(&mut text, &registry).expect("encodes");
        assert!(
            text.contains(r#"t_total{coin="we\"ird\\co\nin"} 1"#),
            "{text}"
        );
    }
}
