//! A host-plugin's session with a gateway's local API, for tests: `ferry-api`'s messages and
//! framing over the gateway's UNIX socket or TCP, and raw lines for tests of the wire format.

use std::path::{Path, PathBuf};

use ferry_api::framing::{BoxedJsonLines, ByteStream};
use ferry_api::protocol::{ApiAddress, CodecMode, Request, Response, Token};
use tokio::io::AsyncWriteExt;

/// One API session. Its calls panic on a broken connection (tests only).
pub struct ApiSession {
    lines: BoxedJsonLines,
}

impl ApiSession {
    /// Connects (without authenticating).
    pub async fn connect(address: &ApiAddress) -> std::io::Result<Self> {
        let stream: Box<dyn ByteStream> = match address {
            ApiAddress::Unix(path) => Box::new(tokio::net::UnixStream::connect(path).await?),
            ApiAddress::Tcp(addr) => Box::new(tokio::net::TcpStream::connect(addr).await?),
        };
        Ok(Self { lines: BoxedJsonLines::boxed(stream) })
    }

    /// Connects and, with a token, authenticates (asserting the gateway accepts it).
    pub async fn open(address: &ApiAddress, token: Option<&Token>) -> std::io::Result<Self> {
        let mut session = Self::connect(address).await?;
        if let Some(token) = token {
            let answer = session.call(Request::Auth { token: token.clone() }).await;
            assert_eq!(answer, Response::Authenticated, "the gateway refused the token");
        }
        Ok(session)
    }

    /// Sends `request`, returns the answer.
    pub async fn call(&mut self, request: Request) -> Response {
        self.lines.send(&request).await.expect("api request");
        self.lines.recv().await.expect("api answer").expect("the gateway closed the session")
    }

    /// Sends one raw line (without its newline); the answer as JSON, `None` if the gateway
    /// closed the session instead.
    pub async fn raw(&mut self, line: &str) -> Option<serde_json::Value> {
        self.lines.writer_mut().write_all(format!("{line}\n").as_bytes()).await.ok()?;
        self.lines.recv().await.ok().flatten()
    }

    /// The next message, `None` once the gateway closed the session.
    pub async fn recv_raw(&mut self) -> Option<serde_json::Value> {
        self.lines.recv().await.ok().flatten()
    }

    /// Opens a forward (codec off) to `connect` behind `peer` for `connections` connections from
    /// 127.0.0.1; the answer.
    pub async fn open_forward(&mut self, peer: &str, connect: std::net::SocketAddr, connections: u32) -> Response {
        let client = std::net::Ipv4Addr::LOCALHOST.into();
        self.call(Request::OpenForward { peer: peer.into(), connect, codec: CodecMode::Off, client, connections }).await
    }
}

/// Writes an API token file (mode 0600) `api.token` into `dir`; its path and the token.
pub fn write_token(dir: &Path) -> (PathBuf, Token) {
    use std::os::unix::fs::PermissionsExt;
    let mut rng = crate::rng::Rng::new(u64::from(std::process::id()));
    let token = format!("{:016x}{:016x}", rng.next(), rng.next());
    let path = dir.join("api.token");
    std::fs::write(&path, format!("{token}\n")).expect("token file");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod token file");
    (path, Token(token))
}
