//! A config document as a serde `Deserializer` that holds little: the small
//! tables parsed, each element of a large array of tables kept as the span of
//! its text and parsed only when it is deserialised (then dropped), and the
//! environment's overrides kept as text until a key asks for a type.
//!
//! The overrides are text because a variable has no type: `007` for a password
//! stays `007`, and the same text reads as a number where a key wants one.

use std::collections::BTreeMap;
use std::fmt::{self, Write as _};
use std::ops::Range;

use serde::de::{self, DeserializeSeed, IntoDeserializer, MapAccess, SeqAccess, Visitor};
use serde::forward_to_deserialize_any;

/// A part of the document.
#[derive(Debug)]
pub(crate) enum Node {
    /// Parsed already (a small table, a value).
    Toml(toml::Value),
    /// A table some of whose parts are not [`Node::Toml`].
    Table(BTreeMap<String, Node>),
    /// An array of tables some of whose elements are not [`Node::Toml`].
    Array(Vec<Node>),
    /// An array-of-tables element not parsed yet: the span of its keys'
    /// lines in the document.
    Lazy(Range<usize>),
    /// An `OUTPOST_…` variable's value.
    Env {
        /// The variable, for the error message.
        var: String,
        /// Its value.
        value: String,
    },
}

impl Node {
    /// This node as a table whose children can be changed, converting a parsed
    /// table; `None` if it is not a table.
    pub(crate) fn as_table(&mut self) -> Option<&mut BTreeMap<String, Node>> {
        if let Node::Toml(toml::Value::Table(t)) = self {
            let t = std::mem::take(t);
            *self = Node::Table(t.into_iter().map(|(k, v)| (k, Node::Toml(v))).collect());
        }
        match self {
            Node::Table(t) => Some(t),
            _ => None,
        }
    }

    /// This node as an array whose elements can be changed, converting a
    /// parsed array; `None` if it is not an array.
    pub(crate) fn as_array(&mut self) -> Option<&mut Vec<Node>> {
        if let Node::Toml(toml::Value::Array(a)) = self {
            let a = std::mem::take(a);
            *self = Node::Array(a.into_iter().map(Node::Toml).collect());
        }
        match self {
            Node::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// A deserialisation error: its message, the key path where it happened,
/// and the environment variable the value came from if it did.
#[derive(Debug)]
pub(crate) struct Error {
    pub(crate) message: String,
    pub(crate) var: Option<String>,
    /// The path's parts, innermost first (each table or array adds its own
    /// as the error passes up through it).
    path: Vec<Part>,
}

#[derive(Debug)]
enum Part {
    Key(String),
    Index(usize),
}

impl Error {
    /// The key path: `modbus.devices[0].tags[3].address`; empty at the top.
    pub(crate) fn path(&self) -> String {
        let mut out = String::new();
        for part in self.path.iter().rev() {
            match part {
                Part::Key(k) if out.is_empty() => out.push_str(k),
                Part::Key(k) => {
                    out.push('.');
                    out.push_str(k);
                }
                Part::Index(i) => {
                    let _ = write!(out, "[{i}]");
                }
            }
        }
        out
    }

    fn within(mut self, part: Part) -> Error {
        self.path.push(part);
        self
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Error {}

impl de::Error for Error {
    fn custom<T: fmt::Display>(msg: T) -> Self {
        Error {
            message: msg.to_string(),
            var: None,
            path: Vec::new(),
        }
    }
}

/// 1-based line and column of byte `at` in `text`.
pub(crate) fn line_col(text: &str, at: usize) -> (usize, usize) {
    let before = text.get(..at).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let col = before
        .rsplit('\n')
        .next()
        .map_or(1, |l| l.chars().count() + 1);
    (line, col)
}

/// A TOML error in the element at `offset` of `text`, with the line and
/// column in the whole document, and the key written on that line (the
/// elements parsed on their own are flat tables of `key = value` lines).
fn toml_error(text: &str, offset: usize, e: &toml::de::Error) -> Error {
    let mut error = <Error as de::Error>::custom(e.message().trim());
    if let Some(span) = e.span() {
        let at = offset + span.start;
        let (line, col) = line_col(text, at);
        error.message = format!(
            "TOML parse error at line {line}, column {col}: {}",
            error.message
        );
        let start = text
            .get(..at)
            .and_then(|t| t.rfind('\n'))
            .map_or(0, |i| i + 1);
        let key = text
            .get(start..)
            .and_then(|l| l.lines().next())
            .and_then(|l| l.split_once('='))
            .map(|(k, _)| k.trim().trim_matches('"'))
            .filter(|k| !k.is_empty() && !k.starts_with('#') && !k.starts_with('['));
        if let Some(k) = key {
            error.path.push(Part::Key(k.to_owned()));
        }
    }
    error
}

fn value_error(e: toml::de::Error) -> Error {
    <Error as de::Error>::custom(e.message().trim())
}

/// A [`Node`] and the document its spans point into.
pub(crate) struct NodeDe<'de> {
    pub(crate) node: Node,
    pub(crate) text: &'de str,
}

/// Calls `$method` on whichever deserializer the node is.
macro_rules! dispatch {
    ($($method:ident ( $($arg:ident : $ty:ty),* );)*) => {$(
        fn $method<V: Visitor<'de>>(self, $($arg: $ty,)* visitor: V) -> Result<V::Value, Error> {
            let text = self.text;
            match self.node {
                Node::Toml(v) => v.$method($($arg,)* visitor).map_err(value_error),
                Node::Lazy(r) => {
                    let body = text.get(r.clone()).unwrap_or("");
                    let de = toml::de::Deserializer::parse(body)
                        .map_err(|e| toml_error(text, r.start, &e))?;
                    de.$method($($arg,)* visitor)
                        .map_err(|e| toml_error(text, r.start, &e))
                }
                Node::Env { var, value } => {
                    EnvDe { value }.$method($($arg,)* visitor).map_err(|mut e| {
                        e.var = Some(var);
                        e
                    })
                }
                node @ (Node::Table(_) | Node::Array(_)) => {
                    Composite { node, text }.$method($($arg,)* visitor)
                }
            }
        }
    )*};
}

impl<'de> de::Deserializer<'de> for NodeDe<'de> {
    type Error = Error;

    dispatch! {
        deserialize_any();
        deserialize_bool();
        deserialize_i8();
        deserialize_i16();
        deserialize_i32();
        deserialize_i64();
        deserialize_i128();
        deserialize_u8();
        deserialize_u16();
        deserialize_u32();
        deserialize_u64();
        deserialize_u128();
        deserialize_f32();
        deserialize_f64();
        deserialize_char();
        deserialize_str();
        deserialize_string();
        deserialize_bytes();
        deserialize_byte_buf();
        deserialize_option();
        deserialize_unit();
        deserialize_unit_struct(name: &'static str);
        deserialize_newtype_struct(name: &'static str);
        deserialize_seq();
        deserialize_tuple(len: usize);
        deserialize_tuple_struct(name: &'static str, len: usize);
        deserialize_map();
        deserialize_struct(name: &'static str, fields: &'static [&'static str]);
        deserialize_enum(name: &'static str, variants: &'static [&'static str]);
        deserialize_identifier();
        deserialize_ignored_any();
    }
}

/// A [`Node::Table`] or [`Node::Array`].
struct Composite<'de> {
    node: Node,
    text: &'de str,
}

impl<'de> de::Deserializer<'de> for Composite<'de> {
    type Error = Error;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        match self.node {
            Node::Table(t) => visitor.visit_map(TableAccess {
                entries: t.into_iter(),
                value: None,
                text: self.text,
            }),
            Node::Array(a) => visitor.visit_seq(ArrayAccess {
                elements: a.into_iter(),
                index: 0,
                text: self.text,
            }),
            _ => Err(de::Error::custom("not a table or an array")),
        }
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        visitor.visit_some(self)
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, Error> {
        visitor.visit_newtype_struct(self)
    }

    forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string
        bytes byte_buf unit unit_struct seq tuple tuple_struct map struct enum
        identifier ignored_any
    }
}

struct TableAccess<'de> {
    entries: std::collections::btree_map::IntoIter<String, Node>,
    value: Option<(String, Node)>,
    text: &'de str,
}

impl<'de> MapAccess<'de> for TableAccess<'de> {
    type Error = Error;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, Error> {
        match self.entries.next() {
            Some((k, v)) => {
                self.value = Some((k.clone(), v));
                seed.deserialize(k.into_deserializer()).map(Some)
            }
            None => Ok(None),
        }
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, Error> {
        let (key, node) = self
            .value
            .take()
            .ok_or_else(|| <Error as de::Error>::custom("a value without a key"))?;
        seed.deserialize(NodeDe {
            node,
            text: self.text,
        })
        .map_err(|e| e.within(Part::Key(key)))
    }

    fn size_hint(&self) -> Option<usize> {
        Some(self.entries.len())
    }
}

struct ArrayAccess<'de> {
    elements: std::vec::IntoIter<Node>,
    index: usize,
    text: &'de str,
}

impl<'de> SeqAccess<'de> for ArrayAccess<'de> {
    type Error = Error;

    fn next_element_seed<T: DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<Option<T::Value>, Error> {
        match self.elements.next() {
            Some(node) => {
                let index = self.index;
                self.index += 1;
                seed.deserialize(NodeDe {
                    node,
                    text: self.text,
                })
                .map(Some)
                .map_err(|e| e.within(Part::Index(index)))
            }
            None => Ok(None),
        }
    }

    fn size_hint(&self) -> Option<usize> {
        Some(self.elements.len())
    }
}

/// An environment variable's text, read as the type the key asks for.
struct EnvDe {
    value: String,
}

impl EnvDe {
    fn invalid(&self, expected: &dyn de::Expected) -> Error {
        de::Error::invalid_type(de::Unexpected::Str(&self.value), expected)
    }
}

macro_rules! env_number {
    ($($method:ident => $visit:ident : $ty:ty;)*) => {$(
        fn $method<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
            match self.value.trim().parse::<$ty>() {
                Ok(n) => visitor.$visit(n),
                Err(_) => Err(self.invalid(&visitor)),
            }
        }
    )*};
}

impl<'de> de::Deserializer<'de> for EnvDe {
    type Error = Error;

    /// The key's type is not known (an untagged enum, say): a number or a
    /// boolean if the text is one, else the text.
    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        let v = self.value.trim();
        if v.eq_ignore_ascii_case("true") {
            visitor.visit_bool(true)
        } else if v.eq_ignore_ascii_case("false") {
            visitor.visit_bool(false)
        } else if let Ok(n) = v.parse::<i64>() {
            visitor.visit_i64(n)
        } else if let Ok(n) = v.parse::<u64>() {
            visitor.visit_u64(n)
        } else if let (true, Ok(n)) = (v.contains(['.', 'e', 'E']), v.parse::<f64>()) {
            visitor.visit_f64(n)
        } else {
            visitor.visit_string(self.value)
        }
    }

    fn deserialize_bool<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        let v = self.value.trim();
        if v.eq_ignore_ascii_case("true") {
            visitor.visit_bool(true)
        } else if v.eq_ignore_ascii_case("false") {
            visitor.visit_bool(false)
        } else {
            Err(self.invalid(&visitor))
        }
    }

    env_number! {
        deserialize_i8 => visit_i64: i64;
        deserialize_i16 => visit_i64: i64;
        deserialize_i32 => visit_i64: i64;
        deserialize_i64 => visit_i64: i64;
        deserialize_u8 => visit_u64: u64;
        deserialize_u16 => visit_u64: u64;
        deserialize_u32 => visit_u64: u64;
        deserialize_u64 => visit_u64: u64;
        deserialize_f32 => visit_f64: f64;
        deserialize_f64 => visit_f64: f64;
    }

    fn deserialize_str<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        visitor.visit_string(self.value)
    }

    fn deserialize_string<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        visitor.visit_string(self.value)
    }

    fn deserialize_char<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        visitor.visit_string(self.value)
    }

    fn deserialize_identifier<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        visitor.visit_string(self.value)
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        visitor.visit_some(self)
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, Error> {
        visitor.visit_newtype_struct(self)
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Error> {
        visitor.visit_enum(self.value.into_deserializer())
    }

    fn deserialize_ignored_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        visitor.visit_unit()
    }

    fn deserialize_unit<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        Err(self.invalid(&visitor))
    }

    fn deserialize_unit_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, Error> {
        Err(self.invalid(&visitor))
    }

    fn deserialize_seq<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        Err(self.invalid(&visitor))
    }

    fn deserialize_tuple<V: Visitor<'de>>(
        self,
        _len: usize,
        visitor: V,
    ) -> Result<V::Value, Error> {
        Err(self.invalid(&visitor))
    }

    fn deserialize_tuple_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _len: usize,
        visitor: V,
    ) -> Result<V::Value, Error> {
        Err(self.invalid(&visitor))
    }

    fn deserialize_map<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        Err(self.invalid(&visitor))
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Error> {
        Err(self.invalid(&visitor))
    }

    forward_to_deserialize_any! { i128 u128 bytes byte_buf }
}
