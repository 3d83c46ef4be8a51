//! The gateway-to-gateway wire protocol, in one place and free of I/O.
//!
//! One QUIC connection joins two gateways. Each forwarded TCP connection ("flow") uses:
//! - one **control stream** (bidirectional, opened by the ingress gateway) carrying [`Message`]s;
//! - per direction, up to N **lanes** (unidirectional streams opened by the sending side), each
//!   starting with a [`LaneHeader`] and then carrying [`ChunkHeader`] + payload records.
//!
//! ```text
//! ingress gateway (site A)                              egress gateway (site B)
//!   TCP accept ─ control: Open{flow, order, seq, codec, connect} ▶ wait for turn (order, seq)
//!   (any time)  ◀─ advert lane: page-cache advertisement, on connect and when it changed
//!   read TCP ──── lanes: Chunk{offset,len}+bytes ─────────▶ reorder ─▶ TCP dial + write
//!              ◀─ control: Opened | Refused{reason} ────────
//!              ◀─ lanes (return path): chunks ───────────── read TCP
//!   TCP EOF ───── control: Fin{length, digest} ────────────▶ after `length` bytes, if what it
//!                                                           wrote hashes to `digest`: shutdown(WR)
//!              ◀─ control: Ack{delivered, limit} (every few MiB) ─
//!              ◀─ control: Need{digests} ───────────────── codec: pages the decoder lacks
//!   retained ──── control: Supply{digest, page} ──────────▶ decoder resumes
//!   TCP error ─── control: Reset{reason} ──────────────────▶ abort TCP (RST)
//! ```
//!
//! Need/Supply is the codec's miss path: the egress decoder met a reference to a page it no
//! longer holds (evicted from its cache since it was advertised) and asks the ingress, which kept
//! a copy of every advertised page it referred to until the batch was acknowledged. Supplies ride
//! the control stream: they are rare, small in total, and must not occupy the offset space of the
//! data lanes.
//!
//! Why lanes: quinn-proto (0.11.17+) closes a connection once a single stream's receive buffer
//! holds more than 1024 unmerged gaps, which one stream with a bandwidth-delay-product-sized window
//! reaches quickly on a lossy long path. Striping a flow over several streams, each with a window
//! far below that limit, keeps clear of it and gives each flow the whole path.
//!
//! Why offsets and acks: every chunk names its byte offset in the flow's direction, and the
//! receiver acknowledges what it has delivered to its TCP peer. That is what a later version
//! needs to resume a flow on a new QUIC connection: resend from the last acknowledged offset.
//! Chunk offsets, [`Message::Fin`] lengths and [`Message::Ack`]s count bytes of the direction's
//! wire stream, typed [`WireOffset`]: the encoded stream of a codec direction, the TCP bytes of a
//! plain one. Offsets in the original (source QEMU) stream of a codec flow are
//! [`ferry_codec::StreamOffset`]s and never appear in this protocol.
//!
//! End-to-end digest: [`Message::Fin`] carries blake3 of every byte the sender read from its
//! local socket in that direction; the receiver compares it with blake3 of what it wrote to its
//! own before it ends its local side cleanly, and resets it on a mismatch.
//!
//! Flow control per flow: a sender sends a direction's bytes only up to the `limit` of the
//! receiver's latest [`Message::Ack`] (before the first one, [`INITIAL_SEND_WINDOW`]). A receiver
//! grants its delivered offset plus its reorder budget, so whatever a flow has in flight fits in
//! the receiver's reorder buffer, which lane readers always drain: a flow whose destination stops
//! reading parks its data there, never in QUIC's stream buffers, and so holds none of the
//! connection's flow-control window that the other flows, control streams, advertisements and
//! page supplies need.
//!
//! Versioning: the control stream and every lane start with a magic and [`VERSION`]; a peer
//! refuses a version it does not speak. The ALPN (`ferry/2`) changes with incompatible versions.
//! Version 2: `Fin` carries the direction's digest and `Ack` the sender's limit (version 1 had
//! only the length and the delivered offset).

use std::net::SocketAddr;

use bytes::Bytes;

use ferry_codec::{PageDigest, WireOffset, PAGE_SIZE};

/// Protocol version carried in every stream preamble.
pub const VERSION: u8 = 2;
/// First bytes of a control stream.
pub const CONTROL_MAGIC: [u8; 4] = *b"FRYC";
/// First bytes of a data lane.
pub const LANE_MAGIC: [u8; 4] = *b"FRYL";
/// First bytes of an advertisement lane: the sending gateway's page-cache advertisement (one u32
/// length + the encoded [`ferry_codec::Advertisement`]), for the whole connection ([`CONNECTION_FLOW`]).
pub const ADVERT_MAGIC: [u8; 4] = *b"FRYP";
/// Flow number of lanes that belong to the connection rather than to a flow.
pub const CONNECTION_FLOW: u64 = u64::MAX;
/// Largest advertisement accepted (16 bytes per advertised page: 4 M pages = 16 GiB of cache).
pub const MAX_ADVERT: u32 = 64 << 20;
/// Largest chunk payload a sender may put in one record; larger values are refused as corrupt.
pub const MAX_CHUNK: u32 = 1 << 20;
/// Bytes of a direction a sender may send before the receiver's first [`Message::Ack`] grants
/// more. Every receiver's reorder budget is at least this much.
pub const INITIAL_SEND_WINDOW: u64 = MAX_CHUNK as u64;
/// Largest control message body (except [`Message::Supply`], which is exactly
/// [`SUPPLY_BODY`] bytes).
pub const MAX_MESSAGE: usize = 4096;
/// Most digests in one [`Message::Need`] (32 bytes each, within [`MAX_MESSAGE`]).
pub const MAX_NEED_DIGESTS: usize = MAX_MESSAGE / 32;
/// Body of a [`Message::Supply`]: digest and page.
pub const SUPPLY_BODY: usize = 32 + PAGE_SIZE;

/// A malformed or unexpected protocol element.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProtocolError {
    /// The stream does not start with the expected magic.
    #[error("bad stream magic {0:02x?}")]
    BadMagic([u8; 4]),
    /// A version this gateway does not speak.
    #[error("unsupported protocol version {0} (this gateway speaks {VERSION})")]
    Version(u8),
    /// An unknown message type.
    #[error("unknown control message type {0}")]
    UnknownMessage(u8),
    /// A message whose body does not match its type.
    #[error("malformed {0} message")]
    Malformed(&'static str),
    /// A length beyond the protocol's bounds.
    #[error("{what} length {len} exceeds the limit {max}")]
    TooLong {
        /// What was too long.
        what: &'static str,
        /// The length read.
        len: u64,
        /// The limit.
        max: u64,
    },
}

/// Identifies a flow within one QUIC connection. Flows are numbered by the gateway that accepted
/// the TCP connection, so the key records whose numbering it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FlowKey {
    /// True if the local gateway opened (and numbered) the flow.
    pub opened_locally: bool,
    /// The opener's flow number.
    pub id: u64,
}

/// A control-stream message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    /// First message of a flow: dial `connect` and carry the flow there.
    Open {
        /// Flow number, unique per connection and opener.
        flow: u64,
        /// Flows with the same order key are dialed in `seq` order, each only after the
        /// previous one connected (QEMU tells its main channel by arrival order).
        order: u32,
        /// Position in that order, starting at 0 on each QUIC connection.
        seq: u64,
        /// Whether the ingress→egress direction is encoded by the page codec.
        codec: bool,
        /// TCP address the egress gateway dials.
        connect: SocketAddr,
    },
    /// The egress gateway connected to the target.
    Opened,
    /// The egress gateway could not or would not connect.
    Refused(String),
    /// The sender's direction is complete: exactly `length` bytes were sent.
    Fin {
        /// Total bytes in the sender's direction.
        length: WireOffset,
        /// blake3 of every byte the sender read from its local socket in this direction (the
        /// original stream, also on a codec direction): the receiver's local socket must get
        /// exactly those bytes.
        digest: blake3::Hash,
    },
    /// The sender's side of the flow failed; abort.
    Reset(String),
    /// The sender has delivered this many bytes of the receiver's direction to its TCP peer. For
    /// a codec direction: wire bytes the decoder fully decoded (every page they refer to
    /// resolved), so the ingress may drop the pages it kept for references before this offset.
    Ack {
        /// Bytes delivered.
        delivered: WireOffset,
        /// The sender may send the direction's bytes up to this offset (not beyond; a limit
        /// lower than an earlier one changes nothing).
        limit: WireOffset,
    },
    /// Codec flows, egress → ingress: the decoder cannot resolve these page references; send the
    /// pages. 1..=[`MAX_NEED_DIGESTS`] digests (see [`Message::needs`] for more).
    Need {
        /// Full blake3 digests of the pages.
        digests: Vec<PageDigest>,
    },
    /// Codec flows, ingress → egress: a page asked for by [`Message::Need`]. The receiver checks
    /// that it asked for it and that its blake3 is `digest`.
    Supply {
        /// The digest asked for.
        digest: PageDigest,
        /// The page ([`PAGE_SIZE`] bytes).
        page: Bytes,
    },
}

const T_OPEN: u8 = 1;
const T_OPENED: u8 = 2;
const T_REFUSED: u8 = 3;
const T_FIN: u8 = 4;
const T_RESET: u8 = 5;
const T_ACK: u8 = 6;
const T_NEED: u8 = 7;
const T_SUPPLY: u8 = 8;

/// Length of a message header: type (u8) + body length (u16, big-endian).
pub const MESSAGE_HEADER_LEN: usize = 3;
/// Body of a [`Message::Fin`]: length and digest.
const FIN_BODY: usize = 8 + 32;
/// Encoded length of a [`Message::Fin`]: header, 8-byte length and 32-byte digest.
pub const FIN_MESSAGE_LEN: usize = MESSAGE_HEADER_LEN + FIN_BODY;

impl Message {
    /// [`Message::Need`]s asking for `digests`, at most [`MAX_NEED_DIGESTS`] each.
    pub fn needs(digests: &[PageDigest]) -> impl Iterator<Item = Message> + '_ {
        digests.chunks(MAX_NEED_DIGESTS).map(|c| Message::Need { digests: c.to_vec() })
    }

    /// Appends the encoded message (header + body) to `out`. A `Need` carries at most
    /// [`MAX_NEED_DIGESTS`] digests (extra ones are not encoded; use [`Message::needs`]).
    pub fn encode(&self, out: &mut Vec<u8>) {
        let start = out.len();
        out.extend_from_slice(&[0, 0, 0]);
        let ty = match self {
            Self::Open { flow, order, seq, codec, connect } => {
                out.extend_from_slice(&flow.to_be_bytes());
                out.extend_from_slice(&order.to_be_bytes());
                out.extend_from_slice(&seq.to_be_bytes());
                out.push(u8::from(*codec));
                let text = connect.to_string();
                out.extend_from_slice(text.as_bytes());
                T_OPEN
            }
            Self::Opened => T_OPENED,
            Self::Refused(reason) => {
                out.extend_from_slice(truncate(reason).as_bytes());
                T_REFUSED
            }
            Self::Fin { length, digest } => {
                out.extend_from_slice(&length.get().to_be_bytes());
                out.extend_from_slice(digest.as_bytes());
                T_FIN
            }
            Self::Reset(reason) => {
                out.extend_from_slice(truncate(reason).as_bytes());
                T_RESET
            }
            Self::Ack { delivered, limit } => {
                out.extend_from_slice(&delivered.get().to_be_bytes());
                out.extend_from_slice(&limit.get().to_be_bytes());
                T_ACK
            }
            Self::Need { digests } => {
                debug_assert!(digests.len() <= MAX_NEED_DIGESTS, "use Message::needs");
                for d in digests.iter().take(MAX_NEED_DIGESTS) {
                    out.extend_from_slice(&d.0);
                }
                T_NEED
            }
            Self::Supply { digest, page } => {
                debug_assert_eq!(page.len(), PAGE_SIZE);
                out.extend_from_slice(&digest.0);
                out.extend_from_slice(page);
                T_SUPPLY
            }
        };
        let body_len = (out.len() - start - MESSAGE_HEADER_LEN) as u16;
        out[start] = ty;
        out[start + 1..start + 3].copy_from_slice(&body_len.to_be_bytes());
    }

    /// Parses a message header into (type, body length), checking the length bound (before the
    /// caller reads or allocates the body).
    pub fn decode_header(header: [u8; MESSAGE_HEADER_LEN]) -> Result<(u8, usize), ProtocolError> {
        let len = u16::from_be_bytes([header[1], header[2]]) as usize;
        let max = if header[0] == T_SUPPLY { SUPPLY_BODY } else { MAX_MESSAGE };
        if len > max {
            return Err(ProtocolError::TooLong { what: "control message", len: len as u64, max: max as u64 });
        }
        Ok((header[0], len))
    }

    /// Decodes a message body of type `ty`.
    pub fn decode_body(ty: u8, body: &[u8]) -> Result<Self, ProtocolError> {
        let u64_at = |at: usize, name| {
            body.get(at..at + 8)
                .map(|b| u64::from_be_bytes(b.try_into().unwrap_or([0; 8])))
                .ok_or(ProtocolError::Malformed(name))
        };
        let text = |name| std::str::from_utf8(body).map(str::to_owned).map_err(|_| ProtocolError::Malformed(name));
        match ty {
            T_OPEN => {
                let flow = u64_at(0, "open")?;
                let order = body.get(8..12).ok_or(ProtocolError::Malformed("open"))?;
                let order = u32::from_be_bytes([order[0], order[1], order[2], order[3]]);
                let seq = u64_at(12, "open")?;
                let codec = match body.get(20) {
                    Some(0) => false,
                    Some(1) => true,
                    _ => return Err(ProtocolError::Malformed("open")),
                };
                let connect = std::str::from_utf8(&body[21..])
                    .ok()
                    .and_then(|s| s.parse().ok())
                    .ok_or(ProtocolError::Malformed("open"))?;
                Ok(Self::Open { flow, order, seq, codec, connect })
            }
            T_OPENED if body.is_empty() => Ok(Self::Opened),
            T_OPENED => Err(ProtocolError::Malformed("opened")),
            T_REFUSED => Ok(Self::Refused(text("refused")?)),
            T_FIN if body.len() == FIN_BODY => Ok(Self::Fin {
                length: WireOffset::new(u64_at(0, "fin")?),
                digest: blake3::Hash::from_bytes(digest_of(&body[8..]).0),
            }),
            T_FIN => Err(ProtocolError::Malformed("fin")),
            T_RESET => Ok(Self::Reset(text("reset")?)),
            T_ACK if body.len() == 16 => Ok(Self::Ack {
                delivered: WireOffset::new(u64_at(0, "ack")?),
                limit: WireOffset::new(u64_at(8, "ack")?),
            }),
            T_ACK => Err(ProtocolError::Malformed("ack")),
            T_NEED if !body.is_empty() && body.len().is_multiple_of(32) && body.len() <= MAX_NEED_DIGESTS * 32 => {
                let digests = body.chunks_exact(32).map(digest_of).collect();
                Ok(Self::Need { digests })
            }
            T_NEED => Err(ProtocolError::Malformed("need")),
            T_SUPPLY if body.len() == SUPPLY_BODY => {
                Ok(Self::Supply { digest: digest_of(&body[..32]), page: Bytes::copy_from_slice(&body[32..]) })
            }
            T_SUPPLY => Err(ProtocolError::Malformed("supply")),
            other => Err(ProtocolError::UnknownMessage(other)),
        }
    }
}

/// A digest from exactly 32 bytes (callers slice them so).
fn digest_of(b: &[u8]) -> PageDigest {
    let mut d = [0u8; 32];
    d.copy_from_slice(b);
    PageDigest(d)
}

/// Keeps reasons within one message.
fn truncate(reason: &str) -> &str {
    let mut end = reason.len().min(MAX_MESSAGE);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    &reason[..end]
}

/// Preamble of a control stream: magic + version.
pub fn control_preamble() -> [u8; 5] {
    let mut p = [0; 5];
    p[..4].copy_from_slice(&CONTROL_MAGIC);
    p[4] = VERSION;
    p
}

/// Checks a stream preamble (magic + version).
pub fn check_preamble(preamble: [u8; 5], magic: [u8; 4]) -> Result<(), ProtocolError> {
    let got: [u8; 4] = [preamble[0], preamble[1], preamble[2], preamble[3]];
    if got != magic {
        return Err(ProtocolError::BadMagic(got));
    }
    if preamble[4] != VERSION {
        return Err(ProtocolError::Version(preamble[4]));
    }
    Ok(())
}

/// What a unidirectional stream carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LaneKind {
    /// Chunks of a flow direction.
    Data,
    /// The page-cache advertisement for a codec flow.
    Advert,
}

/// First bytes of a lane: what it carries and which flow it belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LaneHeader {
    /// Data or advertisement.
    pub kind: LaneKind,
    /// True if the lane's sender opened the flow (so the receiver sees it as remotely opened).
    pub sender_opened_flow: bool,
    /// The opener's flow number.
    pub flow: u64,
}

impl LaneHeader {
    /// Encoded length.
    pub const LEN: usize = 14;

    /// Encodes magic, version, opener flag and flow number.
    pub fn encode(&self) -> [u8; Self::LEN] {
        let mut b = [0; Self::LEN];
        b[..4].copy_from_slice(match self.kind {
            LaneKind::Data => &LANE_MAGIC,
            LaneKind::Advert => &ADVERT_MAGIC,
        });
        b[4] = VERSION;
        b[5] = u8::from(self.sender_opened_flow);
        b[6..].copy_from_slice(&self.flow.to_be_bytes());
        b
    }

    /// Decodes a lane header.
    pub fn decode(b: [u8; Self::LEN]) -> Result<Self, ProtocolError> {
        let preamble = [b[0], b[1], b[2], b[3], b[4]];
        let kind = if check_preamble(preamble, ADVERT_MAGIC).is_ok() {
            LaneKind::Advert
        } else {
            check_preamble(preamble, LANE_MAGIC)?;
            LaneKind::Data
        };
        let sender_opened_flow = match b[5] {
            0 => false,
            1 => true,
            _ => return Err(ProtocolError::Malformed("lane header")),
        };
        let mut flow = [0; 8];
        flow.copy_from_slice(&b[6..]);
        Ok(Self { kind, sender_opened_flow, flow: u64::from_be_bytes(flow) })
    }

    /// The flow this lane belongs to, seen from the receiving gateway.
    pub fn flow_key_at_receiver(&self) -> FlowKey {
        FlowKey { opened_locally: !self.sender_opened_flow, id: self.flow }
    }
}

/// Header of a data record on a lane: where its payload sits in the flow's direction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkHeader {
    /// Offset of the payload's first byte in the flow direction's wire stream.
    pub offset: WireOffset,
    /// Payload length (1..=[`MAX_CHUNK`]).
    pub len: u32,
}

impl ChunkHeader {
    /// Encoded length.
    pub const LEN: usize = 12;

    /// Encodes offset and length.
    pub fn encode(&self) -> [u8; Self::LEN] {
        let mut b = [0; Self::LEN];
        b[..8].copy_from_slice(&self.offset.get().to_be_bytes());
        b[8..].copy_from_slice(&self.len.to_be_bytes());
        b
    }

    /// Decodes and bounds-checks a chunk header.
    pub fn decode(b: [u8; Self::LEN]) -> Result<Self, ProtocolError> {
        let mut offset = [0; 8];
        offset.copy_from_slice(&b[..8]);
        let len = u32::from_be_bytes([b[8], b[9], b[10], b[11]]);
        if len == 0 || len > MAX_CHUNK {
            return Err(ProtocolError::TooLong { what: "chunk", len: len as u64, max: MAX_CHUNK as u64 });
        }
        let offset = u64::from_be_bytes(offset);
        if offset.checked_add(len as u64).is_none() {
            return Err(ProtocolError::Malformed("chunk offset"));
        }
        Ok(Self { offset: WireOffset::new(offset), len })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(msg: Message) {
        let mut buf = Vec::new();
        msg.encode(&mut buf);
        let (ty, len) = Message::decode_header([buf[0], buf[1], buf[2]]).unwrap();
        assert_eq!(len, buf.len() - MESSAGE_HEADER_LEN);
        assert_eq!(Message::decode_body(ty, &buf[MESSAGE_HEADER_LEN..]).unwrap(), msg);
    }

    #[test]
    fn messages_round_trip() {
        round_trip(Message::Open { flow: 7, order: 2, seq: 9, codec: true, connect: "10.0.0.1:4444".parse().unwrap() });
        round_trip(Message::Open { flow: 1, order: 0, seq: 0, codec: false, connect: "[::1]:80".parse().unwrap() });
        round_trip(Message::Opened);
        round_trip(Message::Refused("connection refused".into()));
        round_trip(Message::Fin { length: WireOffset::new(1 << 40), digest: blake3::hash(b"stream") });
        let mut fin = Vec::new();
        Message::Fin { length: WireOffset::ZERO, digest: blake3::hash(b"") }.encode(&mut fin);
        assert_eq!(fin.len(), FIN_MESSAGE_LEN);
        // A version 1 Fin (length only) is malformed in version 2.
        assert_eq!(Message::decode_body(T_FIN, &fin[MESSAGE_HEADER_LEN..MESSAGE_HEADER_LEN + 8]), Err(ProtocolError::Malformed("fin")));
        round_trip(Message::Reset("peer reset".into()));
        round_trip(Message::Ack { delivered: WireOffset::new(12345), limit: WireOffset::new(1 << 33) });
        let digests: Vec<PageDigest> = (0..MAX_NEED_DIGESTS as u32).map(|i| PageDigest::of(&i.to_le_bytes())).collect();
        round_trip(Message::Need { digests: digests[..1].to_vec() });
        round_trip(Message::Need { digests: digests.clone() });
        let page = Bytes::from(vec![7u8; PAGE_SIZE]);
        round_trip(Message::Supply { digest: PageDigest::of(&page), page });
    }

    #[test]
    fn needs_are_split_to_fit_a_message() {
        let digests: Vec<PageDigest> = (0..300u32).map(|i| PageDigest::of(&i.to_le_bytes())).collect();
        let msgs: Vec<Message> = Message::needs(&digests).collect();
        assert_eq!(msgs.len(), 3);
        let mut again = Vec::new();
        for m in msgs {
            let mut buf = Vec::new();
            m.encode(&mut buf);
            let (ty, len) = Message::decode_header([buf[0], buf[1], buf[2]]).unwrap();
            assert!(len <= MAX_MESSAGE);
            match Message::decode_body(ty, &buf[MESSAGE_HEADER_LEN..]).unwrap() {
                Message::Need { digests } => again.extend(digests),
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(again, digests);
    }

    #[test]
    fn need_and_supply_bounds() {
        assert_eq!(Message::decode_body(T_NEED, &[]), Err(ProtocolError::Malformed("need")));
        assert_eq!(Message::decode_body(T_NEED, &[0; 33]), Err(ProtocolError::Malformed("need")));
        assert!(Message::decode_body(T_NEED, &[0; 32 * (MAX_NEED_DIGESTS + 1)]).is_err());
        assert_eq!(Message::decode_body(T_SUPPLY, &[0; SUPPLY_BODY - 1]), Err(ProtocolError::Malformed("supply")));
        assert_eq!(Message::decode_body(T_SUPPLY, &[0; 32]), Err(ProtocolError::Malformed("supply")));
        // Only a supply may exceed MAX_MESSAGE, and only by its fixed size.
        let len = (SUPPLY_BODY as u16).to_be_bytes();
        assert_eq!(Message::decode_header([T_SUPPLY, len[0], len[1]]), Ok((T_SUPPLY, SUPPLY_BODY)));
        assert!(Message::decode_header([T_NEED, len[0], len[1]]).is_err());
        let len = (SUPPLY_BODY as u16 + 1).to_be_bytes();
        assert!(Message::decode_header([T_SUPPLY, len[0], len[1]]).is_err());
    }

    #[test]
    fn rejects_bad_input() {
        assert_eq!(Message::decode_body(99, &[]), Err(ProtocolError::UnknownMessage(99)));
        assert!(Message::decode_body(T_FIN, &[1, 2, 3]).is_err());
        assert!(Message::decode_body(T_OPEN, &[0; 20]).is_err());
        assert!(Message::decode_body(T_OPEN, &[2; 30]).is_err());
        assert!(Message::decode_body(T_OPEN, &[0; 5]).is_err());
        assert!(Message::decode_body(T_REFUSED, &[0xff, 0xfe]).is_err());
        assert!(Message::decode_header([1, 0xff, 0xff]).is_err());
        assert!(ChunkHeader::decode(ChunkHeader { offset: WireOffset::ZERO, len: 0 }.encode()).is_err());
        assert!(ChunkHeader::decode(ChunkHeader { offset: WireOffset::ZERO, len: MAX_CHUNK + 1 }.encode()).is_err());
        assert!(ChunkHeader::decode(ChunkHeader { offset: WireOffset::new(u64::MAX), len: 2 }.encode()).is_err());
        let advert = LaneHeader { kind: LaneKind::Advert, sender_opened_flow: false, flow: 4 };
        assert_eq!(LaneHeader::decode(advert.encode()).unwrap(), advert);
        let mut lane = LaneHeader { kind: LaneKind::Data, sender_opened_flow: true, flow: 3 }.encode();
        assert_eq!(LaneHeader::decode(lane).unwrap().flow_key_at_receiver(), FlowKey { opened_locally: false, id: 3 });
        lane[4] = 9;
        assert_eq!(LaneHeader::decode(lane), Err(ProtocolError::Version(9)));
        lane[0] = b'X';
        assert!(matches!(LaneHeader::decode(lane), Err(ProtocolError::BadMagic(_))));
    }

    #[test]
    fn long_reason_is_truncated_on_a_char_boundary() {
        let reason = "é".repeat(MAX_MESSAGE);
        let mut buf = Vec::new();
        Message::Reset(reason).encode(&mut buf);
        let (ty, len) = Message::decode_header([buf[0], buf[1], buf[2]]).unwrap();
        assert!(len <= MAX_MESSAGE);
        assert!(Message::decode_body(ty, &buf[3..]).is_ok());
    }
}
