//! JSON-lines framing over any async byte stream: one JSON value per `\n`-terminated line, each
//! line bounded, so a confused or hostile peer cannot make the reader buffer without limit.
//!
//! Used by the gateway's local API and by the host-plugins' control channel.

use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, ReadHalf, WriteHalf};

/// Longest line accepted (bytes, newline included).
pub const MAX_LINE: u64 = 256 << 10;

/// Why a line could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum FramingError {
    /// The stream failed.
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
    /// The line is longer than [`MAX_LINE`].
    #[error("line longer than {MAX_LINE} bytes")]
    TooLong,
    /// The line is not the expected JSON.
    #[error("malformed message: {0}")]
    Json(#[from] serde_json::Error),
    /// The stream ended in the middle of a line.
    #[error("stream ended mid-line")]
    Truncated,
}

/// A JSON-lines connection.
pub struct JsonLines<R, W> {
    reader: BufReader<R>,
    writer: W,
    line: Vec<u8>,
}

impl<R: AsyncRead + Unpin, W: AsyncWrite + Unpin> JsonLines<R, W> {
    /// Wraps the two halves of a stream.
    pub fn new(reader: R, writer: W) -> Self {
        Self { reader: BufReader::new(reader), writer, line: Vec::new() }
    }

    /// Reads the next message; `None` at a clean end of stream.
    pub async fn recv<T: DeserializeOwned>(&mut self) -> Result<Option<T>, FramingError> {
        self.line.clear();
        let n = (&mut self.reader).take(MAX_LINE).read_until(b'\n', &mut self.line).await?;
        if n == 0 {
            return Ok(None);
        }
        if self.line.last() != Some(&b'\n') {
            return Err(if n as u64 >= MAX_LINE { FramingError::TooLong } else { FramingError::Truncated });
        }
        Ok(Some(serde_json::from_slice(&self.line)?))
    }

    /// Writes one message and flushes it.
    pub async fn send<T: Serialize>(&mut self, message: &T) -> Result<(), FramingError> {
        let mut bytes = serde_json::to_vec(message)?;
        bytes.push(b'\n');
        self.writer.write_all(&bytes).await?;
        self.writer.flush().await?;
        Ok(())
    }

    /// Gives the write half back (e.g. to shut it down).
    pub fn writer_mut(&mut self) -> &mut W {
        &mut self.writer
    }
}

/// Any byte stream a [`JsonLines`] can run on (a TCP or a UNIX socket), so that one type serves
/// both kinds of API connection.
pub trait ByteStream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> ByteStream for T {}

/// JSON lines over a boxed [`ByteStream`].
pub type BoxedJsonLines = JsonLines<ReadHalf<Box<dyn ByteStream>>, WriteHalf<Box<dyn ByteStream>>>;

impl BoxedJsonLines {
    /// Splits a boxed stream into the two halves of a connection.
    pub fn boxed(stream: Box<dyn ByteStream>) -> Self {
        let (r, w) = tokio::io::split(stream);
        Self::new(r, w)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn round_trip_and_bounds() {
        let (a, b) = tokio::io::duplex(1 << 20);
        let (ar, aw) = tokio::io::split(a);
        let (br, bw) = tokio::io::split(b);
        let mut left = JsonLines::new(ar, aw);
        let mut right = JsonLines::new(br, bw);
        left.send(&serde_json::json!({"x": 1})).await.unwrap();
        let v: serde_json::Value = right.recv().await.unwrap().unwrap();
        assert_eq!(v["x"], 1);

        // An endless line is refused once it passes the bound, not buffered.
        right.writer_mut().write_all(&vec![b'a'; MAX_LINE as usize + 10]).await.unwrap();
        assert!(matches!(left.recv::<serde_json::Value>().await, Err(FramingError::TooLong)));
    }

    #[tokio::test]
    async fn garbage_and_truncation_are_errors() {
        let (a, b) = tokio::io::duplex(4096);
        let (ar, aw) = tokio::io::split(a);
        let (_br, mut bw) = tokio::io::split(b);
        let mut left = JsonLines::new(ar, aw);
        bw.write_all(b"{not json}\n{\"half\":").await.unwrap();
        drop(bw);
        drop(_br);
        assert!(matches!(left.recv::<serde_json::Value>().await, Err(FramingError::Json(_))));
        assert!(matches!(left.recv::<serde_json::Value>().await, Err(FramingError::Truncated)));
    }
}
