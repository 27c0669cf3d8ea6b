//! How both sessions count their window: the seqs sent (or handed out) and
//! not yet released, ascending.

use std::collections::VecDeque;

use crate::event::Seq;

/// Drops the seqs up to `upto` from the front of a session's in-flight
/// seqs (ascending): both sessions count their window this way.
pub(super) fn release(in_flight: &mut VecDeque<Seq>, upto: Seq) {
    while in_flight.front().is_some_and(|s| *s <= upto) {
        in_flight.pop_front();
    }
}
