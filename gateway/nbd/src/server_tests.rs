//! Unit tests of the server core: exact bytes of the handshake and of every reply, every
//! request kind, refusals, hostile lengths, and input split at every point.

use super::*;
use crate::loopback::{run_loopback, EXPORT_SIZE};
use crate::{Client, ClientConfig};

fn be16(v: u16) -> Vec<u8> {
    v.to_be_bytes().to_vec()
}
fn be32(v: u32) -> Vec<u8> {
    v.to_be_bytes().to_vec()
}
fn be64(v: u64) -> Vec<u8> {
    v.to_be_bytes().to_vec()
}

fn option(opt: u32, data: &[u8]) -> Vec<u8> {
    [be64(IHAVEOPT), be32(opt), be32(data.len() as u32), data.to_vec()].concat()
}

fn option_reply(opt: u32, reply: u32, data: &[u8]) -> Vec<u8> {
    [be64(OPTION_REPLY_MAGIC), be32(opt), be32(reply), be32(data.len() as u32), data.to_vec()].concat()
}

fn go_data(name: &str, infos: &[u16]) -> Vec<u8> {
    let mut d = [be32(name.len() as u32), name.as_bytes().to_vec(), be16(infos.len() as u16)].concat();
    for i in infos {
        d.extend(be16(*i));
    }
    d
}

fn meta_data(name: &str, queries: &[&str]) -> Vec<u8> {
    let mut d = [be32(name.len() as u32), name.as_bytes().to_vec(), be32(queries.len() as u32)].concat();
    for q in queries {
        d.extend([be32(q.len() as u32), q.as_bytes().to_vec()].concat());
    }
    d
}

fn request(flags: u16, command: u16, cookie: u64, offset: u64, length: u32) -> Vec<u8> {
    [be32(REQUEST_MAGIC), be16(flags), be16(command), be64(cookie), be64(offset), be32(length)].concat()
}

fn config() -> ServerConfig {
    ServerConfig::new("disk", EXPORT_SIZE)
}

/// Feeds all of `input`, answering nothing; returns the events.
fn feed(server: &mut Server, mut input: &[u8]) -> Result<Vec<ServerEvent>, Error> {
    let mut events = Vec::new();
    while !input.is_empty() {
        let used = server.handle_input(input)?;
        input = &input[used..];
        let before = events.len();
        events.extend(std::iter::from_fn(|| server.poll_event()));
        if used == 0 && events.len() == before {
            break;
        }
    }
    events.extend(std::iter::from_fn(|| server.poll_event()));
    Ok(events)
}

/// A server past a structured + base:allocation + GO handshake, its output drained.
fn ready_server(config: ServerConfig) -> Server {
    let mut server = Server::new(config);
    let input = [
        be32(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES),
        option(OPT_STRUCTURED_REPLY, &[]),
        option(OPT_SET_META_CONTEXT, &meta_data("disk", &[BASE_ALLOCATION])),
        option(OPT_GO, &go_data("disk", &[])),
    ]
    .concat();
    let events = feed(&mut server, &input).unwrap();
    assert_eq!(events, vec![ServerEvent::Ready { structured_replies: true, block_status: true }]);
    server.poll_transmit();
    server
}

#[test]
fn handshake_bytes_are_the_spec_layout() {
    let mut server = Server::new(config());
    let greeting = server.poll_transmit().unwrap();
    assert_eq!(greeting, [be64(NBD_MAGIC), be64(IHAVEOPT), be16(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES)].concat());
    assert!(feed(&mut server, &be32(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES)).unwrap().is_empty());

    feed(&mut server, &option(OPT_STRUCTURED_REPLY, &[])).unwrap();
    assert_eq!(server.poll_transmit().unwrap(), option_reply(OPT_STRUCTURED_REPLY, REP_ACK, &[]));

    feed(&mut server, &option(OPT_SET_META_CONTEXT, &meta_data("disk", &["qemu:dirty-bitmap:x", BASE_ALLOCATION]))).unwrap();
    let expected = [option_reply(OPT_SET_META_CONTEXT, REP_META_CONTEXT, &[be32(1), BASE_ALLOCATION.as_bytes().to_vec()].concat()), option_reply(OPT_SET_META_CONTEXT, REP_ACK, &[])].concat();
    assert_eq!(server.poll_transmit().unwrap(), expected);

    let flags = TFLAG_HAS_FLAGS | TFLAG_SEND_FLUSH | TFLAG_SEND_FUA | TFLAG_SEND_TRIM | TFLAG_SEND_WRITE_ZEROES;
    let info_export = [be16(INFO_EXPORT), be64(EXPORT_SIZE), be16(flags)].concat();
    let info_block = [be16(INFO_BLOCK_SIZE), be32(1), be32(4096), be32(32 << 20)].concat();
    // NBD_OPT_INFO answers and stays in the handshake; NBD_OPT_GO answers and ends it.
    for (opt, ready) in [(OPT_INFO, false), (OPT_GO, true)] {
        let events = feed(&mut server, &option(opt, &go_data("disk", &[INFO_BLOCK_SIZE]))).unwrap();
        let expected = [option_reply(opt, REP_INFO, &info_export), option_reply(opt, REP_INFO, &info_block), option_reply(opt, REP_ACK, &[])].concat();
        assert_eq!(server.poll_transmit().unwrap(), expected);
        assert_eq!(events.len(), usize::from(ready));
    }
}

#[test]
fn handshake_refusals_are_error_replies_and_the_handshake_goes_on() {
    let mut server = Server::new(config());
    server.poll_transmit();
    feed(&mut server, &be32(FLAG_C_FIXED_NEWSTYLE)).unwrap();
    let cases: Vec<(Vec<u8>, u32, u32)> = vec![
        (option(OPT_EXTENDED_HEADERS, &[]), OPT_EXTENDED_HEADERS, REP_ERR_UNSUP),
        (option(99, b"junk"), 99, REP_ERR_UNSUP),
        // Metadata contexts before structured replies.
        (option(OPT_SET_META_CONTEXT, &meta_data("disk", &[BASE_ALLOCATION])), OPT_SET_META_CONTEXT, REP_ERR_INVALID),
        (option(OPT_STRUCTURED_REPLY, b"x"), OPT_STRUCTURED_REPLY, REP_ERR_INVALID),
        (option(OPT_GO, &go_data("other", &[])), OPT_GO, REP_ERR_UNKNOWN),
        // Name length beyond the data, info count not matching, name over the limit.
        (option(OPT_GO, &[be32(100), b"disk".to_vec()].concat()), OPT_GO, REP_ERR_INVALID),
        (option(OPT_GO, &[be32(4), b"disk".to_vec(), be16(3)].concat()), OPT_GO, REP_ERR_INVALID),
        (option(OPT_INFO, &[be32(5000), vec![b'a'; 5000], be16(0)].concat()), OPT_INFO, REP_ERR_INVALID),
        (option(OPT_LIST, b"x"), OPT_LIST, REP_ERR_INVALID),
    ];
    for (input, opt, reply) in cases {
        assert!(feed(&mut server, &input).unwrap().is_empty());
        let out = server.poll_transmit().unwrap();
        assert_eq!(out[..OPTION_REPLY_HEADER_LEN - 4], option_reply(opt, reply, &[])[..OPTION_REPLY_HEADER_LEN - 4], "option {opt}");
    }
    feed(&mut server, &option(OPT_STRUCTURED_REPLY, &[])).unwrap();
    server.poll_transmit();
    // A second STRUCTURED_REPLY is invalid; a meta query with a count beyond the data too.
    feed(&mut server, &option(OPT_STRUCTURED_REPLY, &[])).unwrap();
    assert_eq!(server.poll_transmit().unwrap()[12..16], be32(REP_ERR_INVALID)[..]);
    feed(&mut server, &option(OPT_SET_META_CONTEXT, &[be32(4), b"disk".to_vec(), be32(1_000_000)].concat())).unwrap();
    assert_eq!(server.poll_transmit().unwrap()[12..16], be32(REP_ERR_INVALID)[..]);
    // LIST names the export; LIST_META_CONTEXT with no queries lists base:allocation.
    feed(&mut server, &option(OPT_LIST, &[])).unwrap();
    let expected = [option_reply(OPT_LIST, REP_SERVER, &[be32(4), b"disk".to_vec()].concat()), option_reply(OPT_LIST, REP_ACK, &[])].concat();
    assert_eq!(server.poll_transmit().unwrap(), expected);
    feed(&mut server, &option(OPT_LIST_META_CONTEXT, &meta_data("disk", &[]))).unwrap();
    assert!(server.poll_transmit().unwrap().windows(15).any(|w| w == BASE_ALLOCATION.as_bytes()));
    // The handshake still ends normally.
    let events = feed(&mut server, &option(OPT_GO, &go_data("disk", &[]))).unwrap();
    assert_eq!(events, vec![ServerEvent::Ready { structured_replies: true, block_status: false }]);
}

#[test]
fn abort_and_export_name_end_the_handshake() {
    let mut server = Server::new(config());
    server.poll_transmit();
    let events = feed(&mut server, &[be32(FLAG_C_FIXED_NEWSTYLE), option(OPT_ABORT, &[])].concat()).unwrap();
    assert_eq!(events, vec![ServerEvent::Aborted]);
    assert_eq!(server.poll_transmit().unwrap(), option_reply(OPT_ABORT, REP_ACK, &[]));
    assert!(server.is_closed());
    assert_eq!(server.handle_input(&[0; 16]).unwrap(), 0, "nothing taken after the abort");

    // EXPORT_NAME without NO_ZEROES: size, flags, 124 zeroes.
    let mut server = Server::new(config());
    server.poll_transmit();
    let events = feed(&mut server, &[be32(FLAG_C_FIXED_NEWSTYLE), option(OPT_EXPORT_NAME, b"disk")].concat()).unwrap();
    assert_eq!(events, vec![ServerEvent::Ready { structured_replies: false, block_status: false }]);
    let out = server.poll_transmit().unwrap();
    assert_eq!(out.len(), 8 + 2 + 124);
    assert_eq!(out[..8], be64(EXPORT_SIZE)[..]);
    // EXPORT_NAME for an unknown export cannot be answered: the connection ends.
    let mut server = Server::new(config());
    let result = feed(&mut server, &[be32(FLAG_C_FIXED_NEWSTYLE), option(OPT_EXPORT_NAME, b"nope")].concat());
    assert_eq!(result, Err(Error::UnknownExport("nope".into())));
}

#[test]
fn hostile_handshake_input_is_a_typed_error() {
    let limits = Limits::default();
    let cases: Vec<(Vec<u8>, Error)> = vec![
        (be32(1 << 7), Error::UnknownClientFlags(1 << 7)),
        (be32(0), Error::Malformed { what: "client flags (no fixed newstyle)" }),
        ([be32(1), be64(0x1234), be32(7), be32(0)].concat(), Error::BadMagic { what: "option", found: 0x1234 }),
        ([be32(1), be64(IHAVEOPT), be32(7), be32(u32::MAX)].concat(), Error::TooLong { what: "option", len: u32::MAX.into(), max: limits.max_option.into() }),
        ([be32(1), option(OPT_EXPORT_NAME, &vec![b'a'; 5000])].concat(), Error::TooLong { what: "export name", len: 5000, max: 4096 }),
    ];
    for (input, error) in cases {
        let mut server = Server::new(config());
        assert_eq!(feed(&mut server, &input), Err(error.clone()));
        assert!(server.is_closed());
        assert_eq!(server.handle_input(b"more"), Err(error), "the error is final");
    }
}

#[test]
fn every_request_kind_reaches_the_application() {
    let mut server = ready_server(config());
    let write = [request(CommandFlags::FUA, CMD_WRITE, 2, 4096, 3), vec![1, 2, 3]].concat();
    let input = [
        request(CommandFlags::DF, CMD_READ, 1, 0, 512),
        write,
        request(CommandFlags::NO_HOLE, CMD_WRITE_ZEROES, 3, 8192, 4096),
        request(0, CMD_TRIM, 4, 0, 4096),
        request(0, CMD_FLUSH, 5, 0, 0),
        request(CommandFlags::REQ_ONE, CMD_BLOCK_STATUS, 6, 0, 65536),
        request(0, CMD_DISC, 7, 0, 0),
    ]
    .concat();
    let events = feed(&mut server, &input).unwrap();
    let r = |cookie, flags, kind| ServerEvent::Request(Request { cookie, flags: CommandFlags(flags), kind });
    assert_eq!(
        events,
        vec![
            r(1, CommandFlags::DF, RequestKind::Read { offset: 0, length: 512 }),
            r(2, CommandFlags::FUA, RequestKind::Write { offset: 4096, data: vec![1, 2, 3] }),
            r(3, CommandFlags::NO_HOLE, RequestKind::WriteZeroes { offset: 8192, length: 4096 }),
            r(4, 0, RequestKind::Trim { offset: 0, length: 4096 }),
            r(5, 0, RequestKind::Flush),
            r(6, CommandFlags::REQ_ONE, RequestKind::BlockStatus { offset: 0, length: 65536 }),
            ServerEvent::Disconnect,
        ]
    );
    assert_eq!(server.in_flight(), 6);
    assert!(server.is_closed());
}

#[test]
fn replies_are_the_spec_layout() {
    let mut server = ready_server(config());
    let input = [request(0, CMD_READ, 1, 4096, 16), request(0, CMD_BLOCK_STATUS, 2, 0, 8192), request(0, CMD_FLUSH, 3, 0, 0), request(0, CMD_READ, 4, 0, 8)].concat();
    feed(&mut server, &input).unwrap();
    let chunk = |flags: u16, t: u16, cookie: u64, data: Vec<u8>| [be32(STRUCTURED_REPLY_MAGIC), be16(flags), be16(t), be64(cookie), be32(data.len() as u32), data].concat();

    server.reply_read(1, &[ReadChunk::Data { offset: 4096, data: &[7; 8] }, ReadChunk::Hole { offset: 4104, length: 8 }]).unwrap();
    let expected = [chunk(0, CHUNK_OFFSET_DATA, 1, [be64(4096), vec![7; 8]].concat()), chunk(CHUNK_FLAG_DONE, CHUNK_OFFSET_HOLE, 1, [be64(4104), be32(8)].concat())].concat();
    assert_eq!(server.poll_transmit().unwrap(), expected);

    server.reply_block_status(2, &[Extent { length: 4096, flags: 0 }, Extent { length: 4096, flags: Extent::HOLE | Extent::ZERO }]).unwrap();
    let expected = chunk(CHUNK_FLAG_DONE, CHUNK_BLOCK_STATUS, 2, [be32(1), be32(4096), be32(0), be32(4096), be32(3)].concat());
    assert_eq!(server.poll_transmit().unwrap(), expected);

    server.reply_ok(3).unwrap();
    assert_eq!(server.poll_transmit().unwrap(), [be32(SIMPLE_REPLY_MAGIC), be32(0), be64(3)].concat());

    server.reply_error(4, errno::EIO, "boom").unwrap();
    let expected = chunk(CHUNK_FLAG_DONE, CHUNK_ERROR, 4, [be32(errno::EIO), be16(4), b"boom".to_vec()].concat());
    assert_eq!(server.poll_transmit().unwrap(), expected);
    assert_eq!(server.in_flight(), 0);

    // Replies that do not fit their request are the application's error, not the wire's.
    assert_eq!(server.reply_ok(9), Err(Error::UnknownCookie(9)));
    feed(&mut server, &request(0, CMD_READ, 5, 0, 8)).unwrap();
    assert!(matches!(server.reply_read(5, &[ReadChunk::Data { offset: 4, data: &[0; 8] }]), Err(Error::Usage(_))));
    assert!(matches!(server.reply_ok(5), Err(Error::Usage(_))));
}

#[test]
fn simple_read_replies_fill_holes_with_zeroes() {
    let mut server = Server::new(config());
    server.poll_transmit();
    feed(&mut server, &[be32(FLAG_C_FIXED_NEWSTYLE), option(OPT_GO, &go_data("disk", &[]))].concat()).unwrap();
    server.poll_transmit();
    feed(&mut server, &request(0, CMD_READ, 1, 100, 8)).unwrap();
    server.reply_read(1, &[ReadChunk::Data { offset: 100, data: &[9, 9] }, ReadChunk::Hole { offset: 102, length: 2 }, ReadChunk::Data { offset: 104, data: &[8; 4] }]).unwrap();
    assert_eq!(server.poll_transmit().unwrap(), [be32(SIMPLE_REPLY_MAGIC), be32(0), be64(1), vec![9, 9, 0, 0, 8, 8, 8, 8]].concat());
    // Without structured replies an error is a simple reply, and block status is refused.
    feed(&mut server, &request(0, CMD_BLOCK_STATUS, 2, 0, 4096)).unwrap();
    assert_eq!(server.poll_transmit().unwrap(), [be32(SIMPLE_REPLY_MAGIC), be32(errno::EINVAL), be64(2)].concat());
}

#[test]
fn invalid_requests_are_answered_here_and_never_surface() {
    let mut server = ready_server(config());
    let simple_error = |cookie, code| [be32(SIMPLE_REPLY_MAGIC), be32(code), be64(cookie)].concat();
    let cases: Vec<(Vec<u8>, u32)> = vec![
        (request(0, CMD_WRITE_ZEROES, 1, EXPORT_SIZE - 4096, 8192), errno::ENOSPC),
        ([request(0, CMD_WRITE, 2, EXPORT_SIZE, 1), vec![0]].concat(), errno::ENOSPC),
        (request(0, CMD_TRIM, 3, u64::MAX, 2), errno::ENOSPC),
        (request(0, 5, 4, 0, 0), errno::EINVAL),  // NBD_CMD_CACHE
        (request(0, 200, 5, 0, 0), errno::EINVAL),
    ];
    for (input, code) in cases {
        assert!(feed(&mut server, &input).unwrap().is_empty());
        let cookie = u64::from_be_bytes(input[8..16].try_into().unwrap());
        assert_eq!(server.poll_transmit().unwrap(), simple_error(cookie, code));
    }
    // Reads and block status out of range, and reads over the payload limit: structured errors.
    for input in [request(0, CMD_READ, 6, EXPORT_SIZE, 1), request(0, CMD_READ, 7, 0, (32 << 20) + 1), request(0, CMD_BLOCK_STATUS, 8, 0, 0)] {
        assert!(feed(&mut server, &input).unwrap().is_empty());
        let out = server.poll_transmit().unwrap();
        assert_eq!(out[6..8], be16(CHUNK_ERROR)[..]);
        assert_eq!(out[20..24], be32(errno::EINVAL)[..]);
    }
    // Read-only: every write kind gets EPERM (its payload is consumed, the stream stays in sync).
    let mut ro = config();
    ro.read_only = true;
    let mut server = ready_server(ro);
    let input = [request(0, CMD_WRITE, 1, 0, 2), vec![1, 2], request(0, CMD_WRITE_ZEROES, 2, 0, 2), request(0, CMD_TRIM, 3, 0, 2), request(0, CMD_READ, 4, 0, 2)].concat();
    let events = feed(&mut server, &input).unwrap();
    assert_eq!(events, vec![ServerEvent::Request(Request { cookie: 4, flags: CommandFlags(0), kind: RequestKind::Read { offset: 0, length: 2 } })]);
    assert_eq!(server.poll_transmit().unwrap(), [simple_error(1, errno::EPERM), simple_error(2, errno::EPERM), simple_error(3, errno::EPERM)].concat());
}

#[test]
fn hostile_transmission_input_is_a_typed_error() {
    let limits = Limits { max_payload: 1 << 16, ..Default::default() };
    let mut small = config();
    small.limits = limits;
    let cases: Vec<(Vec<u8>, Error)> = vec![
        (request(0, CMD_WRITE, 1, 0, (1 << 16) + 1), Error::TooLong { what: "write payload", len: (1 << 16) + 1, max: 1 << 16 }),
        (request(0, CMD_WRITE, 1, 0, u32::MAX), Error::TooLong { what: "write payload", len: u32::MAX.into(), max: 1 << 16 }),
        ([be32(0xdead_beef), vec![0; 24]].concat(), Error::BadMagic { what: "request", found: 0xdead_beef }),
        ([request(0, CMD_FLUSH, 1, 0, 0), request(0, CMD_FLUSH, 1, 0, 0)].concat(), Error::Malformed { what: "request (cookie already in flight)" }),
    ];
    for (input, error) in cases {
        let mut server = ready_server(small.clone());
        let mut input = &input[..];
        let result = loop {
            match server.handle_input(input) {
                Err(e) => break Err(e),
                Ok(used) => input = &input[used..],
            }
            while server.poll_event().is_some() {}
            if input.is_empty() {
                break Ok(());
            }
        };
        assert_eq!(result, Err(error));
    }
}

#[test]
fn unanswered_requests_stop_input_at_the_in_flight_limit() {
    let mut c = config();
    c.limits.max_in_flight = 2;
    let mut server = ready_server(c);
    let input = [request(0, CMD_FLUSH, 1, 0, 0), request(0, CMD_FLUSH, 2, 0, 0), request(0, CMD_FLUSH, 3, 0, 0)].concat();
    let mut used = 0;
    for _ in 0..4 {
        used += server.handle_input(&input[used..]).unwrap();
        while server.poll_event().is_some() {}
    }
    assert_eq!(used, 2 * REQUEST_HEADER_LEN, "the third request waits");
    server.reply_ok(1).unwrap();
    used += server.handle_input(&input[used..]).unwrap();
    assert_eq!(used, input.len());
}

/// The client's bytes of a whole session fed to a fresh server split at every point give the
/// same events as fed at once.
#[test]
fn input_split_at_every_point_gives_the_same_events() {
    for structured in [true, false] {
        let mut cc = ClientConfig::new("disk");
        cc.structured_replies = structured;
        let transcript = run_loopback(Client::new(cc), Server::new(config()), usize::MAX).unwrap();
        let bytes = &transcript.client_to_server;
        let reference = feed(&mut Server::new(config()), bytes).unwrap();
        assert!(reference.len() >= 7, "handshake and at least six requests");
        for split in 0..=bytes.len() {
            let mut server = Server::new(config());
            let mut events = feed(&mut server, &bytes[..split]).unwrap();
            events.extend(feed(&mut server, &bytes[split..]).unwrap());
            assert_eq!(events, reference, "split at {split}");
        }
    }
}
