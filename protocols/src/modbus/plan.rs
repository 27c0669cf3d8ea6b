//! Planning the reads that fetch a device's tags, and decoding their replies.
//!
//! Every request costs a round trip, and on a serial line a slow one, so tags
//! that sit close together are fetched by one read. A read may ask for at most
//! 125 registers (function codes 3 and 4, sections 6.3 and 6.4) or 2000 bits
//! (function codes 1 and 2, sections 6.1 and 6.2), and many devices answer
//! exception 2, illegal data address, when a read covers an address they do not
//! map (section 7), so [`PlanLimits`] bounds both the span of a read and the
//! unread gap a read may bridge between two tags.
//!
//! ```text
//! tags     [u16 @0][u32 @1..2]  gap 3..9  [f32 @10..11]          [u16 @40]
//! max_gap = 10:  read 0..11 (12 registers)                       read 40 (1)
//! ```
//!
//! The plan is fixed for a tag list, so the agent computes it once and replays
//! it every poll cycle.

use std::cmp;

use crate::event::{Reason, Value};

use super::codec::MapError;
use super::tag::{RegisterAddress, Table, TagSpec};

/// How reads may be shaped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlanLimits {
    /// The most registers one read of holding or input registers asks for,
    /// 1 to 125 (sections 6.3 and 6.4). Some devices accept fewer.
    pub max_registers: u16,
    /// The most bits one read of coils or discrete inputs asks for, 1 to 2000
    /// (sections 6.1 and 6.2).
    pub max_bits: u16,
    /// The most unused registers or bits a read may cover to join two tags. Zero
    /// reads only addresses that some tag uses, for devices that refuse reads of
    /// unmapped addresses.
    pub max_gap: u16,
}

impl Default for PlanLimits {
    /// The protocol's limits, bridging gaps of up to 10 addresses.
    fn default() -> Self {
        PlanLimits {
            max_registers: Table::Holding.max_per_read(),
            max_bits: Table::Coil.max_per_read(),
            max_gap: 10,
        }
    }
}

impl PlanLimits {
    /// Limits checked against what the protocol allows.
    pub fn try_new(
        max_registers: u16,
        max_bits: u16,
        max_gap: u16,
    ) -> Result<PlanLimits, PlanError> {
        let limits = PlanLimits {
            max_registers,
            max_bits,
            max_gap,
        };
        limits.validate()?;
        Ok(limits)
    }

    /// Checks that each read limit is at least 1 and at most what the protocol
    /// allows.
    pub fn validate(&self) -> Result<(), PlanError> {
        if !(1..=Table::Holding.max_per_read()).contains(&self.max_registers) {
            return Err(PlanError::MaxRegisters(self.max_registers));
        }
        if !(1..=Table::Coil.max_per_read()).contains(&self.max_bits) {
            return Err(PlanError::MaxBits(self.max_bits));
        }
        Ok(())
    }

    /// The most registers or bits one read of `table` may ask for.
    pub fn max_per_read(&self, table: Table) -> u16 {
        let configured = if table.is_bits() {
            self.max_bits
        } else {
            self.max_registers
        };
        cmp::min(configured, table.max_per_read())
    }
}

/// Errors from planning reads.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum PlanError {
    /// `max_registers` was 0 or more than 125.
    #[error("max_registers must be 1 to 125, got {0}")]
    MaxRegisters(u16),
    /// `max_bits` was 0 or more than 2000.
    #[error("max_bits must be 1 to 2000, got {0}")]
    MaxBits(u16),
    /// A tag's definition was invalid.
    #[error("tag {index}: {error}")]
    InvalidTag {
        /// The tag's position in the list given to [`plan`].
        index: usize,
        /// What is wrong with it.
        error: MapError,
    },
    /// A tag spans more registers than one read of its table may ask for.
    #[error("tag {index} spans {width} addresses, more than one read may ask for ({limit})")]
    TagTooWide {
        /// The tag's position in the list given to [`plan`].
        index: usize,
        /// How many registers it spans.
        width: u16,
        /// The read limit of its table.
        limit: u16,
    },
}

/// One read request: `count` registers or bits of `table` from `start`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Read {
    /// The table to read.
    pub table: Table,
    /// The first address read.
    pub start: RegisterAddress,
    /// How many registers or bits to read.
    pub count: u16,
    /// The tags this read fetches, as indices into the list given to [`plan`],
    /// in address order.
    pub tags: Vec<usize>,
}

/// What a device answered to a [`Read`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReadReply {
    /// Holding or input registers, from the read's start.
    Registers(Vec<u16>),
    /// Coils or discrete inputs, from the read's start.
    Bits(Vec<bool>),
}

impl Read {
    /// The function code that performs the read (sections 6.1 to 6.4).
    pub fn function_code(&self) -> u8 {
        match self.table {
            Table::Coil => 1,
            Table::Discrete => 2,
            Table::Holding => 3,
            Table::Input => 4,
        }
    }

    /// One past the last address read.
    pub fn end(&self) -> u32 {
        u32::from(self.start.0) + u32::from(self.count)
    }

    /// Decodes the reply to this read into one result per tag, in the read's
    /// order. `tags` must be the list the read was planned from.
    ///
    /// A reply shorter than asked fails only the tags it does not cover. Items
    /// beyond the read's count are ignored: bit replies come padded to a whole
    /// byte (section 6.1), and clients such as tokio-modbus pass the padding on.
    pub fn decode(
        &self,
        tags: &[TagSpec],
        reply: &ReadReply,
    ) -> Vec<(usize, Result<Value, Reason>)> {
        self.tags
            .iter()
            .map(|&index| (index, self.decode_tag(tags.get(index), reply)))
            .collect()
    }

    fn decode_tag(&self, tag: Option<&TagSpec>, reply: &ReadReply) -> Result<Value, Reason> {
        let tag = tag.ok_or_else(|| {
            Reason::Decode("tag is not in the list this read was planned from".into())
        })?;
        let start = u32::from(tag.address.0);
        let end = start + u32::from(tag.width());
        if tag.table != self.table || start < u32::from(self.start.0) || end > self.end() {
            return Err(Reason::Decode(format!(
                "{} tag at {} is not inside the read of {} {} from {}",
                tag.table, tag.address, self.count, self.table, self.start
            )));
        }
        // Both offsets are below `count`, which is a u16, so they fit a usize.
        let offset = (start - u32::from(self.start.0)) as usize;
        let end = (end - u32::from(self.start.0)) as usize;
        match reply {
            ReadReply::Registers(words) if !self.table.is_bits() => match words.get(offset..end) {
                Some(words) => tag
                    .decode_registers(words)
                    .map_err(|e| Reason::Decode(e.to_string())),
                None => Err(self.short_reply(words.len())),
            },
            ReadReply::Bits(bits) if self.table.is_bits() => match bits.get(offset) {
                Some(&bit) => Ok(tag.decode_bit(bit)),
                None => Err(self.short_reply(bits.len())),
            },
            ReadReply::Registers(_) => Err(Reason::Decode(format!(
                "expected bits from the {} table, got registers",
                self.table
            ))),
            ReadReply::Bits(_) => Err(Reason::Decode(format!(
                "expected registers from the {} table, got bits",
                self.table
            ))),
        }
    }

    fn short_reply(&self, got: usize) -> Reason {
        Reason::ShortReply {
            expected: self.count,
            got: u16::try_from(got).unwrap_or(u16::MAX),
        }
    }
}

/// The reads that fetch a list of tags.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Plan {
    /// The reads, by table (coils, discrete inputs, holding, input registers) and
    /// then by address.
    pub reads: Vec<Read>,
}

impl Plan {
    /// How many requests one poll of every tag takes.
    pub fn reads_per_cycle(&self) -> usize {
        self.reads.len()
    }

    /// How many registers and bits one poll asks for, gaps included.
    pub fn items_per_cycle(&self) -> u32 {
        self.reads.iter().map(|r| u32::from(r.count)).sum()
    }

    /// Whether there is nothing to read.
    pub fn is_empty(&self) -> bool {
        self.reads.is_empty()
    }
}

/// A read being built: the span `start..end` and its tags.
struct Open {
    table: Table,
    start: u32,
    end: u32,
    tags: Vec<usize>,
}

impl Open {
    fn finish(self, limits: &PlanLimits) -> Read {
        let limit = limits.max_per_read(self.table);
        Read {
            table: self.table,
            // Tags are validated to end at or before 65536, so a start fits 16 bits.
            start: RegisterAddress(u16::try_from(self.start).unwrap_or(u16::MAX)),
            // A read only grows while its span stays within the limit, which is a u16.
            count: u16::try_from(self.end - self.start).unwrap_or(limit),
            tags: self.tags,
        }
    }
}

/// Plans the reads that fetch `tags`: tags of one table are taken in address
/// order and joined into one read while the read's span stays within the
/// table's limit and the unread gap before each tag is at most `max_gap`.
/// Tags that overlap, such as two bits of one register, share a read.
///
/// Every tag is in exactly one read and lies wholly inside it.
pub fn plan(tags: &[TagSpec], limits: &PlanLimits) -> Result<Plan, PlanError> {
    limits.validate()?;
    let mut spans = Vec::with_capacity(tags.len());
    for (index, tag) in tags.iter().enumerate() {
        tag.validate()
            .map_err(|error| PlanError::InvalidTag { index, error })?;
        let width = tag.width();
        let limit = limits.max_per_read(tag.table);
        if width > limit {
            return Err(PlanError::TagTooWide {
                index,
                width,
                limit,
            });
        }
        let start = u32::from(tag.address.0);
        spans.push((tag.table, start, start + u32::from(width), index));
    }
    spans.sort_unstable();

    let mut reads = Vec::new();
    let mut open: Option<Open> = None;
    for (table, start, end, index) in spans {
        if let Some(read) = open.as_mut() {
            let gap = start.saturating_sub(read.end);
            let new_end = cmp::max(read.end, end);
            let fits = read.table == table
                && gap <= u32::from(limits.max_gap)
                && new_end - read.start <= u32::from(limits.max_per_read(table));
            if fits {
                read.end = new_end;
                read.tags.push(index);
                continue;
            }
        }
        let next = Open {
            table,
            start,
            end,
            tags: vec![index],
        };
        if let Some(done) = open.replace(next) {
            reads.push(done.finish(limits));
        }
    }
    if let Some(done) = open {
        reads.push(done.finish(limits));
    }
    Ok(Plan { reads })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::modbus::codec::WriteData;
    use crate::modbus::tag::{ByteOrder, DataType};
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    fn tag(table: Table, address: u16, data_type: DataType) -> TagSpec {
        TagSpec {
            table,
            address: RegisterAddress(address),
            data_type,
            order: ByteOrder::Abcd,
            bit: None,
            length: 0,
            scale: 1.0,
            offset: 0.0,
        }
    }

    fn bit(table: Table, address: u16, bit: u8) -> TagSpec {
        TagSpec {
            bit: Some(bit),
            ..tag(table, address, DataType::Bool)
        }
    }

    fn u16s(count: u16) -> Vec<TagSpec> {
        (0..count)
            .map(|a| tag(Table::Holding, a, DataType::U16))
            .collect()
    }

    /// A valid tag of a random table, type and place; addresses cluster near 0
    /// half of the time so that reads get joined.
    fn arb_tag() -> impl Strategy<Value = TagSpec> {
        let table = prop::sample::select(vec![
            Table::Coil,
            Table::Discrete,
            Table::Holding,
            Table::Input,
        ]);
        let data_type = prop::sample::select(vec![
            DataType::Bool,
            DataType::U16,
            DataType::I16,
            DataType::U32,
            DataType::I32,
            DataType::U64,
            DataType::I64,
            DataType::F32,
            DataType::F64,
            DataType::String,
        ]);
        let address = prop_oneof![0u16..300, any::<u16>()];
        (table, data_type, address, 0u8..16, 1u16..=125).prop_map(
            |(table, data_type, address, b, length)| {
                let data_type = if table.is_bits() {
                    DataType::Bool
                } else {
                    data_type
                };
                let mut spec = tag(table, 0, data_type);
                if !table.is_bits() && data_type == DataType::Bool {
                    spec.bit = Some(b);
                }
                if data_type == DataType::String {
                    spec.length = length;
                }
                let last = 65536 - u32::from(spec.width());
                spec.address = RegisterAddress(cmp::min(u32::from(address), last) as u16);
                spec
            },
        )
    }

    fn arb_limits() -> impl Strategy<Value = PlanLimits> {
        (1u16..=125, 1u16..=2000, 0u16..20).prop_map(|(max_registers, max_bits, max_gap)| {
            PlanLimits {
                max_registers,
                max_bits,
                max_gap,
            }
        })
    }

    proptest! {
        #[test]
        fn every_tag_is_read_exactly_once_and_within_the_limits(
            tags in prop::collection::vec(arb_tag(), 0..60),
            limits in arb_limits(),
        ) {
            // A list holding a tag too wide for its table is refused, naming the
            // first such tag; the tags that fit are then planned on their own.
            let fits = |t: &TagSpec| t.width() <= limits.max_per_read(t.table);
            if let Some(index) = tags.iter().position(|t| !fits(t)) {
                let result = plan(&tags, &limits);
                let refused = matches!(result, Err(PlanError::TagTooWide { index: i, .. }) if i == index);
                prop_assert!(refused, "{:?}", result);
            }
            let tags: Vec<TagSpec> = tags.into_iter().filter(fits).collect();
            let plan = plan(&tags, &limits).expect("valid tags plan");
            let mut seen = vec![0usize; tags.len()];
            for read in &plan.reads {
                prop_assert!(read.count >= 1);
                prop_assert!(read.count <= limits.max_per_read(read.table));
                prop_assert!(read.end() <= 65536);
                prop_assert!(!read.tags.is_empty());
                let mut used = vec![false; usize::from(read.count)];
                for &index in &read.tags {
                    seen[index] += 1;
                    let t = &tags[index];
                    let start = u32::from(t.address.0);
                    let end = start + u32::from(t.width());
                    prop_assert_eq!(t.table, read.table);
                    prop_assert!(start >= u32::from(read.start.0) && end <= read.end(), "{t:?} outside {read:?}");
                    for a in start..end {
                        used[(a - u32::from(read.start.0)) as usize] = true;
                    }
                }
                // Reads are tight at both ends and bridge no gap wider than allowed.
                prop_assert!(used[0] && used[used.len() - 1]);
                let widest_gap = used.split(|u| *u).map(<[bool]>::len).max().unwrap_or(0);
                prop_assert!(widest_gap <= usize::from(limits.max_gap));
            }
            prop_assert!(seen.iter().all(|&n| n == 1), "{seen:?}");
        }

        #[test]
        fn planned_reads_decode_what_a_device_holds(
            values in prop::collection::vec(any::<u32>(), 1..40),
            spacing in 2u16..6,
            limits in arb_limits().prop_filter("a u32 needs two registers", |l| l.max_registers >= 2),
        ) {
            // A device whose holding registers hold the given u32s, `spacing`
            // registers apart, with unused registers in between.
            let tags: Vec<TagSpec> = (0..values.len())
                .map(|i| tag(Table::Holding, 1000 + i as u16 * spacing, DataType::U32))
                .collect();
            let mut memory = BTreeMap::new();
            for (t, v) in tags.iter().zip(&values) {
                let Ok(WriteData::Registers(words)) = t.encode_write(&Value::U64((*v).into())) else {
                    panic!("u32 encodes as registers");
                };
                for (i, w) in words.into_iter().enumerate() {
                    memory.insert(t.address.0 as usize + i, w);
                }
            }
            let plan = plan(&tags, &limits).expect("plans");
            for read in &plan.reads {
                let words = (read.start.0..read.start.0 + read.count)
                    .map(|a| memory.get(&usize::from(a)).copied().unwrap_or(0xDEAD))
                    .collect();
                for (index, value) in read.decode(&tags, &ReadReply::Registers(words)) {
                    prop_assert_eq!(value, Ok(Value::U64(values[index].into())));
                }
            }
        }
    }

    #[test]
    fn contiguous_tags_are_coalesced_up_to_the_read_limit() {
        let limits = PlanLimits::default();
        let one = plan(&u16s(100), &limits).expect("plans");
        assert_eq!(one.reads_per_cycle(), 1);
        assert_eq!(one.reads[0].count, 100);
        assert_eq!(one.reads[0].tags, (0..100).collect::<Vec<_>>());
        let two = plan(&u16s(200), &limits).expect("plans");
        assert_eq!(two.reads_per_cycle(), 2);
        assert_eq!(
            (two.reads[0].start, two.reads[0].count),
            (RegisterAddress(0), 125)
        );
        assert_eq!(
            (two.reads[1].start, two.reads[1].count),
            (RegisterAddress(125), 75)
        );
        assert_eq!(two.items_per_cycle(), 200);
        let small = PlanLimits::try_new(10, 2000, 0).expect("valid");
        assert_eq!(
            plan(&u16s(100), &small).expect("plans").reads_per_cycle(),
            10
        );
    }

    #[test]
    fn a_gap_wider_than_max_gap_splits_the_read() {
        let limits = PlanLimits {
            max_gap: 3,
            ..PlanLimits::default()
        };
        let joined = [
            tag(Table::Input, 0, DataType::U16),
            tag(Table::Input, 4, DataType::U16),
        ];
        let plan_joined = plan(&joined, &limits).expect("plans");
        assert_eq!(plan_joined.reads_per_cycle(), 1);
        assert_eq!(plan_joined.reads[0].count, 5);
        let split = [
            tag(Table::Input, 0, DataType::U16),
            tag(Table::Input, 5, DataType::U16),
        ];
        assert_eq!(plan(&split, &limits).expect("plans").reads_per_cycle(), 2);
        let strict = PlanLimits {
            max_gap: 0,
            ..PlanLimits::default()
        };
        let adjacent = [
            tag(Table::Input, 0, DataType::U32),
            tag(Table::Input, 2, DataType::U16),
        ];
        assert_eq!(
            plan(&adjacent, &strict).expect("plans").reads_per_cycle(),
            1
        );
    }

    #[test]
    fn overlapping_tags_share_a_read() {
        let tags = [
            bit(Table::Holding, 7, 0),
            bit(Table::Holding, 7, 15),
            tag(Table::Holding, 7, DataType::U16),
            tag(Table::Holding, 6, DataType::U32),
        ];
        let planned = plan(
            &tags,
            &PlanLimits {
                max_gap: 0,
                ..PlanLimits::default()
            },
        )
        .expect("plans");
        assert_eq!(planned.reads.len(), 1);
        let read = &planned.reads[0];
        assert_eq!((read.start, read.count), (RegisterAddress(6), 2));
        assert_eq!(read.tags, vec![3, 0, 1, 2]);
        let values = read.decode(&tags, &ReadReply::Registers(vec![0x0001, 0x8001]));
        assert_eq!(
            values,
            vec![
                (3, Ok(Value::U64(0x0001_8001))),
                (0, Ok(Value::Bool(true))),
                (1, Ok(Value::Bool(true))),
                (2, Ok(Value::U64(0x8001))),
            ]
        );
    }

    #[test]
    fn tables_are_planned_apart_and_in_table_order() {
        let tags = [
            tag(Table::Input, 0, DataType::U16),
            tag(Table::Holding, 0, DataType::U16),
            tag(Table::Coil, 0, DataType::Bool),
            tag(Table::Discrete, 0, DataType::Bool),
        ];
        let planned = plan(&tags, &PlanLimits::default()).expect("plans");
        let codes: Vec<u8> = planned.reads.iter().map(Read::function_code).collect();
        assert_eq!(codes, [1, 2, 3, 4]);
    }

    #[test]
    fn bad_tags_and_limits_are_refused_with_their_index() {
        let limits = PlanLimits::default();
        let tags = [
            tag(Table::Holding, 0, DataType::U16),
            tag(Table::Holding, 1, DataType::Bool),
        ];
        assert_eq!(
            plan(&tags, &limits),
            Err(PlanError::InvalidTag {
                index: 1,
                error: MapError::BitRequired
            })
        );
        let narrow = PlanLimits::try_new(4, 2000, 0).expect("valid");
        let wide = [
            tag(Table::Holding, 0, DataType::U16),
            tag(Table::Holding, 10, DataType::F64),
        ];
        assert_eq!(plan(&wide, &narrow).map(|p| p.reads.len()), Ok(2));
        let wider = [TagSpec {
            length: 5,
            ..tag(Table::Holding, 0, DataType::String)
        }];
        assert_eq!(
            plan(&wider, &narrow),
            Err(PlanError::TagTooWide {
                index: 0,
                width: 5,
                limit: 4
            })
        );
        assert_eq!(
            PlanLimits::try_new(0, 2000, 0),
            Err(PlanError::MaxRegisters(0))
        );
        assert_eq!(
            PlanLimits::try_new(126, 2000, 0),
            Err(PlanError::MaxRegisters(126))
        );
        assert_eq!(
            PlanLimits::try_new(125, 2001, 0),
            Err(PlanError::MaxBits(2001))
        );
        assert_eq!(
            plan(
                &[],
                &PlanLimits {
                    max_bits: 0,
                    ..limits
                }
            ),
            Err(PlanError::MaxBits(0))
        );
        assert_eq!(plan(&[], &limits), Ok(Plan::default()));
    }

    #[test]
    fn a_short_reply_fails_only_the_tags_it_does_not_cover() {
        let tags = [
            tag(Table::Holding, 0, DataType::U16),
            tag(Table::Holding, 1, DataType::U32),
            tag(Table::Holding, 3, DataType::U16),
        ];
        let planned = plan(&tags, &PlanLimits::default()).expect("plans");
        let read = &planned.reads[0];
        assert_eq!(read.count, 4);
        let values = read.decode(&tags, &ReadReply::Registers(vec![7, 0, 1]));
        let short = Err(Reason::ShortReply {
            expected: 4,
            got: 3,
        });
        assert_eq!(
            values,
            vec![(0, Ok(Value::U64(7))), (1, Ok(Value::U64(1))), (2, short)]
        );
    }

    #[test]
    fn bit_replies_ignore_padding_and_mismatched_replies_are_decode_errors() {
        let tags = [
            tag(Table::Coil, 3, DataType::Bool),
            tag(Table::Coil, 5, DataType::Bool),
        ];
        let planned = plan(&tags, &PlanLimits::default()).expect("plans");
        let read = &planned.reads[0];
        assert_eq!((read.start, read.count), (RegisterAddress(3), 3));
        // A reply padded to a whole byte, as tokio-modbus hands it on.
        let padded = ReadReply::Bits(vec![true, false, false, true, true, true, true, true]);
        assert_eq!(
            read.decode(&tags, &padded),
            vec![(0, Ok(Value::Bool(true))), (1, Ok(Value::Bool(false)))]
        );
        let short = read.decode(&tags, &ReadReply::Bits(vec![true]));
        assert_eq!(
            short[1],
            (
                1,
                Err(Reason::ShortReply {
                    expected: 3,
                    got: 1
                })
            )
        );
        let wrong = read.decode(&tags, &ReadReply::Registers(vec![0, 0, 0]));
        assert!(wrong
            .iter()
            .all(|(_, v)| matches!(v, Err(Reason::Decode(_)))));

        let registers = [tag(Table::Input, 0, DataType::U16)];
        let planned = plan(&registers, &PlanLimits::default()).expect("plans");
        let wrong = planned.reads[0].decode(&registers, &ReadReply::Bits(vec![true; 16]));
        assert!(matches!(wrong[0].1, Err(Reason::Decode(_))));
    }

    #[test]
    fn decode_errors_and_foreign_tag_lists_become_reasons() {
        let tags = [TagSpec {
            length: 1,
            ..tag(Table::Input, 0, DataType::String)
        }];
        let planned = plan(&tags, &PlanLimits::default()).expect("plans");
        let read = &planned.reads[0];
        let invalid_utf8 = read.decode(&tags, &ReadReply::Registers(vec![0xFFFE]));
        assert!(matches!(&invalid_utf8[0].1, Err(Reason::Decode(msg)) if msg.contains("UTF-8")));
        let elsewhere = [tag(Table::Input, 9, DataType::U16)];
        assert!(matches!(
            read.decode(&elsewhere, &ReadReply::Registers(vec![0]))[0].1,
            Err(Reason::Decode(_))
        ));
        assert!(matches!(
            read.decode(&[], &ReadReply::Registers(vec![0]))[0].1,
            Err(Reason::Decode(_))
        ));
    }
}
