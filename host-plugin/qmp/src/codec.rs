//! Sans-IO core of the QMP wire protocol: line framing with a length bound, classification of
//! server messages (greeting, reply, error, event) and command encoding.
//!
//! QMP is one JSON object per line (QEMU ends lines with `\r\n`). Nothing here touches a
//! socket, so every rule is unit-tested with byte literals.

use serde_json::{Map, Value};

/// Default bound on one line from QEMU (4 MiB). `query-rx-filter` with a full VLAN table is a
/// few KiB and `query-migrate-parameters` well under one; anything near this limit is a broken
/// or hostile peer.
pub const DEFAULT_MAX_LINE: usize = 4 << 20;

/// Splits a byte stream into lines of at most `max_line` bytes.
#[derive(Debug)]
pub struct LineFramer {
    buf: Vec<u8>,
    /// Bytes of `buf` already searched for `\n` without finding one.
    scanned: usize,
    max_line: usize,
}

/// A line exceeded the framer's limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LineTooLong {
    /// The limit, in bytes.
    pub limit: usize,
}

impl LineFramer {
    /// A framer that rejects lines longer than `max_line` bytes (without the line ending).
    pub fn new(max_line: usize) -> Self {
        LineFramer {
            buf: Vec::new(),
            scanned: 0,
            max_line,
        }
    }

    /// Appends bytes read from the peer.
    pub fn push(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    /// Bytes buffered but not yet returned as a line.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// The next complete, non-empty line (without `\r\n`), `Ok(None)` if more bytes are
    /// needed, or an error once a line (complete or not) is longer than the limit.
    pub fn next_line(&mut self) -> Result<Option<Vec<u8>>, LineTooLong> {
        loop {
            let found = self.buf[self.scanned..].iter().position(|&b| b == b'\n');
            let Some(pos) = found.map(|p| p + self.scanned) else {
                self.scanned = self.buf.len();
                if self.buf.len() > self.max_line {
                    return Err(LineTooLong {
                        limit: self.max_line,
                    });
                }
                return Ok(None);
            };
            let mut line: Vec<u8> = self.buf.drain(..=pos).collect();
            self.scanned = 0;
            line.pop(); // '\n'
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            if line.len() > self.max_line {
                return Err(LineTooLong {
                    limit: self.max_line,
                });
            }
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            return Ok(Some(line));
        }
    }
}

/// QEMU's error object of a failed command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorBody {
    /// Error class, e.g. `GenericError`.
    pub class: String,
    /// Human-readable description.
    pub desc: String,
}

/// One message from the server, classified but with its payload still as JSON.
#[derive(Debug, Clone, PartialEq)]
pub enum ServerMessage {
    /// `{"QMP": {...}}`, the first line of a session.
    Greeting(Value),
    /// `{"return": ..., "id": ...}` or `{"error": {...}, "id": ...}`.
    Reply {
        /// The id we sent, echoed back; `None` for replies to id-less or unparsable commands.
        id: Option<Value>,
        /// The return value or QEMU's error.
        result: Result<Value, ErrorBody>,
    },
    /// `{"event": NAME, "data": {...}, "timestamp": {...}}`.
    Event {
        /// Event name, e.g. `STOP`.
        name: String,
        /// `data`, or `Value::Null` when absent.
        data: Value,
        /// `timestamp` as `(seconds, microseconds)`, when present and well-formed.
        timestamp: Option<(i64, i64)>,
    },
}

/// Parses one line (strict JSON: trailing bytes are rejected) into a [`ServerMessage`].
pub fn parse_server_message(line: &[u8]) -> Result<ServerMessage, String> {
    let v: Value = serde_json::from_slice(line).map_err(|e| format!("invalid JSON: {e}"))?;
    let Value::Object(mut obj) = v else {
        return Err("not a JSON object".into());
    };
    if let Some(greeting) = obj.remove("QMP") {
        return Ok(ServerMessage::Greeting(greeting));
    }
    if let Some(name) = obj.remove("event") {
        let Value::String(name) = name else {
            return Err("event name is not a string".into());
        };
        let data = obj.remove("data").unwrap_or(Value::Null);
        let timestamp = obj.get("timestamp").and_then(|t| {
            Some((
                t.get("seconds")?.as_i64()?,
                t.get("microseconds")?.as_i64()?,
            ))
        });
        return Ok(ServerMessage::Event {
            name,
            data,
            timestamp,
        });
    }
    let id = obj.remove("id");
    if let Some(ret) = obj.remove("return") {
        return Ok(ServerMessage::Reply {
            id,
            result: Ok(ret),
        });
    }
    if let Some(err) = obj.remove("error") {
        let field = |k: &str| {
            err.get(k)
                .and_then(Value::as_str)
                .map(str::to_owned)
                .ok_or_else(|| format!("error object without string `{k}`"))
        };
        return Ok(ServerMessage::Reply {
            id,
            result: Err(ErrorBody {
                class: field("class")?,
                desc: field("desc")?,
            }),
        });
    }
    Err(format!(
        "neither greeting, reply nor event (keys: {:?})",
        obj.keys().collect::<Vec<_>>()
    ))
}

/// Encodes `{"execute": name, "arguments": args, "id": id}` plus the line ending.
pub fn encode_command(id: u64, name: &str, arguments: Option<Value>) -> Vec<u8> {
    let mut m = Map::new();
    m.insert("execute".into(), Value::String(name.into()));
    if let Some(args) = arguments {
        m.insert("arguments".into(), args);
    }
    m.insert("id".into(), Value::from(id));
    let mut out = Value::Object(m).to_string().into_bytes();
    out.push(b'\n');
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn framer_splits_crlf_lines_across_pushes() {
        let mut f = LineFramer::new(1024);
        f.push(b"{\"a\":1}\r\n{\"b\"");
        assert_eq!(f.next_line(), Ok(Some(b"{\"a\":1}".to_vec())));
        assert_eq!(f.next_line(), Ok(None));
        f.push(b":2}\n\r\n\n{\"c\":3}\n");
        assert_eq!(f.next_line(), Ok(Some(b"{\"b\":2}".to_vec())));
        assert_eq!(f.next_line(), Ok(Some(b"{\"c\":3}".to_vec())));
        assert_eq!(f.next_line(), Ok(None));
        assert_eq!(f.buffered(), 0);
    }

    #[test]
    fn framer_rejects_oversized_lines_complete_or_not() {
        let mut f = LineFramer::new(8);
        f.push(b"123456789");
        assert_eq!(f.next_line(), Err(LineTooLong { limit: 8 }));
        let mut f = LineFramer::new(8);
        f.push(b"12345678\r\n123456789\n");
        assert_eq!(f.next_line(), Ok(Some(b"12345678".to_vec())));
        assert_eq!(f.next_line(), Err(LineTooLong { limit: 8 }));
    }

    #[test]
    fn parses_greeting_reply_error_event() {
        let g = parse_server_message(br#"{"QMP": {"version": {"qemu": {"micro": 22, "minor": 2, "major": 7}, "package": "Debian"}, "capabilities": ["oob"]}}"#);
        assert!(matches!(g, Ok(ServerMessage::Greeting(_))));
        assert_eq!(
            parse_server_message(br#"{"return": {}, "id": 7}"#),
            Ok(ServerMessage::Reply {
                id: Some(json!(7)),
                result: Ok(json!({}))
            })
        );
        assert_eq!(
            parse_server_message(br#"{"return": {"status": "running"}}"#),
            Ok(ServerMessage::Reply {
                id: None,
                result: Ok(json!({"status": "running"}))
            })
        );
        assert_eq!(
            parse_server_message(
                br#"{"id": 1, "error": {"class": "CommandNotFound", "desc": "The command nonexistent has not been found"}}"#
            ),
            Ok(ServerMessage::Reply {
                id: Some(json!(1)),
                result: Err(ErrorBody {
                    class: "CommandNotFound".into(),
                    desc: "The command nonexistent has not been found".into()
                })
            })
        );
        assert_eq!(
            parse_server_message(
                br#"{"timestamp": {"seconds": 1700000000, "microseconds": 12}, "event": "STOP"}"#
            ),
            Ok(ServerMessage::Event {
                name: "STOP".into(),
                data: Value::Null,
                timestamp: Some((1700000000, 12))
            })
        );
    }

    #[test]
    fn rejects_malformed_messages() {
        assert!(parse_server_message(b"{\"return\": {}").is_err());
        assert!(parse_server_message(b"{\"return\": {}} trailing").is_err());
        assert!(parse_server_message(b"[1,2]").is_err());
        assert!(parse_server_message(b"{\"hello\": 1}").is_err());
        assert!(parse_server_message(b"{\"error\": {\"class\": 1}}").is_err());
        assert!(parse_server_message(b"{\"event\": 5}").is_err());
    }

    #[test]
    fn encodes_commands() {
        let c = encode_command(3, "migrate", Some(json!({"uri": "tcp:127.0.0.1:4444"})));
        let v: Value = serde_json::from_slice(&c).unwrap();
        assert_eq!(
            v,
            json!({"execute": "migrate", "arguments": {"uri": "tcp:127.0.0.1:4444"}, "id": 3})
        );
        assert_eq!(c.last(), Some(&b'\n'));
        let c = encode_command(4, "stop", None);
        assert_eq!(
            serde_json::from_slice::<Value>(&c).unwrap(),
            json!({"execute": "stop", "id": 4})
        );
    }
}
