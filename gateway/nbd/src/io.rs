//! The tokio shell: runs either role over any `AsyncRead + AsyncWrite` (a UNIX socket, TCP).
//!
//! - [`serve`] runs a [`Server`] and answers its requests with a [`BlockBackend`], one request
//!   at a time, in arrival order (the client may pipeline; its requests wait in the socket).
//!   The gateway's source side will answer writes from a bounded buffer instead, through the
//!   core directly.
//! - [`ClientConnection`] runs a [`Client`]: requests are queued on the core (pipelining is
//!   the caller's choice), [`ClientConnection::next_reply`] sends what is queued and returns the
//!   next complete reply; the `read`/`write`/... helpers do one request and wait for its reply.

use std::future::Future;
use std::io;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::client::{Client, ClientConfig, ClientEvent, Reply, ReplyData, ReplyError};
use crate::server::{ReadChunk, Request, RequestKind, Server, ServerConfig, ServerEvent};
use crate::{errno, CommandFlags, Cookie, Error, ExportInfo, Extent};

/// Bytes read from the socket at a time.
const READ_BUFFER: usize = 256 << 10;

/// What ended a shell.
#[derive(Debug, thiserror::Error)]
pub enum ShellError {
    /// The socket failed.
    #[error("NBD socket: {0}")]
    Io(#[from] io::Error),
    /// The peer broke the protocol (or a limit).
    #[error("NBD protocol: {0}")]
    Protocol(#[from] Error),
    /// The server answered a request with an error.
    #[error("NBD request {cookie}: {error}")]
    Reply {
        /// The request.
        cookie: Cookie,
        /// The server's error.
        error: ReplyError,
    },
    /// The peer closed the connection.
    #[error("the NBD peer closed the connection")]
    Eof,
}

/// The storage behind a served export. Methods get requests already checked to lie within the
/// export; an `Err` becomes an NBD error reply (its OS errno if NBD has one, else `EIO`) and
/// the connection goes on.
pub trait BlockBackend {
    /// Fills `buf` from `offset`.
    fn read(&mut self, offset: u64, buf: &mut [u8]) -> impl Future<Output = io::Result<()>> + Send;
    /// Writes `data` at `offset`; durable before returning when `fua`.
    fn write(&mut self, offset: u64, data: &[u8], fua: bool) -> impl Future<Output = io::Result<()>> + Send;
    /// Writes `length` zero bytes at `offset` (`flags` as the request had them: `NO_HOLE`, `FUA`).
    fn write_zeroes(&mut self, offset: u64, length: u32, flags: CommandFlags) -> impl Future<Output = io::Result<()>> + Send;
    /// Discards (advisory).
    fn trim(&mut self, offset: u64, length: u32) -> impl Future<Output = io::Result<()>> + Send;
    /// Makes every completed write durable.
    fn flush(&mut self) -> impl Future<Output = io::Result<()>> + Send;
    /// `base:allocation` extents from `offset`, covering at least part of `length`.
    fn block_status(&mut self, offset: u64, length: u32) -> impl Future<Output = io::Result<Vec<Extent>>> + Send;
}

/// What a served connection did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Served {
    /// How it ended.
    pub end: ServeEnd,
    /// Whether structured replies were negotiated.
    pub structured_replies: bool,
    /// Whether `base:allocation` was negotiated.
    pub block_status: bool,
    /// Requests handed to the backend.
    pub requests: u64,
}

/// How a served connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServeEnd {
    /// `NBD_CMD_DISC`.
    Disconnect,
    /// `NBD_OPT_ABORT` during the handshake.
    Aborted,
}

/// Serves one connection until the client disconnects.
pub async fn serve<S, B>(mut stream: S, config: ServerConfig, backend: &mut B) -> Result<Served, ShellError>
where
    S: AsyncRead + AsyncWrite + Unpin,
    B: BlockBackend,
{
    let mut server = Server::new(config);
    let mut served = Served { end: ServeEnd::Disconnect, structured_replies: false, block_status: false, requests: 0 };
    let mut buf = vec![0u8; READ_BUFFER];
    loop {
        if let Some(bytes) = server.poll_transmit() {
            stream.write_all(&bytes).await?;
        }
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            return Err(ShellError::Eof);
        }
        let mut input = &buf[..n];
        loop {
            let used = server.handle_input(input)?;
            input = &input[used..];
            while let Some(event) = server.poll_event() {
                match event {
                    ServerEvent::Ready { structured_replies, block_status } => {
                        (served.structured_replies, served.block_status) = (structured_replies, block_status);
                    }
                    ServerEvent::Request(request) => {
                        served.requests += 1;
                        answer(&mut server, backend, request).await?;
                    }
                    ServerEvent::Disconnect | ServerEvent::Aborted => {
                        if let Some(bytes) = server.poll_transmit() {
                            stream.write_all(&bytes).await?;
                        }
                        stream.flush().await?;
                        served.end = if event == ServerEvent::Disconnect { ServeEnd::Disconnect } else { ServeEnd::Aborted };
                        return Ok(served);
                    }
                }
            }
            if input.is_empty() {
                break;
            }
            if let Some(bytes) = server.poll_transmit() {
                stream.write_all(&bytes).await?;
            }
        }
    }
}

async fn answer<B: BlockBackend>(server: &mut Server, backend: &mut B, request: Request) -> Result<(), Error> {
    let cookie = request.cookie;
    let fua = request.flags.has(CommandFlags::FUA);
    let outcome = match request.kind {
        RequestKind::Read { offset, length } => {
            let mut data = vec![0u8; length as usize];
            match backend.read(offset, &mut data).await {
                Ok(()) => return server.reply_read(cookie, &[ReadChunk::Data { offset, data: &data }]),
                Err(e) => Err(e),
            }
        }
        RequestKind::BlockStatus { offset, length } => match backend.block_status(offset, length).await {
            Ok(extents) => return server.reply_block_status(cookie, &extents),
            Err(e) => Err(e),
        },
        RequestKind::Write { offset, data } => backend.write(offset, &data, fua).await,
        RequestKind::WriteZeroes { offset, length } => backend.write_zeroes(offset, length, request.flags).await,
        RequestKind::Trim { offset, length } => backend.trim(offset, length).await,
        RequestKind::Flush => backend.flush().await,
    };
    match outcome {
        Ok(()) => server.reply_ok(cookie),
        Err(e) => server.reply_error(cookie, nbd_errno(&e), &e.to_string()),
    }
}

/// The NBD errno for an IO error: the OS errno for those NBD has, `EIO` for the rest.
fn nbd_errno(error: &io::Error) -> u32 {
    match error.raw_os_error().and_then(|e| u32::try_from(e).ok()) {
        Some(e @ (errno::EPERM | errno::EIO | errno::ENOMEM | errno::EINVAL | errno::ENOSPC | errno::EOVERFLOW | errno::ENOTSUP | errno::ESHUTDOWN)) => e,
        _ => errno::EIO,
    }
}

/// A client connection: the [`Client`] core over a stream.
#[derive(Debug)]
pub struct ClientConnection<S> {
    stream: S,
    client: Client,
    export: ExportInfo,
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

impl<S: AsyncRead + AsyncWrite + Unpin> ClientConnection<S> {
    /// Runs the handshake over `stream`.
    pub async fn connect(stream: S, config: ClientConfig) -> Result<Self, ShellError> {
        let export = ExportInfo { size: 0, flags: 0, block_size: None };
        let mut connection = Self { stream, client: Client::new(config), export, buf: vec![0u8; READ_BUFFER], start: 0, end: 0 };
        loop {
            match connection.client.poll_event() {
                Some(ClientEvent::Ready(export)) => {
                    connection.export = export;
                    return Ok(connection);
                }
                Some(ClientEvent::Reply(_)) => return Err(Error::Usage("a reply before the handshake ended").into()),
                None => connection.step().await?,
            }
        }
    }

    /// The export.
    pub fn export(&self) -> ExportInfo {
        self.export
    }

    /// The core, to queue requests (pipelined) and to ask what was negotiated.
    pub fn client(&mut self) -> &mut Client {
        &mut self.client
    }

    /// Sends what is queued, then reads until the next complete reply.
    pub async fn next_reply(&mut self) -> Result<Reply, ShellError> {
        loop {
            match self.client.poll_event() {
                Some(ClientEvent::Reply(reply)) => return Ok(reply),
                Some(ClientEvent::Ready(_)) => {}
                None => self.step().await?,
            }
        }
    }

    /// Sends what is queued, feeds buffered input, and reads more when the core wants it.
    async fn step(&mut self) -> Result<(), ShellError> {
        if let Some(bytes) = self.client.poll_transmit() {
            self.stream.write_all(&bytes).await?;
        }
        if self.start < self.end {
            let used = self.client.handle_input(&self.buf[self.start..self.end])?;
            self.start += used;
            if used > 0 {
                return Ok(());
            }
        }
        // The core takes all input while no event waits, so what is left here is small.
        self.buf.copy_within(self.start..self.end, 0);
        (self.start, self.end) = (0, self.end - self.start);
        let n = self.stream.read(&mut self.buf[self.end..]).await?;
        if n == 0 {
            return Err(ShellError::Eof);
        }
        self.end += n;
        Ok(())
    }

    /// One request: queue it with `queue`, wait for its reply (others' replies must not be
    /// pending: use the core and [`ClientConnection::next_reply`] for pipelining).
    async fn call(&mut self, queue: impl FnOnce(&mut Client) -> Result<Cookie, Error>) -> Result<ReplyData, ShellError> {
        let cookie = queue(&mut self.client)?;
        let reply = self.next_reply().await?;
        if reply.cookie != cookie {
            return Err(Error::Usage("a reply for another request: use next_reply when pipelining").into());
        }
        reply.result.map_err(|error| ShellError::Reply { cookie, error })
    }

    /// Reads `length` bytes at `offset`.
    pub async fn read(&mut self, offset: u64, length: u32) -> Result<Vec<u8>, ShellError> {
        match self.call(|c| c.read(offset, length)).await? {
            ReplyData::Read(data) => Ok(data),
            _ => Err(Error::Usage("a read answered without data").into()),
        }
    }

    /// Writes `data` at `offset`.
    pub async fn write(&mut self, offset: u64, data: &[u8], flags: CommandFlags) -> Result<(), ShellError> {
        self.call(|c| c.write(offset, data, flags)).await.map(drop)
    }

    /// Writes zeroes.
    pub async fn write_zeroes(&mut self, offset: u64, length: u32, flags: CommandFlags) -> Result<(), ShellError> {
        self.call(|c| c.write_zeroes(offset, length, flags)).await.map(drop)
    }

    /// Discards.
    pub async fn trim(&mut self, offset: u64, length: u32) -> Result<(), ShellError> {
        self.call(|c| c.trim(offset, length)).await.map(drop)
    }

    /// Flushes.
    pub async fn flush(&mut self) -> Result<(), ShellError> {
        self.call(|c| c.flush()).await.map(drop)
    }

    /// `base:allocation` extents from `offset`.
    pub async fn block_status(&mut self, offset: u64, length: u32) -> Result<Vec<Extent>, ShellError> {
        match self.call(|c| c.block_status(offset, length, CommandFlags::default())).await? {
            ReplyData::BlockStatus { extents, .. } => Ok(extents),
            _ => Err(Error::Usage("a block status request answered without extents").into()),
        }
    }

    /// Sends `NBD_CMD_DISC` and shuts the stream down.
    pub async fn disconnect(mut self) -> Result<(), ShellError> {
        self.client.disconnect()?;
        if let Some(bytes) = self.client.poll_transmit() {
            self.stream.write_all(&bytes).await?;
        }
        self.stream.shutdown().await?;
        Ok(())
    }
}
