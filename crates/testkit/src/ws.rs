//! A WebSocket backend: it echoes every text and binary message back and
//! records each handshake it saw, so tests can check what reached it
//! through thr's tunnel. A handshake whose target has `?status=N` is refused
//! with status N, a short body and `X-Refused: yes` (a backend that does not
//! take the upgrade there).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, UnixListener};
use tokio::task::{JoinHandle, JoinSet};
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};

/// A handshake as the backend saw it.
#[derive(Debug, Clone)]
pub struct Handshake {
    /// Raw request target (path and query).
    pub target: String,
    /// Header fields in received order.
    pub headers: Vec<(String, Vec<u8>)>,
}

impl Handshake {
    /// First value of header `name`, as text.
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
    }
}

#[derive(Default)]
struct State {
    handshakes: Mutex<Vec<Handshake>>,
    /// WebSocket connections open now.
    open: AtomicUsize,
}

/// A running echo backend; stops (closing its connections) when dropped.
pub struct EchoBackend {
    addr: Option<SocketAddr>,
    unix: Option<PathBuf>,
    state: Arc<State>,
    task: JoinHandle<()>,
}

impl EchoBackend {
    /// Starts one on 127.0.0.1, on a free port.
    pub async fn start() -> EchoBackend {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind ws backend");
        let addr = listener.local_addr().expect("ws backend address");
        let state = Arc::new(State::default());
        let task = tokio::spawn(accept_loop(Listener::Tcp(listener), state.clone()));
        EchoBackend {
            addr: Some(addr),
            unix: None,
            state,
            task,
        }
    }

    /// Starts one on the unix socket `path`.
    pub async fn start_unix(path: PathBuf) -> EchoBackend {
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path).expect("bind ws backend unix socket");
        let state = Arc::new(State::default());
        let task = tokio::spawn(accept_loop(Listener::Unix(listener), state.clone()));
        EchoBackend {
            addr: None,
            unix: Some(path),
            state,
            task,
        }
    }

    /// `http://127.0.0.1:PORT` or `unix:/path`: what a `[[queues]] backend` takes.
    pub fn url(&self) -> String {
        match (&self.unix, self.addr) {
            (Some(path), _) => format!("unix:{}", path.display()),
            (None, Some(addr)) => format!("http://{addr}"),
            (None, None) => unreachable!("a backend listens somewhere"),
        }
    }

    /// Every handshake so far (accepted or refused), in order.
    pub fn handshakes(&self) -> Vec<Handshake> {
        self.state.handshakes.lock().expect("lock").clone()
    }

    /// WebSocket connections open now.
    pub fn open(&self) -> usize {
        self.state.open.load(Ordering::SeqCst)
    }
}

impl Drop for EchoBackend {
    fn drop(&mut self) {
        self.task.abort();
        if let Some(path) = &self.unix {
            let _ = std::fs::remove_file(path);
        }
    }
}

enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener),
}

/// Accepts until aborted; the connections' tasks end with it.
async fn accept_loop(listener: Listener, state: Arc<State>) {
    let mut connections = JoinSet::new();
    loop {
        while connections.try_join_next().is_some() {}
        let accepted = match &listener {
            Listener::Tcp(l) => l
                .accept()
                .await
                .map(|(s, _)| connections.spawn(echo(s, state.clone()))),
            Listener::Unix(l) => l
                .accept()
                .await
                .map(|(s, _)| connections.spawn(echo(s, state.clone()))),
        };
        if accepted.is_err() {
            return;
        }
    }
}

async fn echo<S>(stream: S, state: Arc<State>)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    // The callback's type is tungstenite's.
    #[allow(clippy::result_large_err)]
    let record = |req: &Request, response: Response| {
        state.handshakes.lock().expect("lock").push(Handshake {
            target: req
                .uri()
                .path_and_query()
                .map_or_else(String::new, |p| p.to_string()),
            headers: req
                .headers()
                .iter()
                .map(|(n, v)| (n.as_str().to_string(), v.as_bytes().to_vec()))
                .collect(),
        });
        match refusal(req.uri().query()) {
            Some(refused) => Err(refused),
            None => Ok(response),
        }
    };
    let Ok(mut ws) = tokio_tungstenite::accept_hdr_async(stream, record).await else {
        return;
    };
    state.open.fetch_add(1, Ordering::SeqCst);
    while let Some(Ok(message)) = ws.next().await {
        // Pings are answered and closes completed by tungstenite itself.
        if (message.is_text() || message.is_binary()) && ws.send(message).await.is_err() {
            break;
        }
    }
    state.open.fetch_sub(1, Ordering::SeqCst);
}

/// The answer to a handshake with `status=N` in its query.
fn refusal(query: Option<&str>) -> Option<ErrorResponse> {
    let status: u16 = query?
        .split('&')
        .find_map(|kv| kv.strip_prefix("status="))?
        .parse()
        .ok()?;
    let body = format!("refused with {status}\n");
    let response = http::Response::builder()
        .status(status)
        .header("x-refused", "yes")
        .header("content-type", "text/plain")
        .header("content-length", body.len())
        .body(Some(body))
        .expect("a refusal");
    Some(response)
}
