//! Reading a stored event body back from a row.
//!
//! Both the outbox and the hub store keep the body as the postcard bytes of
//! [`EventBody`] (`outpost_protocols::event`), exactly as it travels, and
//! read it back the same way. The decoding of those bytes belongs to the
//! event model and stays there ([`EventBody::decode`]); what lives here is
//! the part that is about a SQLite row: which column types may hold a body,
//! and keeping a damaged body (data) apart from a failing read (an error).

use std::path::Path;

use outpost_protocols::event::EventBody;
use rusqlite::types::{Type, ValueRef};
use rusqlite::Row;

use crate::error::{AtPath, Error};

/// Why a stored body is not an event body: the file was damaged or edited
/// by hand.
#[derive(Debug, Clone, thiserror::Error)]
pub enum BodyError {
    /// The column holds something other than bytes.
    #[error("the body is {0:?}, not bytes")]
    NotBytes(Type),
    /// The bytes do not decode as an [`EventBody`].
    #[error("{0}")]
    Decode(#[source] postcard::Error),
}

/// Column `col` of `row` as an event body.
///
/// The outer result is the read (a SQLite failure, with `path`); the inner
/// one says whether what was read is a body, so that the caller can name the
/// damaged event in its own error.
pub fn event_body(
    row: &Row<'_>,
    col: usize,
    path: &Path,
) -> Result<Result<EventBody, BodyError>, Error> {
    Ok(match row.get_ref(col).at(path)? {
        // Text is accepted too: a body is only ever bytes, whatever type
        // SQLite was told.
        ValueRef::Blob(bytes) | ValueRef::Text(bytes) => {
            EventBody::decode(bytes).map_err(BodyError::Decode)
        }
        other => Err(BodyError::NotBytes(other.data_type())),
    })
}
