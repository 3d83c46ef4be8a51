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
//!   TCP EOF ───── control: Fin{length} ────────────────────▶ after `length` bytes: shutdown(WR)
//!              ◀─ control: Ack{delivered} (every few MiB) ─
//!   TCP error ─── control: Reset{reason} ──────────────────▶ abort TCP (RST)
//! ```
//!
//! Why lanes: quinn-proto (0.11.17+) closes a connection once a single stream's receive buffer
//! holds more than 1024 unmerged gaps, which one stream with a bandwidth-delay-product-sized window
//! reaches quickly on a lossy long path. Striping a flow over several streams, each with a window
//! far below that limit, keeps clear of it and gives each flow the whole path.
//!
//! Why offsets and acks: every chunk names its byte offset in the flow's direction, and the
//! receiver acknowledges what it has delivered to its TCP peer. That is what a later version
//! needs to resume a flow on a new QUIC connection: resend from the last acknowledged offset.
//!
//! Versioning: the control stream and every lane start with a magic and [`VERSION`]; a peer
//! refuses a version it does not speak. The ALPN (`ferry/1`) changes with incompatible versions.

use std::net::SocketAddr;

/// Protocol version carried in every stream preamble.
pub const VERSION: u8 = 1;
/// First bytes of a control stream.
pub const CONTROL_MAGIC: [u8; 4] = *b"FRYC";
/// First bytes of a data lane.
pub const LANE_MAGIC: [u8; 4] = *b"FRYL";
/// First bytes of an advertisement lane: the sending gateway's page-cache advertisement (one u32
/// length + the encoded `codec::Advertisement`), for the whole connection ([`CONNECTION_FLOW`]).
pub const ADVERT_MAGIC: [u8; 4] = *b"FRYP";
/// Flow number of lanes that belong to the connection rather than to a flow.
pub const CONNECTION_FLOW: u64 = u64::MAX;
/// Largest advertisement accepted (16 bytes per advertised page: 4 M pages = 16 GiB of cache).
pub const MAX_ADVERT: u32 = 64 << 20;
/// Largest chunk payload a sender may put in one record; larger values are refused as corrupt.
pub const MAX_CHUNK: u32 = 1 << 20;
/// Largest control message body.
pub const MAX_MESSAGE: usize = 4096;

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
        length: u64,
    },
    /// The sender's side of the flow failed; abort.
    Reset(String),
    /// The sender has delivered this many bytes of the receiver's direction to its TCP peer.
    Ack {
        /// Bytes delivered.
        delivered: u64,
    },
}

const T_OPEN: u8 = 1;
const T_OPENED: u8 = 2;
const T_REFUSED: u8 = 3;
const T_FIN: u8 = 4;
const T_RESET: u8 = 5;
const T_ACK: u8 = 6;

/// Length of a message header: type (u8) + body length (u16, big-endian).
pub const MESSAGE_HEADER_LEN: usize = 3;

impl Message {
    /// Appends the encoded message (header + body) to `out`.
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
            Self::Fin { length } => {
                out.extend_from_slice(&length.to_be_bytes());
                T_FIN
            }
            Self::Reset(reason) => {
                out.extend_from_slice(truncate(reason).as_bytes());
                T_RESET
            }
            Self::Ack { delivered } => {
                out.extend_from_slice(&delivered.to_be_bytes());
                T_ACK
            }
        };
        let body_len = (out.len() - start - MESSAGE_HEADER_LEN) as u16;
        out[start] = ty;
        out[start + 1..start + 3].copy_from_slice(&body_len.to_be_bytes());
    }

    /// Parses a message header into (type, body length), checking the length bound.
    pub fn decode_header(header: [u8; MESSAGE_HEADER_LEN]) -> Result<(u8, usize), ProtocolError> {
        let len = u16::from_be_bytes([header[1], header[2]]) as usize;
        if len > MAX_MESSAGE {
            return Err(ProtocolError::TooLong { what: "control message", len: len as u64, max: MAX_MESSAGE as u64 });
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
            T_FIN if body.len() == 8 => Ok(Self::Fin { length: u64_at(0, "fin")? }),
            T_FIN => Err(ProtocolError::Malformed("fin")),
            T_RESET => Ok(Self::Reset(text("reset")?)),
            T_ACK if body.len() == 8 => Ok(Self::Ack { delivered: u64_at(0, "ack")? }),
            T_ACK => Err(ProtocolError::Malformed("ack")),
            other => Err(ProtocolError::UnknownMessage(other)),
        }
    }
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
    /// Byte offset of the payload's first byte.
    pub offset: u64,
    /// Payload length (1..=[`MAX_CHUNK`]).
    pub len: u32,
}

impl ChunkHeader {
    /// Encoded length.
    pub const LEN: usize = 12;

    /// Encodes offset and length.
    pub fn encode(&self) -> [u8; Self::LEN] {
        let mut b = [0; Self::LEN];
        b[..8].copy_from_slice(&self.offset.to_be_bytes());
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
        Ok(Self { offset, len })
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
        round_trip(Message::Fin { length: 1 << 40 });
        round_trip(Message::Reset("peer reset".into()));
        round_trip(Message::Ack { delivered: 12345 });
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
        assert!(ChunkHeader::decode(ChunkHeader { offset: 0, len: 0 }.encode()).is_err());
        assert!(ChunkHeader::decode(ChunkHeader { offset: 0, len: MAX_CHUNK + 1 }.encode()).is_err());
        assert!(ChunkHeader::decode(ChunkHeader { offset: u64::MAX, len: 2 }.encode()).is_err());
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
