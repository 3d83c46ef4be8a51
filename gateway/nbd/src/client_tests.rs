//! Unit tests of the client core: exact bytes of its handshake and requests, every reply form
//! (simple, structured data/hole/block status/error/none), fallbacks, hostile input, and input
//! split at every point.

use super::*;
use crate::loopback::{run_loopback, EXPORT_SIZE};
use crate::{Server, ServerConfig};

fn be16(v: u16) -> Vec<u8> {
    v.to_be_bytes().to_vec()
}
fn be32(v: u32) -> Vec<u8> {
    v.to_be_bytes().to_vec()
}
fn be64(v: u64) -> Vec<u8> {
    v.to_be_bytes().to_vec()
}

fn greeting() -> Vec<u8> {
    [be64(NBD_MAGIC), be64(IHAVEOPT), be16(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES)].concat()
}

fn option(opt: u32, data: &[u8]) -> Vec<u8> {
    [be64(IHAVEOPT), be32(opt), be32(data.len() as u32), data.to_vec()].concat()
}

fn option_reply(opt: u32, reply: u32, data: &[u8]) -> Vec<u8> {
    [be64(OPTION_REPLY_MAGIC), be32(opt), be32(reply), be32(data.len() as u32), data.to_vec()].concat()
}

fn info_export(size: u64, flags: u16) -> Vec<u8> {
    option_reply(OPT_GO, REP_INFO, &[be16(INFO_EXPORT), be64(size), be16(flags)].concat())
}

fn chunk(flags: u16, t: u16, cookie: u64, data: Vec<u8>) -> Vec<u8> {
    [be32(STRUCTURED_REPLY_MAGIC), be16(flags), be16(t), be64(cookie), be32(data.len() as u32), data].concat()
}

fn simple(code: u32, cookie: u64) -> Vec<u8> {
    [be32(SIMPLE_REPLY_MAGIC), be32(code), be64(cookie)].concat()
}

const RW: u16 = TFLAG_HAS_FLAGS | TFLAG_SEND_FLUSH | TFLAG_SEND_WRITE_ZEROES | TFLAG_SEND_TRIM;

fn feed(client: &mut Client, mut input: &[u8]) -> Result<Vec<ClientEvent>, Error> {
    let mut events = Vec::new();
    while !input.is_empty() {
        let used = client.handle_input(input)?;
        input = &input[used..];
        let before = events.len();
        events.extend(std::iter::from_fn(|| client.poll_event()));
        if used == 0 && events.len() == before {
            break;
        }
    }
    events.extend(std::iter::from_fn(|| client.poll_event()));
    Ok(events)
}

/// A client past a full handshake (structured, base:allocation id 7, export of EXPORT_SIZE).
fn ready_client(limits: Limits, flags: u16) -> Client {
    let mut config = ClientConfig::new("disk");
    config.limits = limits;
    let mut client = Client::new(config);
    let input = [
        greeting(),
        option_reply(OPT_STRUCTURED_REPLY, REP_ACK, &[]),
        option_reply(OPT_SET_META_CONTEXT, REP_META_CONTEXT, &[be32(7), BASE_ALLOCATION.as_bytes().to_vec()].concat()),
        option_reply(OPT_SET_META_CONTEXT, REP_ACK, &[]),
        info_export(EXPORT_SIZE, flags),
        option_reply(OPT_GO, REP_ACK, &[]),
    ]
    .concat();
    let events = feed(&mut client, &input).unwrap();
    assert_eq!(events, vec![ClientEvent::Ready(ExportInfo { size: EXPORT_SIZE, flags, block_size: None })]);
    client.poll_transmit();
    client
}

fn reply(cookie: Cookie, result: Result<ReplyData, ReplyError>) -> ClientEvent {
    ClientEvent::Reply(Reply { cookie, result })
}

#[test]
fn handshake_bytes_are_the_spec_layout() {
    let mut client = Client::new(ClientConfig::new("disk"));
    assert_eq!(client.poll_transmit(), None, "the client waits for the greeting");
    feed(&mut client, &greeting()).unwrap();
    assert_eq!(client.poll_transmit().unwrap(), [be32(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES), option(OPT_STRUCTURED_REPLY, &[])].concat());
    feed(&mut client, &option_reply(OPT_STRUCTURED_REPLY, REP_ACK, &[])).unwrap();
    let meta = [be32(4), b"disk".to_vec(), be32(1), be32(15), BASE_ALLOCATION.as_bytes().to_vec()].concat();
    assert_eq!(client.poll_transmit().unwrap(), option(OPT_SET_META_CONTEXT, &meta));
    // A context we did not ask for is ignored; ours is recorded.
    feed(&mut client, &option_reply(OPT_SET_META_CONTEXT, REP_META_CONTEXT, &[be32(3), b"qemu:other".to_vec()].concat())).unwrap();
    feed(&mut client, &option_reply(OPT_SET_META_CONTEXT, REP_META_CONTEXT, &[be32(9), BASE_ALLOCATION.as_bytes().to_vec()].concat())).unwrap();
    feed(&mut client, &option_reply(OPT_SET_META_CONTEXT, REP_ACK, &[])).unwrap();
    assert_eq!(client.poll_transmit().unwrap(), option(OPT_GO, &[be32(4), b"disk".to_vec(), be16(1), be16(INFO_BLOCK_SIZE)].concat()));
    let block = option_reply(OPT_GO, REP_INFO, &[be16(INFO_BLOCK_SIZE), be32(512), be32(4096), be32(1 << 20)].concat());
    let other = option_reply(OPT_GO, REP_INFO, &[be16(INFO_NAME), b"disk".to_vec()].concat());
    let events = feed(&mut client, &[info_export(1 << 30, RW), block, other, option_reply(OPT_GO, REP_ACK, &[])].concat()).unwrap();
    let block_size = Some(BlockSize { minimum: 512, preferred: 4096, maximum: 1 << 20 });
    assert_eq!(events, vec![ClientEvent::Ready(ExportInfo { size: 1 << 30, flags: RW, block_size })]);
    assert!(client.has_structured_replies() && client.has_block_status());

    // Requests: the spec's 28-byte header, then a write's payload.
    let cookie = client.write(4096, &[1, 2, 3], CommandFlags(CommandFlags::FUA)).unwrap();
    let expected = [be32(REQUEST_MAGIC), be16(CommandFlags::FUA), be16(CMD_WRITE), be64(cookie), be64(4096), be32(3), vec![1, 2, 3]].concat();
    assert_eq!(client.poll_transmit().unwrap(), expected);
    let cookie = client.block_status(0, 65536, CommandFlags(CommandFlags::REQ_ONE)).unwrap();
    let expected = [be32(REQUEST_MAGIC), be16(CommandFlags::REQ_ONE), be16(CMD_BLOCK_STATUS), be64(cookie), be64(0), be32(65536)].concat();
    assert_eq!(client.poll_transmit().unwrap(), expected);
    client.disconnect().unwrap();
    assert_eq!(client.poll_transmit().unwrap(), [be32(REQUEST_MAGIC), be16(0), be16(CMD_DISC), be64(0), be64(0), be32(0)].concat());
    assert_eq!(client.flush(), Err(Error::Closed));
}

#[test]
fn refused_features_are_turned_off_and_a_refused_go_is_an_error() {
    let mut client = Client::new(ClientConfig::new("disk"));
    feed(&mut client, &greeting()).unwrap();
    client.poll_transmit();
    // No structured replies: straight to GO, no metadata context.
    feed(&mut client, &option_reply(OPT_STRUCTURED_REPLY, REP_ERR_UNSUP, b"no")).unwrap();
    assert_eq!(client.poll_transmit().unwrap()[8..12], be32(OPT_GO)[..]);
    let events = feed(&mut client, &[info_export(EXPORT_SIZE, RW), option_reply(OPT_GO, REP_ACK, &[])].concat()).unwrap();
    assert_eq!(events.len(), 1);
    assert!(!client.has_structured_replies() && !client.has_block_status());
    assert_eq!(client.block_status(0, 4096, CommandFlags::default()), Err(Error::Usage("base:allocation was not negotiated")));

    let mut client = Client::new(ClientConfig::new("nope"));
    let input = [greeting(), option_reply(OPT_STRUCTURED_REPLY, REP_ACK, &[]), option_reply(OPT_SET_META_CONTEXT, REP_ERR_UNKNOWN, &[]), option_reply(OPT_GO, REP_ERR_UNKNOWN, b"no such export")].concat();
    let result = feed(&mut client, &input);
    assert_eq!(result, Err(Error::OptionRefused { option: OPT_GO, reply: REP_ERR_UNKNOWN, message: "no such export".into() }));
    // Without NBD_INFO_EXPORT the ACK is malformed.
    let mut client = Client::new(ClientConfig { structured_replies: false, ..ClientConfig::new("disk") });
    let result = feed(&mut client, &[greeting(), option_reply(OPT_GO, REP_ACK, &[])].concat());
    assert!(matches!(result, Err(Error::Malformed { .. })), "{result:?}");
}

#[test]
fn structured_replies_assemble_into_one_reply_each() {
    let mut client = ready_client(Limits::default(), RW);
    let read = client.read(4096, 16).unwrap();
    let status = client.block_status(0, 8192, CommandFlags::default()).unwrap();
    let failed = client.read(0, 8).unwrap();
    let flush = client.flush().unwrap();
    let write = client.write(0, &[1; 4], CommandFlags::default()).unwrap();
    let zero = client.write_zeroes(0, 4, CommandFlags::default()).unwrap();
    let input = [
        // Read: hole first, then data, out of order; done with a NONE chunk.
        chunk(0, CHUNK_OFFSET_HOLE, read, [be64(4096 + 8), be32(8)].concat()),
        chunk(0, CHUNK_OFFSET_DATA, read, [be64(4096), vec![7; 8]].concat()),
        // Replies of different requests interleave.
        simple(0, flush),
        chunk(CHUNK_FLAG_DONE, CHUNK_NONE, read, vec![]),
        chunk(CHUNK_FLAG_DONE, CHUNK_BLOCK_STATUS, status, [be32(7), be32(4096), be32(0), be32(4096), be32(3)].concat()),
        chunk(0, CHUNK_ERROR_OFFSET, failed, [be32(errno::EIO), be16(3), b"bad".to_vec(), be64(4)].concat()),
        chunk(CHUNK_FLAG_DONE, CHUNK_ERROR, failed, [be32(errno::EINVAL), be16(0)].concat()),
        simple(errno::ENOSPC, write),
        simple(0, zero),
    ]
    .concat();
    let events = feed(&mut client, &input).unwrap();
    let mut data = vec![7; 8];
    data.extend([0; 8]);
    let extents = vec![Extent { length: 4096, flags: 0 }, Extent { length: 4096, flags: 3 }];
    assert_eq!(
        events,
        vec![
            reply(flush, Ok(ReplyData::Done)),
            reply(read, Ok(ReplyData::Read(data))),
            reply(status, Ok(ReplyData::BlockStatus { offset: 0, extents })),
            reply(failed, Err(ReplyError { errno: errno::EIO, message: "bad".into() })),
            reply(write, Err(ReplyError { errno: errno::ENOSPC, message: String::new() })),
            reply(zero, Ok(ReplyData::Done)),
        ]
    );
    assert_eq!(client.in_flight(), 0);
}

#[test]
fn simple_read_replies_carry_the_requested_length() {
    let mut client = Client::new(ClientConfig { structured_replies: false, ..ClientConfig::new("disk") });
    feed(&mut client, &[greeting(), info_export(EXPORT_SIZE, RW), option_reply(OPT_GO, REP_ACK, &[])].concat()).unwrap();
    let read = client.read(0, 4).unwrap();
    let events = feed(&mut client, &[simple(0, read), vec![1, 2, 3, 4]].concat()).unwrap();
    assert_eq!(events, vec![reply(read, Ok(ReplyData::Read(vec![1, 2, 3, 4])))]);
}

#[test]
fn requests_are_checked_before_they_leave() {
    let limits = Limits { max_in_flight: 2, max_payload: 1 << 16, ..Default::default() };
    let mut client = ready_client(limits, RW);
    assert_eq!(client.read(EXPORT_SIZE - 1, 2), Err(Error::OutOfRange { offset: EXPORT_SIZE - 1, length: 2, size: EXPORT_SIZE }));
    assert_eq!(client.read(u64::MAX, 2), Err(Error::OutOfRange { offset: u64::MAX, length: 2, size: EXPORT_SIZE }));
    assert!(matches!(client.read(0, (1 << 16) + 1), Err(Error::TooLong { .. })));
    client.flush().unwrap();
    client.flush().unwrap();
    assert_eq!(client.flush(), Err(Error::TooManyInFlight(2)));
    assert_eq!(client.poll_transmit().unwrap().len(), 2 * REQUEST_HEADER_LEN, "refused requests sent nothing");

    let mut client = ready_client(Limits::default(), TFLAG_HAS_FLAGS | TFLAG_READ_ONLY);
    assert_eq!(client.write(0, &[1], CommandFlags::default()), Err(Error::Usage("the export is read-only")));
    assert_eq!(client.trim(0, 1), Err(Error::Usage("the export is read-only")));
    let mut fresh = Client::new(ClientConfig::new("disk"));
    assert_eq!(fresh.read(0, 1), Err(Error::Usage("the handshake has not ended")));
}

#[test]
fn hostile_server_input_is_a_typed_error() {
    let limits = Limits { max_payload: 1 << 16, ..Default::default() };
    let handshake: Vec<(Vec<u8>, Error)> = vec![
        ([be64(0x1111), vec![0; 10]].concat(), Error::BadMagic { what: "greeting", found: 0x1111 }),
        ([be64(NBD_MAGIC), be64(0x2222), be16(1)].concat(), Error::BadMagic { what: "greeting (newstyle)", found: 0x2222 }),
        ([be64(NBD_MAGIC), be64(IHAVEOPT), be16(0)].concat(), Error::NotFixedNewstyle(0)),
        ([greeting(), be64(OPTION_REPLY_MAGIC), be32(OPT_STRUCTURED_REPLY), be32(REP_ACK), be32(u32::MAX)].concat(), Error::TooLong { what: "option reply", len: u32::MAX.into(), max: 64 << 10 }),
        ([greeting(), option_reply(OPT_GO, REP_ACK, &[])].concat(), Error::Malformed { what: "option reply (for another option)" }),
        ([greeting(), option_reply(OPT_STRUCTURED_REPLY, REP_INFO, &[])].concat(), Error::Malformed { what: "option reply (unexpected type)" }),
    ];
    for (input, error) in handshake {
        let mut client = Client::new(ClientConfig::new("disk"));
        assert_eq!(feed(&mut client, &input), Err(error.clone()));
        assert_eq!(client.handle_input(&[0]), Err(error), "the error is final");
    }
    // Transmission: cookie 1 is a read of 16 bytes at 4096, cookie 2 a write.
    let transmission: Vec<(Vec<u8>, Error)> = vec![
        (simple(0, 99), Error::UnknownCookie(99)),
        (chunk(0, CHUNK_NONE, 99, vec![]), Error::UnknownCookie(99)),
        ([be32(0x3333), vec![0; 12]].concat(), Error::BadMagic { what: "reply", found: 0x3333 }),
        ([be32(STRUCTURED_REPLY_MAGIC), be16(0), be16(CHUNK_OFFSET_DATA), be64(1), be32(u32::MAX)].concat(), Error::TooLong { what: "reply chunk", len: u32::MAX.into(), max: (1 << 16) + 8 }),
        (chunk(0, CHUNK_OFFSET_DATA, 1, [be64(4096 + 10), vec![0; 8]].concat()), Error::Malformed { what: "read chunk outside its request" }),
        (chunk(0, CHUNK_OFFSET_DATA, 1, [be64(0), vec![0; 8]].concat()), Error::Malformed { what: "read chunk outside its request" }),
        (chunk(0, CHUNK_OFFSET_HOLE, 1, [be64(u64::MAX), be32(8)].concat()), Error::Malformed { what: "read chunk outside its request" }),
        (chunk(0, CHUNK_OFFSET_HOLE, 1, [be64(4096), be32(8), vec![0]].concat()), Error::Malformed { what: "structured reply chunk" }),
        (chunk(0, CHUNK_OFFSET_DATA, 2, [be64(0), vec![0; 1]].concat()), Error::UnexpectedChunk { chunk_type: CHUNK_OFFSET_DATA, cookie: 2 }),
        (chunk(0, 77, 1, vec![]), Error::UnexpectedChunk { chunk_type: 77, cookie: 1 }),
        (chunk(0, CHUNK_ERROR, 1, [be32(5), be16(100), b"short".to_vec()].concat()), Error::Malformed { what: "structured reply chunk" }),
        (chunk(0, CHUNK_OFFSET_DATA, 1, vec![0; 4]), Error::Malformed { what: "structured reply chunk" }),
    ];
    for (input, error) in transmission {
        let mut client = ready_client(limits, RW);
        client.read(4096, 16).unwrap();
        client.write(0, &[1], CommandFlags::default()).unwrap();
        assert_eq!(feed(&mut client, &input), Err(error));
    }
    // A block status chunk whose descriptors do not come in whole pairs.
    let mut client = ready_client(limits, RW);
    let cookie = client.block_status(0, 4096, CommandFlags::default()).unwrap();
    let result = feed(&mut client, &chunk(CHUNK_FLAG_DONE, CHUNK_BLOCK_STATUS, cookie, [be32(7), be32(4096)].concat()));
    assert_eq!(result, Err(Error::Malformed { what: "structured reply chunk" }));
}

/// The server's bytes of a whole session fed to a fresh client (which queues the same
/// requests) split at every point give the same replies as fed at once; and the loopback
/// replies are what the fuzz answers say.
#[test]
fn input_split_at_every_point_gives_the_same_events() {
    for structured in [true, false] {
        let config = ClientConfig { structured_replies: structured, ..ClientConfig::new("disk") };
        let transcript = run_loopback(Client::new(config.clone()), Server::new(ServerConfig::new("disk", EXPORT_SIZE)), 3).unwrap();
        let replay = |split: usize| {
            let mut client = Client::new(config.clone());
            let bytes = &transcript.server_to_client;
            let mut events = Vec::new();
            for part in [&bytes[..split], &bytes[split..]] {
                let mut part = part;
                loop {
                    let used = client.handle_input(part).unwrap();
                    part = &part[used..];
                    let mut any = false;
                    while let Some(event) = client.poll_event() {
                        any = true;
                        if let ClientEvent::Ready(_) = event {
                            crate::loopback::queue_fuzz_requests(&mut client).unwrap();
                        } else {
                            events.push(event);
                        }
                    }
                    if part.is_empty() && !any {
                        break;
                    }
                }
            }
            events
        };
        let reference = replay(transcript.server_to_client.len());
        let expected: Vec<ClientEvent> = transcript.replies.iter().map(|r| ClientEvent::Reply(r.clone())).collect();
        assert_eq!(reference, expected);
        // Cookie 5 was answered with an error, reads carry data and holes.
        assert!(matches!(&transcript.replies[0].result, Ok(ReplyData::Read(d)) if d.len() == 4096 && d[2048..3072].iter().all(|&b| b == 0) && d[0] == 0x5a));
        assert!(transcript.replies.iter().any(|r| r.result.is_err()));
        for split in 0..=transcript.server_to_client.len() {
            assert_eq!(replay(split), reference, "split at {split}");
        }
    }
}
