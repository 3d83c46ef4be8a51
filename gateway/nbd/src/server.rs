//! The server role, sans-IO: what QEMU's NBD client (the mirror job, `qemu-img`, `qemu-io`)
//! talks to.
//!
//! The handshake is answered here from the [`ServerConfig`] (one export); the application sees
//! only [`ServerEvent`]s: `Ready`, then validated [`Request`]s (in range, allowed on this export;
//! invalid ones are answered with an error reply here and never surface), then `Disconnect`.
//! It answers each request with one `reply_*` call, in any order.

use std::collections::{HashMap, VecDeque};

use crate::wire::*;
use crate::{check_name, errno, BlockSize, CommandFlags, Cookie, Error, Extent, Limits};

/// The one export a [`Server`] offers.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// Export name clients must ask for (`nbd+unix:///NAME?socket=...`); the empty name is
    /// the default export and matches only when this is empty too.
    pub export_name: String,
    /// Export size in bytes.
    pub size: u64,
    /// Refuse writes, write-zeroes and trims (with `EPERM`).
    pub read_only: bool,
    /// Block size constraints sent in `NBD_INFO_BLOCK_SIZE`.
    pub block_size: BlockSize,
    /// Hard limits.
    pub limits: Limits,
}

impl ServerConfig {
    /// A writable export with QEMU's block sizes (1, 4096, the payload limit) and default limits.
    pub fn new(export_name: &str, size: u64) -> Self {
        let limits = Limits::default();
        let block_size = BlockSize { minimum: 1, preferred: 4096, maximum: limits.max_payload };
        Self { export_name: export_name.to_owned(), size, read_only: false, block_size, limits }
    }

    fn transmission_flags(&self) -> u16 {
        let mut flags = TFLAG_HAS_FLAGS | TFLAG_SEND_FLUSH | TFLAG_SEND_FUA;
        if self.read_only {
            flags |= TFLAG_READ_ONLY;
        } else {
            flags |= TFLAG_SEND_TRIM | TFLAG_SEND_WRITE_ZEROES;
        }
        flags
    }
}

/// What the server core tells its application.
#[derive(Debug, PartialEq, Eq)]
pub enum ServerEvent {
    /// The handshake ended; requests follow.
    Ready {
        /// Whether structured replies were negotiated.
        structured_replies: bool,
        /// Whether `base:allocation` was selected (block status requests are allowed).
        block_status: bool,
    },
    /// A valid request to answer with one `reply_*` call.
    Request(Request),
    /// The client sent `NBD_CMD_DISC`: send what is queued, then close.
    Disconnect,
    /// The client ended the handshake with `NBD_OPT_ABORT`: send what is queued, then close.
    Aborted,
}

/// A validated transmission request.
#[derive(Debug, PartialEq, Eq)]
pub struct Request {
    /// Echo this in the reply.
    pub cookie: Cookie,
    /// Command flags (`FUA`, `NO_HOLE`, ...).
    pub flags: CommandFlags,
    /// What to do.
    pub kind: RequestKind,
}

/// The commands a [`Server`] passes on; all are within the export.
#[derive(Debug, PartialEq, Eq)]
pub enum RequestKind {
    /// Read `length` bytes at `offset`; answer with [`Server::reply_read`].
    Read {
        /// Offset.
        offset: u64,
        /// Length (at most the payload limit).
        length: u32,
    },
    /// Write `data` at `offset`; answer with [`Server::reply_ok`].
    Write {
        /// Offset.
        offset: u64,
        /// Payload (at most the payload limit).
        data: Vec<u8>,
    },
    /// Write zeroes; `NO_HOLE` in the flags forbids punching a hole.
    WriteZeroes {
        /// Offset.
        offset: u64,
        /// Length.
        length: u32,
    },
    /// Discard (advisory: reads may return old data or zeroes after it).
    Trim {
        /// Offset.
        offset: u64,
        /// Length.
        length: u32,
    },
    /// Make every completed write durable.
    Flush,
    /// Allocation status (`base:allocation`); answer with [`Server::reply_block_status`].
    BlockStatus {
        /// Offset.
        offset: u64,
        /// Length (non-zero).
        length: u32,
    },
}

/// One piece of a read reply.
#[derive(Clone, Copy, Debug)]
pub enum ReadChunk<'a> {
    /// Data at an absolute offset.
    Data {
        /// Offset of `data`'s first byte.
        offset: u64,
        /// The bytes.
        data: &'a [u8],
    },
    /// Zeroes at an absolute offset (sent as `OFFSET_HOLE` with structured replies).
    Hole {
        /// Offset.
        offset: u64,
        /// Length.
        length: u32,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    ClientFlags,
    OptionHeader,
    OptionData { option: u32 },
    RequestHeader,
    WritePayload { header: RequestHeader },
    Closed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct RequestHeader {
    flags: u16,
    command: u16,
    cookie: Cookie,
    offset: u64,
    length: u32,
}

#[derive(Debug, Clone, Copy)]
struct InFlight {
    command: u16,
    offset: u64,
    length: u32,
}

/// The metadata context id we give `base:allocation`.
const BASE_ALLOCATION_ID: u32 = 1;

/// The server role's state machine.
#[derive(Debug)]
pub struct Server {
    config: ServerConfig,
    reader: FrameReader,
    state: State,
    out: Vec<u8>,
    events: VecDeque<ServerEvent>,
    no_zeroes: bool,
    structured: bool,
    block_status: bool,
    in_flight: HashMap<Cookie, InFlight>,
    error: Option<Error>,
}

impl Server {
    /// A server for `config`; its greeting is queued for [`Server::poll_transmit`].
    pub fn new(config: ServerConfig) -> Self {
        let mut out = Vec::with_capacity(GREETING_LEN);
        put_u64(&mut out, NBD_MAGIC);
        put_u64(&mut out, IHAVEOPT);
        put_u16(&mut out, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
        let mut reader = FrameReader::default();
        reader.expect(4);
        Self {
            config,
            reader,
            state: State::ClientFlags,
            out,
            events: VecDeque::new(),
            no_zeroes: false,
            structured: false,
            block_status: false,
            in_flight: HashMap::new(),
            error: None,
        }
    }

    /// Takes bytes from the client; returns how many were used. Takes nothing while an event
    /// waits in [`Server::poll_event`] or while `max_in_flight` requests are unanswered, so the
    /// caller keeps the rest and offers it again. An error is final.
    pub fn handle_input(&mut self, input: &[u8]) -> Result<usize, Error> {
        if let Some(error) = &self.error {
            return Err(error.clone());
        }
        let mut used = 0;
        while self.events.is_empty() && self.in_flight.len() < self.config.limits.max_in_flight && self.state != State::Closed {
            used += self.reader.fill(&input[used..]);
            if !self.reader.complete() {
                break;
            }
            let frame = self.reader.take();
            if let Err(error) = self.on_frame(frame) {
                self.state = State::Closed;
                self.error = Some(error.clone());
                return Err(error);
            }
        }
        Ok(used)
    }

    /// The next event, if any.
    pub fn poll_event(&mut self) -> Option<ServerEvent> {
        self.events.pop_front()
    }

    /// Bytes to send to the client, if any.
    pub fn poll_transmit(&mut self) -> Option<Vec<u8>> {
        (!self.out.is_empty()).then(|| std::mem::take(&mut self.out))
    }

    /// Whether the connection is over (after `Disconnect`, `Aborted` or an error): send what
    /// [`Server::poll_transmit`] still gives, then close.
    pub fn is_closed(&self) -> bool {
        self.state == State::Closed
    }

    /// Requests handed out and not answered yet.
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// Answers a write, write-zeroes, trim or flush: success.
    pub fn reply_ok(&mut self, cookie: Cookie) -> Result<(), Error> {
        let request = self.take_in_flight(cookie)?;
        if matches!(request.command, CMD_READ | CMD_BLOCK_STATUS) {
            return Err(Error::Usage("reply_ok answers only writes, write-zeroes, trims and flushes"));
        }
        self.simple_reply(cookie, 0);
        Ok(())
    }

    /// Answers a request with an error (`errno::*`), any command. With structured replies the
    /// message travels too (cut to the name limit).
    pub fn reply_error(&mut self, cookie: Cookie, errno: u32, message: &str) -> Result<(), Error> {
        let request = self.take_in_flight(cookie)?;
        self.error_reply(cookie, request.command, errno, message);
        Ok(())
    }

    /// Answers a read with `chunks`, which must lie within the request (parts not covered read
    /// as zeroes with simple replies, and are the application's to cover with structured ones).
    pub fn reply_read(&mut self, cookie: Cookie, chunks: &[ReadChunk<'_>]) -> Result<(), Error> {
        let request = *self.in_flight.get(&cookie).ok_or(Error::UnknownCookie(cookie))?;
        if request.command != CMD_READ {
            return Err(Error::Usage("reply_read answers only reads"));
        }
        let end = request.offset + u64::from(request.length);
        let inside = |offset: u64, len: u64| offset >= request.offset && offset.checked_add(len).is_some_and(|e| e <= end);
        for chunk in chunks {
            let ok = match *chunk {
                ReadChunk::Data { offset, data } => inside(offset, data.len() as u64),
                ReadChunk::Hole { offset, length } => inside(offset, length.into()),
            };
            if !ok {
                return Err(Error::Usage("a read reply chunk lies outside its request"));
            }
        }
        self.in_flight.remove(&cookie);
        if !self.structured {
            let mut data = vec![0u8; request.length as usize];
            for chunk in chunks {
                if let ReadChunk::Data { offset, data: bytes } = *chunk {
                    let at = (offset - request.offset) as usize;
                    data[at..at + bytes.len()].copy_from_slice(bytes);
                }
            }
            self.simple_reply(cookie, 0);
            self.out.extend_from_slice(&data);
            return Ok(());
        }
        if chunks.is_empty() {
            self.chunk_header(CHUNK_FLAG_DONE, CHUNK_NONE, cookie, 0);
        }
        for (i, chunk) in chunks.iter().enumerate() {
            let flags = if i + 1 == chunks.len() { CHUNK_FLAG_DONE } else { 0 };
            match *chunk {
                ReadChunk::Data { offset, data } => {
                    self.chunk_header(flags, CHUNK_OFFSET_DATA, cookie, 8 + len32(data.len()));
                    put_u64(&mut self.out, offset);
                    self.out.extend_from_slice(data);
                }
                ReadChunk::Hole { offset, length } => {
                    self.chunk_header(flags, CHUNK_OFFSET_HOLE, cookie, 12);
                    put_u64(&mut self.out, offset);
                    put_u32(&mut self.out, length);
                }
            }
        }
        Ok(())
    }

    /// Answers a block status request with `base:allocation` extents from the request's offset.
    pub fn reply_block_status(&mut self, cookie: Cookie, extents: &[Extent]) -> Result<(), Error> {
        let request = *self.in_flight.get(&cookie).ok_or(Error::UnknownCookie(cookie))?;
        if request.command != CMD_BLOCK_STATUS {
            return Err(Error::Usage("reply_block_status answers only block status requests"));
        }
        if extents.is_empty() || extents.len() as u64 * 8 + 4 > u64::from(self.config.limits.max_payload) {
            return Err(Error::Usage("a block status reply needs 1 to max_payload/8 extents"));
        }
        self.in_flight.remove(&cookie);
        self.chunk_header(CHUNK_FLAG_DONE, CHUNK_BLOCK_STATUS, cookie, 4 + 8 * len32(extents.len()));
        put_u32(&mut self.out, BASE_ALLOCATION_ID);
        for extent in extents {
            put_u32(&mut self.out, extent.length);
            put_u32(&mut self.out, extent.flags);
        }
        Ok(())
    }

    fn take_in_flight(&mut self, cookie: Cookie) -> Result<InFlight, Error> {
        self.in_flight.remove(&cookie).ok_or(Error::UnknownCookie(cookie))
    }

    fn on_frame(&mut self, frame: Vec<u8>) -> Result<(), Error> {
        let mut c = Cursor::new(&frame);
        match self.state {
            State::ClientFlags => {
                let flags = c.u32().ok_or(Error::Malformed { what: "client flags" })?;
                if flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
                    return Err(Error::UnknownClientFlags(flags));
                }
                if flags & FLAG_C_FIXED_NEWSTYLE == 0 {
                    return Err(Error::Malformed { what: "client flags (no fixed newstyle)" });
                }
                self.no_zeroes = flags & FLAG_C_NO_ZEROES != 0;
                self.expect(State::OptionHeader, OPTION_HEADER_LEN);
            }
            State::OptionHeader => {
                let magic = c.u64().ok_or(Error::Malformed { what: "option header" })?;
                if magic != IHAVEOPT {
                    return Err(Error::BadMagic { what: "option", found: magic });
                }
                let option = c.u32().ok_or(Error::Malformed { what: "option header" })?;
                let len = c.u32().ok_or(Error::Malformed { what: "option header" })?;
                if len > self.config.limits.max_option {
                    return Err(Error::TooLong { what: "option", len: len.into(), max: self.config.limits.max_option.into() });
                }
                self.expect(State::OptionData { option }, len as usize);
            }
            State::OptionData { option } => {
                self.expect(State::OptionHeader, OPTION_HEADER_LEN);
                self.handle_option(option, &frame)?;
            }
            State::RequestHeader => {
                let header = parse_request_header(&mut c)?;
                if header.command == CMD_WRITE {
                    let max = self.config.limits.max_payload;
                    if header.length > max {
                        return Err(Error::TooLong { what: "write payload", len: header.length.into(), max: max.into() });
                    }
                    self.expect(State::WritePayload { header }, header.length as usize);
                } else {
                    self.expect(State::RequestHeader, REQUEST_HEADER_LEN);
                    self.handle_request(header, Vec::new())?;
                }
            }
            State::WritePayload { header } => {
                self.expect(State::RequestHeader, REQUEST_HEADER_LEN);
                self.handle_request(header, frame)?;
            }
            State::Closed => {}
        }
        Ok(())
    }

    fn expect(&mut self, state: State, len: usize) {
        self.state = state;
        self.reader.expect(len);
    }

    fn handle_option(&mut self, option: u32, data: &[u8]) -> Result<(), Error> {
        match option {
            OPT_EXPORT_NAME => {
                check_name(len32(data.len()), &self.config.limits, "export name")?;
                if data != self.config.export_name.as_bytes() {
                    return Err(Error::UnknownExport(String::from_utf8_lossy(data).into_owned()));
                }
                put_u64(&mut self.out, self.config.size);
                put_u16(&mut self.out, self.config.transmission_flags());
                if !self.no_zeroes {
                    self.out.extend_from_slice(&[0u8; 124]);
                }
                self.enter_transmission();
            }
            OPT_ABORT => {
                self.option_reply(option, REP_ACK, &[]);
                self.state = State::Closed;
                self.events.push_back(ServerEvent::Aborted);
            }
            OPT_LIST => {
                if !data.is_empty() {
                    self.option_error(option, REP_ERR_INVALID, "NBD_OPT_LIST takes no data");
                    return Ok(());
                }
                let name = self.config.export_name.clone().into_bytes();
                let mut reply = Vec::with_capacity(4 + name.len());
                put_u32(&mut reply, len32(name.len()));
                reply.extend_from_slice(&name);
                self.option_reply(option, REP_SERVER, &reply);
                self.option_reply(option, REP_ACK, &[]);
            }
            OPT_INFO | OPT_GO => match parse_info_request(data, &self.config.limits) {
                Err(message) => self.option_error(option, REP_ERR_INVALID, message),
                Ok(name) if name != self.config.export_name.as_bytes() => self.option_error(option, REP_ERR_UNKNOWN, "no such export"),
                Ok(_) => {
                    let mut info = Vec::with_capacity(14);
                    put_u16(&mut info, INFO_EXPORT);
                    put_u64(&mut info, self.config.size);
                    put_u16(&mut info, self.config.transmission_flags());
                    self.option_reply(option, REP_INFO, &info);
                    // Sent whether asked for or not, as QEMU's server does: it tells the client
                    // our payload limit.
                    let bs = self.config.block_size;
                    let mut info = Vec::with_capacity(14);
                    put_u16(&mut info, INFO_BLOCK_SIZE);
                    put_u32(&mut info, bs.minimum);
                    put_u32(&mut info, bs.preferred);
                    put_u32(&mut info, bs.maximum);
                    self.option_reply(option, REP_INFO, &info);
                    self.option_reply(option, REP_ACK, &[]);
                    if option == OPT_GO {
                        self.enter_transmission();
                    }
                }
            },
            OPT_STRUCTURED_REPLY => {
                if !data.is_empty() {
                    self.option_error(option, REP_ERR_INVALID, "NBD_OPT_STRUCTURED_REPLY takes no data");
                } else if self.structured {
                    self.option_error(option, REP_ERR_INVALID, "structured replies already negotiated");
                } else {
                    self.structured = true;
                    self.option_reply(option, REP_ACK, &[]);
                }
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                if !self.structured {
                    self.option_error(option, REP_ERR_INVALID, "metadata contexts need structured replies");
                    return Ok(());
                }
                let (name, queries) = match parse_meta_request(data, &self.config.limits) {
                    Err(message) => {
                        self.option_error(option, REP_ERR_INVALID, message);
                        return Ok(());
                    }
                    Ok(parsed) => parsed,
                };
                if name != self.config.export_name.as_bytes() {
                    self.option_error(option, REP_ERR_UNKNOWN, "no such export");
                    return Ok(());
                }
                let matches = if option == OPT_SET_META_CONTEXT {
                    queries.iter().any(|q| *q == BASE_ALLOCATION.as_bytes())
                } else {
                    queries.is_empty() || queries.iter().any(|q| *q == b"base:" || *q == BASE_ALLOCATION.as_bytes())
                };
                if option == OPT_SET_META_CONTEXT {
                    self.block_status = matches;
                }
                if matches {
                    let mut reply = Vec::with_capacity(4 + BASE_ALLOCATION.len());
                    put_u32(&mut reply, if option == OPT_SET_META_CONTEXT { BASE_ALLOCATION_ID } else { 0 });
                    reply.extend_from_slice(BASE_ALLOCATION.as_bytes());
                    self.option_reply(option, REP_META_CONTEXT, &reply);
                }
                self.option_reply(option, REP_ACK, &[]);
            }
            _ => self.option_error(option, REP_ERR_UNSUP, "option not supported"),
        }
        Ok(())
    }

    fn enter_transmission(&mut self) {
        self.expect(State::RequestHeader, REQUEST_HEADER_LEN);
        self.events.push_back(ServerEvent::Ready { structured_replies: self.structured, block_status: self.block_status });
    }

    fn handle_request(&mut self, h: RequestHeader, data: Vec<u8>) -> Result<(), Error> {
        if self.in_flight.contains_key(&h.cookie) {
            return Err(Error::Malformed { what: "request (cookie already in flight)" });
        }
        let size = self.config.size;
        let inside = h.offset.checked_add(h.length.into()).is_some_and(|end| end <= size);
        let writes = matches!(h.command, CMD_WRITE | CMD_WRITE_ZEROES | CMD_TRIM);
        let refusal = match h.command {
            CMD_DISC => {
                self.state = State::Closed;
                self.events.push_back(ServerEvent::Disconnect);
                return Ok(());
            }
            _ if writes && self.config.read_only => Some((errno::EPERM, "read-only export")),
            _ if writes && !inside => Some((errno::ENOSPC, "request past the end of the export")),
            CMD_READ if h.length > self.config.limits.max_payload => Some((errno::EINVAL, "read longer than the payload limit")),
            CMD_READ if !inside => Some((errno::EINVAL, "read past the end of the export")),
            CMD_BLOCK_STATUS if !self.block_status => Some((errno::EINVAL, "base:allocation was not negotiated")),
            CMD_BLOCK_STATUS if h.length == 0 || !inside => Some((errno::EINVAL, "block status request out of range")),
            CMD_READ | CMD_WRITE | CMD_WRITE_ZEROES | CMD_TRIM | CMD_FLUSH | CMD_BLOCK_STATUS => None,
            _ => Some((errno::EINVAL, "unsupported command")),
        };
        if let Some((code, message)) = refusal {
            self.error_reply(h.cookie, h.command, code, message);
            return Ok(());
        }
        let (offset, length) = (h.offset, h.length);
        let kind = match h.command {
            CMD_READ => RequestKind::Read { offset, length },
            CMD_WRITE => RequestKind::Write { offset, data },
            CMD_WRITE_ZEROES => RequestKind::WriteZeroes { offset, length },
            CMD_TRIM => RequestKind::Trim { offset, length },
            CMD_FLUSH => RequestKind::Flush,
            _ => RequestKind::BlockStatus { offset, length },
        };
        self.in_flight.insert(h.cookie, InFlight { command: h.command, offset, length });
        self.events.push_back(ServerEvent::Request(Request { cookie: h.cookie, flags: CommandFlags(h.flags), kind }));
        Ok(())
    }

    fn option_reply(&mut self, option: u32, reply: u32, data: &[u8]) {
        put_u64(&mut self.out, OPTION_REPLY_MAGIC);
        put_u32(&mut self.out, option);
        put_u32(&mut self.out, reply);
        put_u32(&mut self.out, len32(data.len()));
        self.out.extend_from_slice(data);
    }

    fn option_error(&mut self, option: u32, reply: u32, message: &str) {
        self.option_reply(option, reply, message.as_bytes());
    }

    fn simple_reply(&mut self, cookie: Cookie, errno: u32) {
        put_u32(&mut self.out, SIMPLE_REPLY_MAGIC);
        put_u32(&mut self.out, errno);
        put_u64(&mut self.out, cookie);
    }

    fn chunk_header(&mut self, flags: u16, chunk_type: u16, cookie: Cookie, len: u32) {
        put_u32(&mut self.out, STRUCTURED_REPLY_MAGIC);
        put_u16(&mut self.out, flags);
        put_u16(&mut self.out, chunk_type);
        put_u64(&mut self.out, cookie);
        put_u32(&mut self.out, len);
    }

    fn error_reply(&mut self, cookie: Cookie, command: u16, errno: u32, message: &str) {
        // Simple error replies are valid for every command when structured replies are off,
        // and for commands without a payload when they are on; reads and block status get a
        // structured error chunk then (as QEMU's server does).
        if !self.structured || !matches!(command, CMD_READ | CMD_BLOCK_STATUS) {
            self.simple_reply(cookie, errno);
            return;
        }
        let mut message = message.as_bytes();
        message = &message[..message.len().min(self.config.limits.max_name as usize).min(u16::MAX as usize)];
        self.chunk_header(CHUNK_FLAG_DONE, CHUNK_ERROR, cookie, 6 + len32(message.len()));
        put_u32(&mut self.out, errno);
        put_u16(&mut self.out, message.len() as u16);
        self.out.extend_from_slice(message);
    }
}

fn parse_request_header(c: &mut Cursor<'_>) -> Result<RequestHeader, Error> {
    let malformed = Error::Malformed { what: "request header" };
    let magic = c.u32().ok_or(malformed.clone())?;
    if magic != REQUEST_MAGIC {
        return Err(Error::BadMagic { what: "request", found: magic.into() });
    }
    Ok(RequestHeader {
        flags: c.u16().ok_or(malformed.clone())?,
        command: c.u16().ok_or(malformed.clone())?,
        cookie: c.u64().ok_or(malformed.clone())?,
        offset: c.u64().ok_or(malformed.clone())?,
        length: c.u32().ok_or(malformed)?,
    })
}

/// Reads a length-prefixed name (u32 length, bytes) bounded by the name limit.
fn take_name<'a>(c: &mut Cursor<'a>, limits: &Limits) -> Result<&'a [u8], &'static str> {
    let len = c.u32().ok_or("truncated name length")?;
    let len = check_name(len, limits, "name").map_err(|_| "name too long")?;
    c.take(len).ok_or("truncated name")
}

/// `NBD_OPT_INFO`/`NBD_OPT_GO` data: the export name (the info requests are ignored: we send
/// the export and block size information always).
fn parse_info_request<'a>(data: &'a [u8], limits: &Limits) -> Result<&'a [u8], &'static str> {
    let mut c = Cursor::new(data);
    let name = take_name(&mut c, limits)?;
    let count = c.u16().ok_or("truncated information request count")?;
    if c.remaining() != 2 * count as usize {
        return Err("information request count does not match the option length");
    }
    Ok(name)
}

/// `NBD_OPT_{LIST,SET}_META_CONTEXT` data: the export name and the queries.
fn parse_meta_request<'a>(data: &'a [u8], limits: &Limits) -> Result<(&'a [u8], Vec<&'a [u8]>), &'static str> {
    let mut c = Cursor::new(data);
    let name = take_name(&mut c, limits)?;
    let count = c.u32().ok_or("truncated query count")?;
    // Each query takes at least 4 bytes, so the data bounds the count before we trust it.
    if count as usize > c.remaining() / 4 {
        return Err("query count does not match the option length");
    }
    let mut queries = Vec::with_capacity(count as usize);
    for _ in 0..count {
        queries.push(take_name(&mut c, limits)?);
    }
    if c.remaining() != 0 {
        return Err("trailing bytes after the queries");
    }
    Ok((name, queries))
}

#[cfg(test)]
#[path = "server_tests.rs"]
mod tests;
