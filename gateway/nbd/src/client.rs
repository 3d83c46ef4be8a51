//! The client role, sans-IO: what the destination gateway (and the replica reader) uses against
//! QEMU's `block-export-add` export or `qemu-nbd`.
//!
//! The handshake runs by itself: client flags, `NBD_OPT_STRUCTURED_REPLY` (if configured), then
//! `NBD_OPT_SET_META_CONTEXT base:allocation` (if configured and structured replies were
//! accepted), then `NBD_OPT_GO`; a refused `GO` is an error, the others only turn their feature
//! off. After [`ClientEvent::Ready`] the application queues requests (each returns its cookie)
//! and gets one [`ClientEvent::Reply`] per request, in whatever order the server answers.

use std::collections::{HashMap, VecDeque};

use crate::wire::*;
use crate::{check_name, errno, BlockSize, CommandFlags, Cookie, Error, ExportInfo, Extent, Limits};

/// What a [`Client`] negotiates.
#[derive(Clone, Debug)]
pub struct ClientConfig {
    /// Export to ask for.
    pub export_name: String,
    /// Ask for structured replies (needed for block status and sparse reads).
    pub structured_replies: bool,
    /// Ask for the `base:allocation` metadata context (block status).
    pub block_status: bool,
    /// Hard limits.
    pub limits: Limits,
}

impl ClientConfig {
    /// Structured replies and block status on, default limits.
    pub fn new(export_name: &str) -> Self {
        Self { export_name: export_name.to_owned(), structured_replies: true, block_status: true, limits: Limits::default() }
    }
}

/// What the client core tells its application.
#[derive(Debug, PartialEq, Eq)]
pub enum ClientEvent {
    /// The handshake ended; requests may be queued.
    Ready(ExportInfo),
    /// The complete answer to one request.
    Reply(Reply),
}

/// The answer to one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// The request's cookie.
    pub cookie: Cookie,
    /// Its outcome.
    pub result: Result<ReplyData, ReplyError>,
}

/// What a successful reply carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplyData {
    /// A write, write-zeroes, trim or flush completed.
    Done,
    /// A read's bytes (holes filled with zeroes), exactly the requested length.
    Read(Vec<u8>),
    /// `base:allocation` extents from the request's offset (they may end before or after the
    /// requested range).
    BlockStatus {
        /// The request's offset, where the first extent starts.
        offset: u64,
        /// The extents in order.
        extents: Vec<Extent>,
    },
}

/// An error the server reported for one request (the connection goes on).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("NBD error {errno}: {message}")]
pub struct ReplyError {
    /// The NBD errno (`errno::*`).
    pub errno: u32,
    /// The server's message (structured replies only; may be empty).
    pub message: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Greeting,
    OptionReplyHeader,
    OptionReplyData { reply: u32 },
    ReplyMagic,
    SimpleReply,
    SimpleReadData { cookie: Cookie },
    ChunkHeader,
    ChunkData { flags: u16, chunk_type: u16, cookie: Cookie },
    Closed,
}

#[derive(Debug)]
struct Pending {
    command: u16,
    offset: u64,
    length: u32,
    data: Vec<u8>,
    extents: Vec<Extent>,
    error: Option<ReplyError>,
}

/// The client role's state machine.
#[derive(Debug)]
pub struct Client {
    config: ClientConfig,
    reader: FrameReader,
    state: State,
    /// The option whose replies we are reading.
    option: u32,
    out: Vec<u8>,
    events: VecDeque<ClientEvent>,
    structured: bool,
    context: Option<u32>,
    export: Option<(u64, u16)>,
    block_size: Option<BlockSize>,
    info: Option<ExportInfo>,
    in_flight: HashMap<Cookie, Pending>,
    next_cookie: Cookie,
    error: Option<Error>,
}

impl Client {
    /// A client for `config`; it waits for the server's greeting.
    pub fn new(config: ClientConfig) -> Self {
        let mut reader = FrameReader::default();
        reader.expect(GREETING_LEN);
        Self {
            config,
            reader,
            state: State::Greeting,
            option: 0,
            out: Vec::new(),
            events: VecDeque::new(),
            structured: false,
            context: None,
            export: None,
            block_size: None,
            info: None,
            in_flight: HashMap::new(),
            next_cookie: 1,
            error: None,
        }
    }

    /// Takes bytes from the server; returns how many were used. Takes nothing while an event
    /// waits in [`Client::poll_event`]. An error is final.
    pub fn handle_input(&mut self, input: &[u8]) -> Result<usize, Error> {
        if let Some(error) = &self.error {
            return Err(error.clone());
        }
        let mut used = 0;
        while self.events.is_empty() && self.state != State::Closed {
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
    pub fn poll_event(&mut self) -> Option<ClientEvent> {
        self.events.pop_front()
    }

    /// Bytes to send to the server, if any.
    pub fn poll_transmit(&mut self) -> Option<Vec<u8>> {
        (!self.out.is_empty()).then(|| std::mem::take(&mut self.out))
    }

    /// The export, once the handshake ended.
    pub fn export(&self) -> Option<ExportInfo> {
        self.info
    }

    /// Whether block status requests are possible (`base:allocation` negotiated).
    pub fn has_block_status(&self) -> bool {
        self.context.is_some()
    }

    /// Whether structured replies were negotiated.
    pub fn has_structured_replies(&self) -> bool {
        self.structured
    }

    /// Requests sent and not answered yet.
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// Queues a read of `length` bytes at `offset`.
    pub fn read(&mut self, offset: u64, length: u32) -> Result<Cookie, Error> {
        self.check_payload(length)?;
        self.request(CMD_READ, CommandFlags::default(), offset, length, &[])
    }

    /// Queues a write of `data` at `offset` (`FUA` is the flag that makes sense here).
    pub fn write(&mut self, offset: u64, data: &[u8], flags: CommandFlags) -> Result<Cookie, Error> {
        let length = u32::try_from(data.len()).map_err(|_| Error::Usage("write longer than 4 GiB"))?;
        self.check_payload(length)?;
        self.check_writable()?;
        self.request(CMD_WRITE, flags, offset, length, data)
    }

    /// Queues a write of `length` zero bytes at `offset` (`NO_HOLE` keeps them allocated).
    pub fn write_zeroes(&mut self, offset: u64, length: u32, flags: CommandFlags) -> Result<Cookie, Error> {
        self.check_writable()?;
        self.request(CMD_WRITE_ZEROES, flags, offset, length, &[])
    }

    /// Queues a trim (discard) of `length` bytes at `offset`.
    pub fn trim(&mut self, offset: u64, length: u32) -> Result<Cookie, Error> {
        self.check_writable()?;
        self.request(CMD_TRIM, CommandFlags::default(), offset, length, &[])
    }

    /// Queues a flush.
    pub fn flush(&mut self) -> Result<Cookie, Error> {
        self.request(CMD_FLUSH, CommandFlags::default(), 0, 0, &[])
    }

    /// Queues a `base:allocation` block status request for `length` bytes at `offset`.
    pub fn block_status(&mut self, offset: u64, length: u32, flags: CommandFlags) -> Result<Cookie, Error> {
        if self.context.is_none() && self.info.is_some() {
            return Err(Error::Usage("base:allocation was not negotiated"));
        }
        if length == 0 {
            return Err(Error::Usage("block status of zero bytes"));
        }
        self.request(CMD_BLOCK_STATUS, flags, offset, length, &[])
    }

    /// Queues `NBD_CMD_DISC`; send what [`Client::poll_transmit`] gives, then close. Requests
    /// still in flight get no reply.
    pub fn disconnect(&mut self) -> Result<(), Error> {
        self.ready()?;
        self.put_request_header(CMD_DISC, CommandFlags::default(), 0, 0, 0);
        self.state = State::Closed;
        Ok(())
    }

    fn ready(&self) -> Result<ExportInfo, Error> {
        if let Some(error) = &self.error {
            return Err(error.clone());
        }
        match (self.state, self.info) {
            (State::Closed, _) => Err(Error::Closed),
            (_, Some(info)) => Ok(info),
            _ => Err(Error::Usage("the handshake has not ended")),
        }
    }

    fn check_payload(&self, length: u32) -> Result<(), Error> {
        let max = self.config.limits.max_payload.min(self.block_size.map_or(u32::MAX, |b| b.maximum));
        if length > max {
            return Err(Error::TooLong { what: "request payload", len: length.into(), max: max.into() });
        }
        Ok(())
    }

    fn check_writable(&self) -> Result<(), Error> {
        if self.ready()?.read_only() {
            return Err(Error::Usage("the export is read-only"));
        }
        Ok(())
    }

    fn request(&mut self, command: u16, flags: CommandFlags, offset: u64, length: u32, data: &[u8]) -> Result<Cookie, Error> {
        let info = self.ready()?;
        if self.in_flight.len() >= self.config.limits.max_in_flight {
            return Err(Error::TooManyInFlight(self.in_flight.len()));
        }
        if offset.checked_add(length.into()).is_none_or(|end| end > info.size) {
            return Err(Error::OutOfRange { offset, length: length.into(), size: info.size });
        }
        let cookie = self.next_cookie;
        self.next_cookie += 1;
        self.put_request_header(command, flags, cookie, offset, length);
        self.out.extend_from_slice(data);
        let data = if command == CMD_READ { vec![0u8; length as usize] } else { Vec::new() };
        self.in_flight.insert(cookie, Pending { command, offset, length, data, extents: Vec::new(), error: None });
        Ok(cookie)
    }

    fn put_request_header(&mut self, command: u16, flags: CommandFlags, cookie: Cookie, offset: u64, length: u32) {
        put_u32(&mut self.out, REQUEST_MAGIC);
        put_u16(&mut self.out, flags.0);
        put_u16(&mut self.out, command);
        put_u64(&mut self.out, cookie);
        put_u64(&mut self.out, offset);
        put_u32(&mut self.out, length);
    }

    fn expect(&mut self, state: State, len: usize) {
        self.state = state;
        self.reader.expect(len);
    }

    fn send_option(&mut self, option: u32, data: &[u8]) {
        put_u64(&mut self.out, IHAVEOPT);
        put_u32(&mut self.out, option);
        put_u32(&mut self.out, len32(data.len()));
        self.out.extend_from_slice(data);
        self.option = option;
        self.expect(State::OptionReplyHeader, OPTION_REPLY_HEADER_LEN);
    }

    fn name_bytes(&self) -> &[u8] {
        self.config.export_name.as_bytes()
    }

    /// After structured replies (accepted or not): the metadata context, or `GO`.
    fn after_structured_reply(&mut self) {
        if self.structured && self.config.block_status {
            let name = self.name_bytes().to_vec();
            let mut data = Vec::with_capacity(12 + name.len() + BASE_ALLOCATION.len());
            put_u32(&mut data, len32(name.len()));
            data.extend_from_slice(&name);
            put_u32(&mut data, 1);
            put_u32(&mut data, len32(BASE_ALLOCATION.len()));
            data.extend_from_slice(BASE_ALLOCATION.as_bytes());
            self.send_option(OPT_SET_META_CONTEXT, &data);
        } else {
            self.send_go();
        }
    }

    fn send_go(&mut self) {
        let name = self.name_bytes().to_vec();
        let mut data = Vec::with_capacity(8 + name.len());
        put_u32(&mut data, len32(name.len()));
        data.extend_from_slice(&name);
        put_u16(&mut data, 1);
        put_u16(&mut data, INFO_BLOCK_SIZE);
        self.send_option(OPT_GO, &data);
    }

    fn on_frame(&mut self, frame: Vec<u8>) -> Result<(), Error> {
        let mut c = Cursor::new(&frame);
        match self.state {
            State::Greeting => {
                let malformed = Error::Malformed { what: "greeting" };
                let magic = c.u64().ok_or(malformed.clone())?;
                if magic != NBD_MAGIC {
                    return Err(Error::BadMagic { what: "greeting", found: magic });
                }
                let magic = c.u64().ok_or(malformed.clone())?;
                if magic != IHAVEOPT {
                    return Err(Error::BadMagic { what: "greeting (newstyle)", found: magic });
                }
                let flags = c.u16().ok_or(malformed)?;
                if flags & FLAG_FIXED_NEWSTYLE == 0 {
                    return Err(Error::NotFixedNewstyle(flags));
                }
                let mut client_flags = FLAG_C_FIXED_NEWSTYLE;
                if flags & FLAG_NO_ZEROES != 0 {
                    client_flags |= FLAG_C_NO_ZEROES;
                }
                put_u32(&mut self.out, client_flags);
                if self.config.structured_replies {
                    self.send_option(OPT_STRUCTURED_REPLY, &[]);
                } else {
                    self.send_go();
                }
            }
            State::OptionReplyHeader => {
                let malformed = Error::Malformed { what: "option reply header" };
                let magic = c.u64().ok_or(malformed.clone())?;
                if magic != OPTION_REPLY_MAGIC {
                    return Err(Error::BadMagic { what: "option reply", found: magic });
                }
                let option = c.u32().ok_or(malformed.clone())?;
                let reply = c.u32().ok_or(malformed.clone())?;
                let len = c.u32().ok_or(malformed.clone())?;
                if option != self.option {
                    return Err(Error::Malformed { what: "option reply (for another option)" });
                }
                if len > self.config.limits.max_option {
                    return Err(Error::TooLong { what: "option reply", len: len.into(), max: self.config.limits.max_option.into() });
                }
                self.expect(State::OptionReplyData { reply }, len as usize);
            }
            State::OptionReplyData { reply } => self.on_option_reply(reply, &frame)?,
            State::ReplyMagic => match c.u32().ok_or(Error::Malformed { what: "reply magic" })? {
                SIMPLE_REPLY_MAGIC => self.expect(State::SimpleReply, SIMPLE_REPLY_LEN - REPLY_MAGIC_LEN),
                STRUCTURED_REPLY_MAGIC => self.expect(State::ChunkHeader, CHUNK_HEADER_LEN - REPLY_MAGIC_LEN),
                magic => return Err(Error::BadMagic { what: "reply", found: magic.into() }),
            },
            State::SimpleReply => {
                let malformed = Error::Malformed { what: "simple reply" };
                let code = c.u32().ok_or(malformed.clone())?;
                let cookie = c.u64().ok_or(malformed)?;
                let pending = self.in_flight.get(&cookie).ok_or(Error::UnknownCookie(cookie))?;
                if code == 0 && pending.command == CMD_READ {
                    let length = pending.length as usize;
                    self.expect(State::SimpleReadData { cookie }, length);
                    return Ok(());
                }
                if code == 0 && pending.command == CMD_BLOCK_STATUS {
                    return Err(Error::UnexpectedChunk { chunk_type: CHUNK_NONE, cookie });
                }
                if code != 0 {
                    self.fail(cookie, code, String::new());
                }
                self.finish(cookie);
                self.expect(State::ReplyMagic, REPLY_MAGIC_LEN);
            }
            State::SimpleReadData { cookie } => {
                if let Some(pending) = self.in_flight.get_mut(&cookie) {
                    pending.data = frame;
                }
                self.finish(cookie);
                self.expect(State::ReplyMagic, REPLY_MAGIC_LEN);
            }
            State::ChunkHeader => {
                let malformed = Error::Malformed { what: "structured reply chunk header" };
                let flags = c.u16().ok_or(malformed.clone())?;
                let chunk_type = c.u16().ok_or(malformed.clone())?;
                let cookie = c.u64().ok_or(malformed.clone())?;
                let len = c.u32().ok_or(malformed)?;
                if !self.in_flight.contains_key(&cookie) {
                    return Err(Error::UnknownCookie(cookie));
                }
                // The largest valid chunk is an OFFSET_DATA chunk of a full-size read.
                let max = u64::from(self.config.limits.max_payload) + 8;
                if u64::from(len) > max {
                    return Err(Error::TooLong { what: "reply chunk", len: len.into(), max });
                }
                self.expect(State::ChunkData { flags, chunk_type, cookie }, len as usize);
            }
            State::ChunkData { flags, chunk_type, cookie } => {
                self.on_chunk(chunk_type, cookie, &frame)?;
                if flags & CHUNK_FLAG_DONE != 0 {
                    self.finish(cookie);
                }
                self.expect(State::ReplyMagic, REPLY_MAGIC_LEN);
            }
            State::Closed => {}
        }
        Ok(())
    }

    fn on_option_reply(&mut self, reply: u32, data: &[u8]) -> Result<(), Error> {
        let mut c = Cursor::new(data);
        let malformed = Error::Malformed { what: "option reply" };
        match (self.option, reply) {
            (OPT_STRUCTURED_REPLY, REP_ACK) => {
                self.structured = true;
                self.after_structured_reply();
            }
            (OPT_STRUCTURED_REPLY, r) if r & REP_ERROR_BIT != 0 => self.after_structured_reply(),
            (OPT_SET_META_CONTEXT, REP_META_CONTEXT) => {
                let id = c.u32().ok_or(malformed)?;
                check_name(len32(c.remaining()), &self.config.limits, "metadata context name")?;
                if c.rest() == BASE_ALLOCATION.as_bytes() {
                    self.context = Some(id);
                }
                self.expect(State::OptionReplyHeader, OPTION_REPLY_HEADER_LEN);
            }
            (OPT_SET_META_CONTEXT, r) if r == REP_ACK || r & REP_ERROR_BIT != 0 => self.send_go(),
            (OPT_GO, REP_INFO) => {
                match c.u16().ok_or(malformed.clone())? {
                    INFO_EXPORT => {
                        let size = c.u64().ok_or(malformed.clone())?;
                        let flags = c.u16().ok_or(malformed)?;
                        self.export = Some((size, flags));
                    }
                    INFO_BLOCK_SIZE => {
                        let minimum = c.u32().ok_or(malformed.clone())?;
                        let preferred = c.u32().ok_or(malformed.clone())?;
                        let maximum = c.u32().ok_or(malformed)?;
                        self.block_size = Some(BlockSize { minimum, preferred, maximum });
                    }
                    _ => {} // other information is optional; the spec says to ignore it
                }
                self.expect(State::OptionReplyHeader, OPTION_REPLY_HEADER_LEN);
            }
            (OPT_GO, REP_ACK) => {
                let (size, flags) = self.export.ok_or(Error::Malformed { what: "NBD_OPT_GO reply without NBD_INFO_EXPORT" })?;
                let info = ExportInfo { size, flags, block_size: self.block_size };
                self.info = Some(info);
                self.events.push_back(ClientEvent::Ready(info));
                self.expect(State::ReplyMagic, REPLY_MAGIC_LEN);
            }
            (option, r) if r & REP_ERROR_BIT != 0 => {
                let message = String::from_utf8_lossy(data).into_owned();
                return Err(Error::OptionRefused { option, reply: r, message });
            }
            _ => return Err(Error::Malformed { what: "option reply (unexpected type)" }),
        }
        Ok(())
    }

    fn on_chunk(&mut self, chunk_type: u16, cookie: Cookie, data: &[u8]) -> Result<(), Error> {
        let context = self.context;
        let pending = self.in_flight.get_mut(&cookie).ok_or(Error::UnknownCookie(cookie))?;
        let mut c = Cursor::new(data);
        let unexpected = Error::UnexpectedChunk { chunk_type, cookie };
        let malformed = Error::Malformed { what: "structured reply chunk" };
        let end = pending.offset + u64::from(pending.length);
        // Where a read chunk of `len` bytes at `offset` lands in the request's buffer.
        let place = |offset: u64, len: u64| -> Result<std::ops::Range<usize>, Error> {
            match offset.checked_sub(pending.offset) {
                Some(at) if offset.checked_add(len).is_some_and(|e| e <= end) => Ok(at as usize..(at + len) as usize),
                _ => Err(Error::Malformed { what: "read chunk outside its request" }),
            }
        };
        match chunk_type {
            CHUNK_NONE if data.is_empty() => {}
            CHUNK_OFFSET_DATA if pending.command == CMD_READ => {
                let offset = c.u64().ok_or(malformed)?;
                let bytes = c.rest();
                let range = place(offset, bytes.len() as u64)?;
                pending.data[range].copy_from_slice(bytes);
            }
            CHUNK_OFFSET_HOLE if pending.command == CMD_READ => {
                let offset = c.u64().ok_or(malformed.clone())?;
                let len = c.u32().ok_or(malformed.clone())?;
                if c.remaining() != 0 {
                    return Err(malformed);
                }
                let range = place(offset, len.into())?;
                pending.data[range].fill(0);
            }
            CHUNK_BLOCK_STATUS if pending.command == CMD_BLOCK_STATUS => {
                let id = c.u32().ok_or(malformed.clone())?;
                if !c.remaining().is_multiple_of(8) || c.remaining() == 0 {
                    return Err(malformed);
                }
                if Some(id) == context {
                    pending.extents.reserve(c.remaining() / 8);
                    while let (Some(length), Some(flags)) = (c.u32(), c.u32()) {
                        pending.extents.push(Extent { length, flags });
                    }
                }
            }
            t if t & CHUNK_ERROR_BIT != 0 => {
                let code = c.u32().ok_or(malformed.clone())?;
                let len = c.u16().ok_or(malformed.clone())?;
                let message = c.take(len as usize).ok_or(malformed)?;
                if pending.error.is_none() {
                    // An error chunk with errno 0 is a server bug; still an error.
                    let code = if code == 0 { errno::EIO } else { code };
                    pending.error = Some(ReplyError { errno: code, message: String::from_utf8_lossy(message).into_owned() });
                }
            }
            _ => return Err(unexpected),
        }
        Ok(())
    }

    fn fail(&mut self, cookie: Cookie, code: u32, message: String) {
        if let Some(pending) = self.in_flight.get_mut(&cookie) {
            pending.error.get_or_insert(ReplyError { errno: code, message });
        }
    }

    fn finish(&mut self, cookie: Cookie) {
        let Some(pending) = self.in_flight.remove(&cookie) else { return };
        let result = match pending.error {
            Some(error) => Err(error),
            None => Ok(match pending.command {
                CMD_READ => ReplyData::Read(pending.data),
                CMD_BLOCK_STATUS => ReplyData::BlockStatus { offset: pending.offset, extents: pending.extents },
                _ => ReplyData::Done,
            }),
        };
        self.events.push_back(ClientEvent::Reply(Reply { cookie, result }));
    }
}

#[cfg(test)]
#[path = "client_tests.rs"]
mod tests;
