//! The two cores talking to each other in memory, and the fixed request sequences the fuzz
//! targets replay: shared by the unit tests, the fuzz targets and `examples/fuzz_seeds.rs`
//! (which records the seed corpora from it).

use crate::client::{Client, ClientEvent, Reply};
use crate::server::{ReadChunk, Request, RequestKind, Server, ServerEvent};
use crate::{errno, CommandFlags, Cookie, Error, Extent};

/// Size of the export the fuzz targets and seeds use.
pub const EXPORT_SIZE: u64 = 1 << 20;

/// The requests a fuzzed client queues once its handshake ended (cookies 1, 2, ...).
pub fn queue_fuzz_requests(client: &mut Client) -> Result<Vec<Cookie>, Error> {
    let mut cookies = vec![client.read(0, 4096)?];
    if client.has_block_status() {
        cookies.push(client.block_status(0, 65536, CommandFlags::default())?);
    }
    cookies.extend([
        client.write(4096, &[0xa5; 512], CommandFlags(CommandFlags::FUA))?,
        client.write_zeroes(8192, 4096, CommandFlags(CommandFlags::NO_HOLE))?,
        client.trim(65536, 4096)?,
        client.flush()?,
        client.read(EXPORT_SIZE - 4096, 4096)?,
    ]);
    Ok(cookies)
}

/// How a fuzzed (or seed) server answers: reads with a data chunk, a hole and the rest as
/// data; block status with two extents; every fifth request with an error; the rest "ok".
pub fn answer_for_fuzz(server: &mut Server, request: &Request) -> Result<(), Error> {
    let cookie = request.cookie;
    if cookie.is_multiple_of(5) {
        return server.reply_error(cookie, errno::EIO, "fuzz error");
    }
    match request.kind {
        RequestKind::Read { offset, length } => {
            let half = length / 2;
            let quarter = half / 2;
            let data = vec![0x5a; length as usize];
            server.reply_read(
                cookie,
                &[
                    ReadChunk::Data { offset, data: &data[..half as usize] },
                    ReadChunk::Hole { offset: offset + u64::from(half), length: quarter },
                    ReadChunk::Data { offset: offset + u64::from(half + quarter), data: &data[(half + quarter) as usize..] },
                ],
            )
        }
        RequestKind::BlockStatus { length, .. } => {
            let first = (length / 2).max(1);
            server.reply_block_status(cookie, &[Extent { length: first, flags: 0 }, Extent { length: length - first, flags: Extent::HOLE | Extent::ZERO }])
        }
        _ => server.reply_ok(cookie),
    }
}

/// What crossed the wire in a loopback session.
#[derive(Debug, Default)]
pub struct Transcript {
    /// Everything the client sent.
    pub client_to_server: Vec<u8>,
    /// Everything the server sent.
    pub server_to_client: Vec<u8>,
    /// The replies the client got.
    pub replies: Vec<Reply>,
}

/// Runs `client` against `server` in memory until neither has anything to say: the client
/// queues [`queue_fuzz_requests`] when ready, the server answers with [`answer_for_fuzz`].
/// Bytes are delivered in pieces of `piece` bytes to exercise partial input.
pub fn run_loopback(mut client: Client, mut server: Server, piece: usize) -> Result<Transcript, Error> {
    let mut transcript = Transcript::default();
    let (mut to_server, mut to_client): (Vec<u8>, Vec<u8>) = (Vec::new(), Vec::new());
    loop {
        let mut progressed = false;
        if let Some(bytes) = server.poll_transmit() {
            transcript.server_to_client.extend_from_slice(&bytes);
            to_client.extend_from_slice(&bytes);
            progressed = true;
        }
        if let Some(bytes) = client.poll_transmit() {
            transcript.client_to_server.extend_from_slice(&bytes);
            to_server.extend_from_slice(&bytes);
            progressed = true;
        }
        let n = server.handle_input(&to_server[..to_server.len().min(piece)])?;
        to_server.drain(..n);
        let m = client.handle_input(&to_client[..to_client.len().min(piece)])?;
        to_client.drain(..m);
        progressed |= n > 0 || m > 0;
        while let Some(event) = server.poll_event() {
            progressed = true;
            if let ServerEvent::Request(request) = event {
                answer_for_fuzz(&mut server, &request)?;
            }
        }
        while let Some(event) = client.poll_event() {
            progressed = true;
            match event {
                ClientEvent::Ready(_) => {
                    queue_fuzz_requests(&mut client)?;
                }
                ClientEvent::Reply(reply) => transcript.replies.push(reply),
            }
        }
        if !progressed {
            return Ok(transcript);
        }
    }
}
