//! The Redis GET baseline of the read scenarios: what a read of a counter
//! costs in a key-value server on the same machine.
//!
//! The benchmark starts its own `redis-server` (a free port, no
//! persistence, no other client), loads one key per counter and reads
//! them with as many connections, one `GET` in flight per connection, as
//! the proxy's read scenario uses. The client is a minimal RESP encoder
//! and reply reader over a tokio TCP stream: enough for `SET`/`GET`/`PING`,
//! no dependency added for it.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

use super::keys::KeySpace;

/// Where the baseline's server binary is looked for.
const REDIS_SERVER: &str = "redis-server";

/// A `redis-server` child, killed when dropped.
pub struct RedisServer {
    child: Child,
    pub addr: SocketAddr,
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Whether `redis-server` can be started (on `PATH` or in `/usr/bin`).
fn binary() -> Option<String> {
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let p = dir.join(REDIS_SERVER);
            if p.is_file() {
                return Some(p.to_string_lossy().into_owned());
            }
        }
    }
    let p = Path::new("/usr/bin").join(REDIS_SERVER);
    p.is_file().then(|| p.to_string_lossy().into_owned())
}

impl RedisServer {
    /// Starts a private server on a free loopback port without
    /// persistence; `Ok(None)` (the caller prints a skip) when there is no
    /// `redis-server`.
    pub async fn start() -> Result<Option<RedisServer>, String> {
        let Some(bin) = binary() else {
            return Ok(None);
        };
        let port = crate::free_port();
        let child = Command::new(&bin)
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--protected-mode",
                "no",
                "--daemonize",
                "no",
                "--dir",
                &std::env::temp_dir().to_string_lossy(),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("starting {bin}: {e}"))?;
        let server = RedisServer {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(mut c) = RespConn::connect(server.addr).await
                && c.command(&[b"PING"]).await.is_ok()
            {
                return Ok(Some(server));
            }
            if Instant::now() > deadline {
                return Err(format!("{bin} did not answer PING on {}", server.addr));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Sets every key of `keys` to 1, pipelined 1,000 at a time.
    pub async fn load(&self, keys: &KeySpace) -> Result<(), String> {
        let mut c = RespConn::connect(self.addr).await?;
        for chunk in keys.names().chunks(1000) {
            let mut out = Vec::new();
            for k in chunk {
                encode(&mut out, &[b"SET", k.as_bytes(), b"1"]);
            }
            c.write.write_all(&out).await.map_err(|e| e.to_string())?;
            for _ in chunk {
                c.reply().await?;
            }
        }
        Ok(())
    }
}

/// One RESP connection; commands on it are sequential.
pub struct RespConn {
    read: BufReader<OwnedReadHalf>,
    write: OwnedWriteHalf,
    line: Vec<u8>,
}

/// A reply: a bulk string (`None` for nil), or a status line.
#[derive(Debug)]
pub enum Reply {
    Bulk(Option<Vec<u8>>),
    Status(String),
    Int(i64),
}

fn encode(out: &mut Vec<u8>, args: &[&[u8]]) {
    out.extend_from_slice(format!("*{}\r\n", args.len()).as_bytes());
    for a in args {
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
}

impl RespConn {
    pub async fn connect(addr: SocketAddr) -> Result<RespConn, String> {
        let s = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect {addr}: {e}"))?;
        s.set_nodelay(true).map_err(|e| e.to_string())?;
        let (r, w) = s.into_split();
        Ok(RespConn {
            read: BufReader::new(r),
            write: w,
            line: Vec::new(),
        })
    }

    /// Sends one command and reads its reply.
    pub async fn command(&mut self, args: &[&[u8]]) -> Result<Reply, String> {
        let mut out = Vec::with_capacity(64);
        encode(&mut out, args);
        self.write
            .write_all(&out)
            .await
            .map_err(|e| e.to_string())?;
        self.reply().await
    }

    async fn read_line(&mut self) -> Result<(), String> {
        self.line.clear();
        loop {
            let b = self.read.read_u8().await.map_err(|e| e.to_string())?;
            if b == b'\n' && self.line.last() == Some(&b'\r') {
                self.line.pop();
                return Ok(());
            }
            self.line.push(b);
        }
    }

    async fn reply(&mut self) -> Result<Reply, String> {
        self.read_line().await?;
        let (kind, rest) = self
            .line
            .split_first()
            .ok_or_else(|| "empty RESP line".to_owned())?;
        let text = String::from_utf8_lossy(rest).into_owned();
        match kind {
            b'+' => Ok(Reply::Status(text)),
            b'-' => Err(format!("redis error: {text}")),
            b':' => text
                .parse()
                .map(Reply::Int)
                .map_err(|e| format!("RESP integer {text:?}: {e}")),
            b'$' => {
                let n: i64 = text
                    .parse()
                    .map_err(|e| format!("RESP length {text:?}: {e}"))?;
                if n < 0 {
                    return Ok(Reply::Bulk(None));
                }
                let mut buf = vec![0u8; n as usize + 2];
                self.read
                    .read_exact(&mut buf)
                    .await
                    .map_err(|e| e.to_string())?;
                buf.truncate(n as usize);
                Ok(Reply::Bulk(Some(buf)))
            }
            _ => Err(format!("unexpected RESP reply {:?}", self.line)),
        }
    }
}

/// The outcome of a GET load.
pub struct GetResult {
    pub gets: u64,
    pub elapsed: Duration,
    pub hist: Histogram<u64>,
}

impl GetResult {
    pub fn rps(&self) -> f64 {
        self.gets as f64 / self.elapsed.as_secs_f64()
    }
    pub fn ms(&self, q: f64) -> f64 {
        self.hist.value_at_quantile(q) as f64 / 1000.0
    }
}

/// `conns` connections each sending `GET` of a key drawn from `keys` and
/// waiting for its value, for `duration`. Fails on a missing or wrong
/// value (every key was set to 1).
pub async fn get_load(
    addr: SocketAddr,
    keys: Arc<KeySpace>,
    conns: usize,
    duration: Duration,
) -> Result<GetResult, String> {
    let started = Instant::now();
    let deadline = started + duration;
    let mut tasks = Vec::new();
    for w in 0..conns {
        let keys = keys.clone();
        tasks.push(tokio::spawn(async move {
            let mut hist =
                Histogram::<u64>::new_with_bounds(1, 600_000_000, 3).map_err(|e| e.to_string())?;
            let mut rng = fastrand::Rng::with_seed(w as u64 + 7);
            let mut c = RespConn::connect(addr).await?;
            let mut n = 0u64;
            while Instant::now() < deadline {
                let k = keys.name(keys.sample(&mut rng));
                let t = Instant::now();
                match c.command(&[b"GET", k.as_bytes()]).await? {
                    Reply::Bulk(Some(v)) if v == b"1" => {}
                    other => return Err(format!("GET {k} answered {other:?}")),
                }
                hist.saturating_record((t.elapsed().as_micros() as u64).max(1));
                n += 1;
            }
            Ok::<_, String>((n, hist))
        }));
    }
    let mut gets = 0;
    let mut hist =
        Histogram::<u64>::new_with_bounds(1, 600_000_000, 3).map_err(|e| e.to_string())?;
    for t in tasks {
        let (n, h) = t.await.map_err(|e| e.to_string())??;
        gets += n;
        hist.add(&h).map_err(|e| e.to_string())?;
    }
    Ok(GetResult {
        gets,
        elapsed: started.elapsed(),
        hist,
    })
}
