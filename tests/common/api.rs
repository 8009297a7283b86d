//! A real `lume serve` in a network namespace and its JSON API, for the
//! API tests (tests/api.rs) and lume's compatibility suite (compat_*.rs).

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::{Home, Netns, lume_bin};

/// A `lume serve` process inside a namespace, on a port it picked itself.
pub struct Server {
    pub child: Child,
    pub port: u16,
    pub log: Arc<Mutex<String>>,
}

impl Server {
    pub fn start(ns: &Netns, home: &Home, extra: &[&str], env: &[(&str, &str)]) -> Self {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &ns.name])
            .arg(lume_bin())
            .args(["serve", "--port", "0"])
            .args(extra);
        home.env(&mut c);
        for (k, v) in env {
            c.env(k, v);
        }
        let mut child = c
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = mpsc::channel();
        let log2 = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(rest) = line.split("listening on http://").nth(1) {
                    let port = rest.split([' ', '(']).next().unwrap().rsplit(':').next();
                    let _ = tx.send(port.unwrap().parse::<u16>().unwrap());
                }
                let mut l = log2.lock().unwrap();
                l.push_str(&line);
                l.push('\n');
            }
        });
        let port = rx
            .recv_timeout(Duration::from_secs(20))
            .unwrap_or_else(|_| {
                panic!("lume serve did not start: {}", log.lock().unwrap());
            });
        Self { child, port, log }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// SIGTERM, then waits for the exit.
    pub fn stop(mut self) -> ExitStatus {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "lume serve did not stop on SIGTERM: {}",
                self.log.lock().unwrap()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A reply: status and JSON body.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub body: Value,
    /// The `Lume-Power-Method` header of stop, shutdown and restart.
    pub power_method: Option<String>,
}

/// One HTTP request from inside the namespace.
pub fn http(
    ns: &Netns,
    method: &str,
    url: &str,
    token: Option<&str>,
    body: Option<Vec<u8>>,
) -> Reply {
    let (method, url, token) = (method.to_string(), url.to_string(), token.map(String::from));
    ns.within(move || {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(180)))
            .build()
            .into();
        let mut req = ureq::http::Request::builder()
            .method(method.as_str())
            .uri(&url);
        if let Some(t) = &token {
            req = req.header("Authorization", format!("Bearer {t}"));
        }
        let result = match body {
            Some(b) => agent.run(
                req.header("Content-Type", "application/json")
                    .body(b)
                    .unwrap(),
            ),
            None => agent.run(req.body(()).unwrap()),
        };
        let mut resp = result.unwrap_or_else(|e| panic!("{method} {url}: {e}"));
        let power_method = resp
            .headers()
            .get("lume-power-method")
            .and_then(|v| v.to_str().ok())
            .map(String::from);
        let text = resp.body_mut().read_to_string().unwrap();
        let body = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("{method} {url}: not JSON ({e}): {text:?}"));
        Reply {
            status: resp.status().as_u16(),
            body,
            power_method,
        }
    })
}

/// The API of one server.
pub struct Api<'a> {
    pub ns: &'a Netns,
    pub server: &'a Server,
    pub token: Option<String>,
}

impl<'a> Api<'a> {
    pub fn new(ns: &'a Netns, server: &'a Server) -> Self {
        Self {
            ns,
            server,
            token: None,
        }
    }

    pub fn call(&self, method: &str, path: &str, body: Option<Value>) -> Reply {
        http(
            self.ns,
            method,
            &self.server.url(path),
            self.token.as_deref(),
            body.map(|b| serde_json::to_vec(&b).unwrap()),
        )
    }

    pub fn get(&self, path: &str) -> Reply {
        self.call("GET", path, None)
    }

    pub fn post(&self, path: &str, body: Value) -> Reply {
        self.call("POST", path, Some(body))
    }

    pub fn raw(&self, method: &str, path: &str, body: &[u8]) -> Reply {
        http(
            self.ns,
            method,
            &self.server.url(path),
            self.token.as_deref(),
            Some(body.to_vec()),
        )
    }

    /// Asserts the status and an error message containing `needle`.
    pub fn fails(&self, reply: Reply, status: u16, needle: &str) {
        assert_eq!(reply.status, status, "{reply:?}");
        let msg = reply.body["message"].as_str().unwrap_or_else(|| {
            panic!("an error without a message: {reply:?}");
        });
        assert!(msg.contains(needle), "{msg:?} should contain {needle:?}");
    }
}
