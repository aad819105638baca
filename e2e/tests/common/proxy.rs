//! A TCP proxy in front of the API server that a test can cut: one node's link to the API
//! server. Cutting drops every open connection and every new one until healed.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use tokio::task::AbortHandle;

pub struct CutProxy {
    pub addr: SocketAddr,
    cut: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<AbortHandle>>>,
    accept: AbortHandle,
}

impl CutProxy {
    /// Listens on 127.0.0.1 (the serving certificate's address) and forwards to `upstream`.
    pub async fn start(upstream: SocketAddr) -> CutProxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the proxy");
        let addr = listener.local_addr().expect("the proxy's address");
        let cut = Arc::new(AtomicBool::new(false));
        let conns: Arc<Mutex<Vec<AbortHandle>>> = Arc::default();
        let accept = {
            let (cut, conns) = (cut.clone(), conns.clone());
            tokio::spawn(async move {
                while let Ok((mut down, _)) = listener.accept().await {
                    if cut.load(Ordering::SeqCst) {
                        continue;
                    }
                    let task = tokio::spawn(async move {
                        if let Ok(mut up) = tokio::net::TcpStream::connect(upstream).await {
                            let _ = tokio::io::copy_bidirectional(&mut down, &mut up).await;
                        }
                    });
                    conns.lock().expect("lock").push(task.abort_handle());
                }
            })
            .abort_handle()
        };
        CutProxy {
            addr,
            cut,
            conns,
            accept,
        }
    }

    pub fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        for c in self.conns.lock().expect("lock").drain(..) {
            c.abort();
        }
    }

    pub fn heal(&self) {
        self.cut.store(false, Ordering::SeqCst);
    }

    /// A copy of `kubeconfig` (in `dir`, named `name`) that talks to the API server through this
    /// proxy.
    pub fn kubeconfig(
        &self,
        kubeconfig: &Path,
        server_url: &str,
        dir: &Path,
        name: &str,
    ) -> PathBuf {
        let text = std::fs::read_to_string(kubeconfig).expect("read the kubeconfig");
        assert!(
            text.contains(server_url),
            "the kubeconfig names {server_url}"
        );
        let out = dir.join(name);
        std::fs::write(
            &out,
            text.replace(server_url, &format!("https://{}", self.addr)),
        )
        .expect("write the proxied kubeconfig");
        out
    }
}

impl Drop for CutProxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut();
    }
}
