//! The Sparkplug B topic namespace (Sparkplug 3.0 section 4.1):
//! `spBv1.0/<group_id>/<message_type>/<edge_node_id>[/<device_id>]`, and
//! `spBv1.0/STATE/<host_id>` for host applications.

/// The namespace's first level.
pub const NAMESPACE: &str = "spBv1.0";

/// The message types (section 4.1.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MessageType {
    /// Edge node birth certificate.
    NBirth,
    /// Edge node death certificate.
    NDeath,
    /// Device birth certificate.
    DBirth,
    /// Device death certificate.
    DDeath,
    /// Edge node data.
    NData,
    /// Device data.
    DData,
    /// Command to an edge node.
    NCmd,
    /// Command to a device.
    DCmd,
}

impl MessageType {
    fn parse(s: &str) -> Option<MessageType> {
        Some(match s {
            "NBIRTH" => MessageType::NBirth,
            "NDEATH" => MessageType::NDeath,
            "DBIRTH" => MessageType::DBirth,
            "DDEATH" => MessageType::DDeath,
            "NDATA" => MessageType::NData,
            "DDATA" => MessageType::DData,
            "NCMD" => MessageType::NCmd,
            "DCMD" => MessageType::DCmd,
            _ => return None,
        })
    }

    /// As the topic writes it.
    pub fn as_str(self) -> &'static str {
        match self {
            MessageType::NBirth => "NBIRTH",
            MessageType::NDeath => "NDEATH",
            MessageType::DBirth => "DBIRTH",
            MessageType::DDeath => "DDEATH",
            MessageType::NData => "NDATA",
            MessageType::DData => "DDATA",
            MessageType::NCmd => "NCMD",
            MessageType::DCmd => "DCMD",
        }
    }

    /// Whether the message is about a device (and its topic names one).
    pub fn is_device(self) -> bool {
        matches!(
            self,
            MessageType::DBirth | MessageType::DDeath | MessageType::DData | MessageType::DCmd
        )
    }
}

/// A parsed Sparkplug topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Topic {
    /// A message of an edge node or one of its devices.
    Node {
        /// The group id.
        group: String,
        /// The message type.
        kind: MessageType,
        /// The edge node id.
        node: String,
        /// The device id, for device messages.
        device: Option<String>,
    },
    /// A host application's STATE message (`spBv1.0/STATE/<host_id>`).
    State {
        /// The host id.
        host: String,
    },
}

/// Why a topic is not a Sparkplug B topic.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a Sparkplug B topic: {topic:?} ({why})")]
pub struct TopicError {
    /// The topic.
    pub topic: String,
    /// What is wrong.
    pub why: &'static str,
}

impl Topic {
    /// Parses a topic name.
    pub fn parse(topic: &str) -> Result<Topic, TopicError> {
        let bad = |why| TopicError {
            topic: topic.to_owned(),
            why,
        };
        let mut parts = topic.split('/');
        if parts.next() != Some(NAMESPACE) {
            return Err(bad("it does not start with spBv1.0/"));
        }
        let group = parts.next().ok_or_else(|| bad("no group id"))?;
        let second = parts.next().ok_or_else(|| bad("no message type"))?;
        if group == "STATE" && !second.is_empty() {
            if parts.next().is_some() {
                return Err(bad("a STATE topic has one host id level"));
            }
            return Ok(Topic::State {
                host: second.to_owned(),
            });
        }
        let kind = MessageType::parse(second).ok_or_else(|| bad("unknown message type"))?;
        let node = parts.next().ok_or_else(|| bad("no edge node id"))?;
        let device = parts.next();
        if parts.next().is_some() {
            return Err(bad("too many levels"));
        }
        if group.is_empty() || node.is_empty() || device.is_some_and(str::is_empty) {
            return Err(bad("an empty id"));
        }
        if kind.is_device() != device.is_some() {
            return Err(bad(if device.is_some() {
                "a device id on an edge node message"
            } else {
                "no device id on a device message"
            }));
        }
        Ok(Topic::Node {
            group: group.to_owned(),
            kind,
            node: node.to_owned(),
            device: device.map(str::to_owned),
        })
    }
}

/// The topic of an NCMD to `node` of `group`.
pub fn ncmd_topic(group: &str, node: &str) -> String {
    format!("{NAMESPACE}/{group}/NCMD/{node}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_device_and_state_topics_parse() {
        assert_eq!(
            Topic::parse("spBv1.0/plant1/DDATA/gw/press-3"),
            Ok(Topic::Node {
                group: "plant1".into(),
                kind: MessageType::DData,
                node: "gw".into(),
                device: Some("press-3".into()),
            })
        );
        assert!(matches!(
            Topic::parse("spBv1.0/plant1/NBIRTH/gw"),
            Ok(Topic::Node {
                kind: MessageType::NBirth,
                device: None,
                ..
            })
        ));
        assert_eq!(
            Topic::parse("spBv1.0/STATE/scada"),
            Ok(Topic::State {
                host: "scada".into()
            })
        );
        for bad in [
            "spBv1.0",
            "spBv1.0/g",
            "spBv1.0/g/NBIRTH",
            "spBv1.0/g/NBIRTH/n/d",
            "spBv1.0/g/DBIRTH/n",
            "spBv1.0/g/XDATA/n",
            "spBv1.0/g/NDATA/n/d/e",
            "spBv1.0//NDATA/n",
            "spAv1.0/g/NDATA/n",
            "plant/a",
        ] {
            assert!(Topic::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(ncmd_topic("g", "n"), "spBv1.0/g/NCMD/n");
    }
}
