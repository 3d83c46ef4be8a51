//! The control channel between the source and destination host-plugins: one end of it, as a
//! queue of received messages and a sender.
//!
//! The messages, the session they make up and the JSON-lines framing are in
//! [`ferry_api::control`] and [`ferry_api::framing`], which both host-plugins use directly.

use std::marker::PhantomData;
use std::time::Duration;

use ferry_api::framing::{FramingError, JsonLines};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::TcpStream;
use tokio::sync::mpsc;

/// Why the control channel failed.
#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    /// The other host-plugin closed it.
    #[error("the other host-plugin closed the control channel")]
    Closed,
    /// Nothing arrived in time.
    #[error("no answer from the other host-plugin within {0:?}")]
    Timeout(Duration),
    /// The connection failed or carried garbage.
    #[error("control channel: {0}")]
    Framing(#[from] FramingError),
}

/// One end of the control channel: receives `In`, sends `Out`.
///
/// A task reads messages into a queue, so waiting for one can be combined with other work
/// (polling QEMU) without losing a partly read line.
pub struct Channel<In, Out> {
    writer: JsonLines<tokio::io::Empty, OwnedWriteHalf>,
    messages: mpsc::Receiver<Result<In, ChannelError>>,
    _out: PhantomData<fn(Out)>,
}

impl<In: DeserializeOwned + Send + 'static, Out: Serialize> Channel<In, Out> {
    /// Wraps a connected stream.
    pub fn new(tcp: TcpStream) -> Self {
        let _ = tcp.set_nodelay(true);
        let (r, w) = tcp.into_split();
        let (tx, messages) = mpsc::channel(16);
        tokio::spawn(async move {
            let mut reader = JsonLines::new(r, tokio::io::sink());
            loop {
                let next = match reader.recv::<In>().await {
                    Ok(Some(m)) => Ok(m),
                    Ok(None) => Err(ChannelError::Closed),
                    Err(e) => Err(ChannelError::Framing(e)),
                };
                let stop = next.is_err();
                if tx.send(next).await.is_err() || stop {
                    return;
                }
            }
        });
        Self { writer: JsonLines::new(tokio::io::empty(), w), messages, _out: PhantomData }
    }

    /// Sends one message.
    pub async fn send(&mut self, message: &Out) -> Result<(), ChannelError> {
        Ok(self.writer.send(message).await?)
    }

    /// The next message, waiting at most `timeout`.
    pub async fn recv(&mut self, timeout: Duration) -> Result<In, ChannelError> {
        match tokio::time::timeout(timeout, self.messages.recv()).await {
            Err(_) => Err(ChannelError::Timeout(timeout)),
            Ok(None) => Err(ChannelError::Closed),
            Ok(Some(m)) => m,
        }
    }

    /// The next message, however long it takes.
    pub async fn next(&mut self) -> Result<In, ChannelError> {
        self.messages.recv().await.unwrap_or(Err(ChannelError::Closed))
    }

    /// A message if one is waiting.
    pub fn try_recv(&mut self) -> Option<Result<In, ChannelError>> {
        self.messages.try_recv().ok()
    }
}
