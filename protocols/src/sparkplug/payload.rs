//! The Sparkplug B payload: the part of the Eclipse Tahu schema
//! (`sparkplug_b.proto`, package `org.eclipse.tahu.protobuf`, proto2) that
//! a host application reads, as prost messages written by hand from it.
//!
//! Why written by hand rather than generated: generating needs `protoc`
//! (or a protobuf compiler in a build script) on every machine that builds
//! the agent, for two messages whose field numbers have not changed since
//! Sparkplug B 1.0. The field numbers below are the schema's; fields this
//! host does not read (metadata, properties, data sets, templates,
//! extensions) are left out, and protobuf decoders skip unknown fields, so a
//! payload that has them still decodes.
//!
//! ```text
//! message Payload { optional uint64 timestamp = 1; repeated Metric metrics = 2;
//!                   optional uint64 seq = 3; optional string uuid = 4; optional bytes body = 5; }
//! message Metric  { optional string name = 1; optional uint64 alias = 2; optional uint64 timestamp = 3;
//!                   optional uint32 datatype = 4; optional bool is_historical = 5;
//!                   optional bool is_transient = 6; optional bool is_null = 7;
//!                   oneof value { uint32 int_value = 10; uint64 long_value = 11; float float_value = 12;
//!                                 double double_value = 13; bool boolean_value = 14;
//!                                 string string_value = 15; bytes bytes_value = 16; ... } }
//! ```

use prost::Message as _;

/// `Payload`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Payload {
    /// Milliseconds since the Unix epoch when the message was sent.
    #[prost(uint64, optional, tag = "1")]
    pub timestamp: Option<u64>,
    /// The metrics.
    #[prost(message, repeated, tag = "2")]
    pub metrics: Vec<Metric>,
    /// 0 to 255, one more than the edge node's previous message.
    #[prost(uint64, optional, tag = "3")]
    pub seq: Option<u64>,
    /// Not read.
    #[prost(string, optional, tag = "4")]
    pub uuid: Option<String>,
    /// Not read.
    #[prost(bytes = "vec", optional, tag = "5")]
    pub body: Option<Vec<u8>>,
}

impl Payload {
    /// The payload as protobuf bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        self.encode_to_vec()
    }
}

/// `Payload.Metric`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Metric {
    /// The name; in data messages often left out for the alias.
    #[prost(string, optional, tag = "1")]
    pub name: Option<String>,
    /// The alias a birth gave the name.
    #[prost(uint64, optional, tag = "2")]
    pub alias: Option<u64>,
    /// Milliseconds since the Unix epoch of the value.
    #[prost(uint64, optional, tag = "3")]
    pub timestamp: Option<u64>,
    /// A [`DataType`] number; in data messages often left out.
    #[prost(uint32, optional, tag = "4")]
    pub datatype: Option<u32>,
    /// A value from the past, sent late.
    #[prost(bool, optional, tag = "5")]
    pub is_historical: Option<bool>,
    /// A value not to be stored (Sparkplug 3.0 section 6.4.4).
    #[prost(bool, optional, tag = "6")]
    pub is_transient: Option<bool>,
    /// The value is null.
    #[prost(bool, optional, tag = "7")]
    pub is_null: Option<bool>,
    /// The value.
    #[prost(oneof = "MetricValue", tags = "10, 11, 12, 13, 14, 15, 16")]
    pub value: Option<MetricValue>,
}

/// `Payload.Metric.value`, the kinds a host stores.
#[derive(Clone, PartialEq, prost::Oneof)]
pub enum MetricValue {
    /// Int8, Int16, Int32 (two's complement), UInt8, UInt16, UInt32.
    #[prost(uint32, tag = "10")]
    IntValue(u32),
    /// Int64 (two's complement), UInt64, DateTime.
    #[prost(uint64, tag = "11")]
    LongValue(u64),
    /// Float.
    #[prost(float, tag = "12")]
    FloatValue(f32),
    /// Double.
    #[prost(double, tag = "13")]
    DoubleValue(f64),
    /// Boolean.
    #[prost(bool, tag = "14")]
    BooleanValue(bool),
    /// String, Text, UUID.
    #[prost(string, tag = "15")]
    StringValue(String),
    /// Bytes, File, and the arrays of Sparkplug 3.0.
    #[prost(bytes = "vec", tag = "16")]
    BytesValue(Vec<u8>),
}

/// Sparkplug B data types (Sparkplug 3.0 section 6.4.16).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum DataType {
    /// 1.
    Int8,
    /// 2.
    Int16,
    /// 3.
    Int32,
    /// 4.
    Int64,
    /// 5.
    UInt8,
    /// 6.
    UInt16,
    /// 7.
    UInt32,
    /// 8.
    UInt64,
    /// 9.
    Float,
    /// 10.
    Double,
    /// 11.
    Boolean,
    /// 12.
    String,
    /// 13: milliseconds since the Unix epoch.
    DateTime,
    /// 14.
    Text,
    /// 15.
    Uuid,
    /// 17.
    Bytes,
    /// 18.
    File,
    /// Anything else: 0 (unknown), the data sets, templates, property sets
    /// and arrays; kept by number.
    Other(u32),
}

impl DataType {
    /// The type of a number from the wire.
    pub fn from_wire(n: u32) -> DataType {
        match n {
            1 => DataType::Int8,
            2 => DataType::Int16,
            3 => DataType::Int32,
            4 => DataType::Int64,
            5 => DataType::UInt8,
            6 => DataType::UInt16,
            7 => DataType::UInt32,
            8 => DataType::UInt64,
            9 => DataType::Float,
            10 => DataType::Double,
            11 => DataType::Boolean,
            12 => DataType::String,
            13 => DataType::DateTime,
            14 => DataType::Text,
            15 => DataType::Uuid,
            17 => DataType::Bytes,
            18 => DataType::File,
            n => DataType::Other(n),
        }
    }

    /// The schema's name of the type, for a reason or an attribute.
    pub fn name(self) -> String {
        match self {
            DataType::Int8 => "Int8".into(),
            DataType::Int16 => "Int16".into(),
            DataType::Int32 => "Int32".into(),
            DataType::Int64 => "Int64".into(),
            DataType::UInt8 => "UInt8".into(),
            DataType::UInt16 => "UInt16".into(),
            DataType::UInt32 => "UInt32".into(),
            DataType::UInt64 => "UInt64".into(),
            DataType::Float => "Float".into(),
            DataType::Double => "Double".into(),
            DataType::Boolean => "Boolean".into(),
            DataType::String => "String".into(),
            DataType::DateTime => "DateTime".into(),
            DataType::Text => "Text".into(),
            DataType::Uuid => "UUID".into(),
            DataType::Bytes => "Bytes".into(),
            DataType::File => "File".into(),
            DataType::Other(16) => "DataSet".into(),
            DataType::Other(19) => "Template".into(),
            DataType::Other(20) => "PropertySet".into(),
            DataType::Other(21) => "PropertySetList".into(),
            DataType::Other(n) => format!("datatype {n}"),
        }
    }
}

/// A payload that is not a Sparkplug B protobuf message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a Sparkplug B payload: {0}")]
pub struct PayloadError(pub String);

/// Decodes a payload.
pub fn decode(bytes: &[u8]) -> Result<Payload, PayloadError> {
    Payload::decode(bytes).map_err(|e| PayloadError(e.to_string()))
}

/// The NCMD payload that asks an edge node for a rebirth (Sparkplug 3.0
/// section 6.4.11): the Boolean metric `Node Control/Rebirth` set to true,
/// at `now_ms`.
pub fn rebirth_request(now_ms: u64) -> Vec<u8> {
    Payload {
        timestamp: Some(now_ms),
        metrics: vec![Metric {
            name: Some(REBIRTH_METRIC.to_owned()),
            timestamp: Some(now_ms),
            datatype: Some(11),
            value: Some(MetricValue::BooleanValue(true)),
            ..Metric::default()
        }],
        ..Payload::default()
    }
    .to_bytes()
}

/// The node control metric that asks for a rebirth.
pub const REBIRTH_METRIC: &str = "Node Control/Rebirth";

/// The birth-death sequence metric of NBIRTH and NDEATH.
pub const BD_SEQ_METRIC: &str = "bdSeq";
