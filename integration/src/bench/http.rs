//! A minimal keep-alive HTTP/1.1 client connection on hyper, and the bare
//! hyper server used as the single-event baseline.

use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper::{Method, Request, Response, header};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};

/// One request of a workload.
#[derive(Clone, Debug)]
pub struct Req {
    pub method: Method,
    pub path: String,
    pub body: Bytes,
    pub content_type: Option<&'static str>,
    /// Sent as `Idempotency-Key` (the `ids` scenario).
    pub idempotency_key: Option<String>,
}

impl Req {
    pub fn get(path: String) -> Req {
        Req {
            method: Method::GET,
            path,
            body: Bytes::new(),
            content_type: None,
            idempotency_key: None,
        }
    }

    pub fn post(path: String, body: Bytes) -> Req {
        Req {
            method: Method::POST,
            path,
            body,
            content_type: Some("application/json"),
            idempotency_key: None,
        }
    }
}

/// One keep-alive connection; requests on it are sequential.
pub struct Conn {
    sender: http1::SendRequest<Full<Bytes>>,
    host: String,
}

impl Conn {
    pub async fn connect(addr: SocketAddr) -> Result<Conn, String> {
        let stream = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect {addr}: {e}"))?;
        stream.set_nodelay(true).map_err(|e| e.to_string())?;
        let (sender, conn) = http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| format!("handshake {addr}: {e}"))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(Conn {
            sender,
            host: addr.to_string(),
        })
    }

    /// Sends one request and reads the whole answer.
    pub async fn send(&mut self, req: &Req) -> Result<(u16, Bytes), String> {
        self.sender.ready().await.map_err(|e| e.to_string())?;
        let mut b = Request::builder()
            .method(req.method.clone())
            .uri(req.path.as_str())
            .header(header::HOST, self.host.as_str());
        if let Some(ct) = req.content_type {
            b = b.header(header::CONTENT_TYPE, ct);
        }
        if let Some(key) = &req.idempotency_key {
            b = b.header("idempotency-key", key.as_str());
        }
        let request = b
            .body(Full::new(req.body.clone()))
            .map_err(|e| e.to_string())?;
        let resp = self
            .sender
            .send_request(request)
            .await
            .map_err(|e| e.to_string())?;
        let status = resp.status().as_u16();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        Ok((status, body))
    }
}

/// The baseline server: hyper's HTTP/1.1 server answering every request
/// with 200 and the body the proxy would send, after reading the request
/// body. Nothing else: no routing, no parsing, no metrics.
pub async fn serve_bare(listener: TcpListener) {
    const ANSWER: &[u8] = br#"{"accepted":1,"ack":"buffered"}"#;
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        tokio::spawn(async move {
            let service = hyper::service::service_fn(|req: Request<Incoming>| async move {
                let _ = req.into_body().collect().await;
                let mut resp = Response::new(Full::new(Bytes::from_static(ANSWER)));
                resp.headers_mut().insert(
                    header::CONTENT_TYPE,
                    header::HeaderValue::from_static("application/json"),
                );
                Ok::<_, Infallible>(resp)
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}
