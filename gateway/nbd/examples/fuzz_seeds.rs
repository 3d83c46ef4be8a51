//! Writes the seed corpora of the fuzz targets: the bytes each side sent in an in-memory
//! session of our client and server (`loopback::run_loopback`), prefixed with a piece size.
//! Usage: `cargo run -p ferry-nbd --example fuzz_seeds -- gateway/nbd/fuzz/corpus`

use std::path::PathBuf;

use ferry_nbd::loopback::{run_loopback, EXPORT_SIZE};
use ferry_nbd::{Client, ClientConfig, Server, ServerConfig};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = PathBuf::from(std::env::args().nth(1).ok_or("usage: fuzz_seeds CORPUS_DIR")?);
    let mut server_config = ServerConfig::new("disk", EXPORT_SIZE);
    server_config.limits.max_payload = 1 << 20;
    let mut client_config = ClientConfig::new("disk");
    client_config.limits.max_payload = 1 << 20;
    for (name, structured) in [("structured", true), ("simple", false)] {
        let mut client_config = client_config.clone();
        client_config.structured_replies = structured;
        client_config.block_status = structured;
        let transcript = run_loopback(Client::new(client_config), Server::new(server_config.clone()), 7)?;
        for (target, bytes) in [("server_input", &transcript.client_to_server), ("client_input", &transcript.server_to_client)] {
            std::fs::create_dir_all(dir.join(target))?;
            for piece in [255u8, 13] {
                let mut seed = vec![piece];
                seed.extend_from_slice(bytes);
                std::fs::write(dir.join(target).join(format!("{name}-{piece}")), seed)?;
            }
        }
    }
    Ok(())
}
