//! The storefront scenario end to end: one real sessiond (on a manual clock, so the idle
//! timeout is reached by moving time, not by sleeping) and three storefront instances on
//! their own ports: three Rust ones, then Rust and Flask (the Python client) side by side.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{json, Value};
use sessiond::clock::Clock;
use sessiond::config::Config;
use sessiond::server::Daemon;
use sessiond_client::SessionClient;

/// The idle timeout the storefronts give new sessions.
const IDLE: Duration = Duration::from_secs(600);

async fn sessiond() -> (Daemon, Clock) {
    let clock = Clock::manual(1_750_000_000_000);
    let config = Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        admin_listen: "127.0.0.1:0".parse().unwrap(),
        persist: false,
        ..Config::default()
    };
    (Daemon::start(config, clock.clone()).await.unwrap(), clock)
}

/// A Rust storefront on an ephemeral port: its base URL.
async fn rust_storefront(sessiond: SocketAddr) -> String {
    let client = SessionClient::connect(&format!("http://{sessiond}"))
        .await
        .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let app = storefront::app(client, Some(IDLE)).unwrap();
    tokio::spawn(async move {
        axum::serve(
            listener,
            app.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .await
    });
    url
}

/// A browser: a cookie jar of one cookie, kept by hand (a `__Host-` cookie is `Secure`, which
/// a real jar would not send over the test's plain HTTP).
struct Browser {
    http: reqwest::Client,
    cookie: Option<String>,
    agent: &'static str,
}

/// One answer: status, JSON body, and what it did to the cookie.
struct Answer {
    status: StatusCode,
    body: Value,
    /// It carried a `Set-Cookie` (setting, replacing or clearing).
    touched: bool,
    /// It cleared the cookie.
    cleared: bool,
}

impl Browser {
    fn new(agent: &'static str) -> Self {
        Browser {
            http: reqwest::Client::new(),
            cookie: None,
            agent,
        }
    }

    async fn call(&mut self, method: &str, url: &str, body: Option<Value>) -> Answer {
        let mut req = match method {
            "GET" => self.http.get(url),
            _ => self.http.post(url),
        }
        .header("user-agent", self.agent);
        if let Some(c) = &self.cookie {
            req = req.header("cookie", format!("__Host-sid={c}"));
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        let res = req.send().await.unwrap();
        let touched = res.headers().contains_key("set-cookie");
        let mut cleared = false;
        for v in res.headers().get_all("set-cookie") {
            let v = v.to_str().unwrap();
            assert!(v.starts_with("__Host-sid="), "{v}");
            for attr in ["HttpOnly", "Secure", "SameSite=Lax", "Path=/"] {
                assert!(v.contains(attr), "{v} lacks {attr}");
            }
            let value = v["__Host-sid=".len()..].split(';').next().unwrap();
            if value.is_empty() || v.contains("Max-Age=0") {
                self.cookie = None;
                cleared = true;
            } else {
                self.cookie = Some(value.to_string());
            }
        }
        let status = res.status();
        let body = res.json().await.unwrap_or(Value::Null);
        Answer {
            status,
            body,
            touched,
            cleared,
        }
    }

    async fn add(&mut self, base: &str, sku: &str, qty: u64) -> Answer {
        let url = format!("{base}/cart/items");
        self.call("POST", &url, Some(json!({"sku": sku, "qty": qty})))
            .await
    }

    async fn cart(&mut self, base: &str) -> Answer {
        self.call("GET", &format!("{base}/cart"), None).await
    }

    async fn login(&mut self, base: &str, user: &str) -> Answer {
        let url = format!("{base}/login");
        self.call("POST", &url, Some(json!({ "user": user }))).await
    }
}

/// Every route, with a body that would pass its validation.
const ROUTES: [(&str, &str); 6] = [
    ("POST", "/cart/items"),
    ("GET", "/cart"),
    ("POST", "/login"),
    ("POST", "/logout"),
    ("POST", "/logout-all"),
    ("GET", "/devices"),
];

fn body_for(path: &str) -> Option<Value> {
    match path {
        "/cart/items" => Some(json!({"sku": "late", "qty": 1})),
        "/login" => Some(json!({"user": "mallory"})),
        _ => None,
    }
}

/// A request carrying `dead`, a cookie whose session is gone, to every route of `base`: each
/// answers 401 "session expired" and leaves the cookie alone. The browser may hold a newer
/// cookie by the time the answer arrives (the request left before a login answered), and
/// clearing or replacing "the" cookie would delete that one.
async fn dead_cookie_is_refused_and_left_alone(base: &str, dead: &str) {
    for (method, path) in ROUTES {
        let mut late = Browser::new("late-tab");
        late.cookie = Some(dead.to_string());
        let r = late
            .call(method, &format!("{base}{path}"), body_for(path))
            .await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{method} {path}");
        assert_eq!(
            r.body,
            json!({"error": "session expired"}),
            "{method} {path}"
        );
        assert!(!r.touched, "{method} {path} sent a Set-Cookie");
        assert_eq!(late.cookie.as_deref(), Some(dead));
    }
}

/// The scenario from the session-management texts, across instances `a`, `b` and `c`.
async fn scenario(sessiond: &Daemon, clock: &Clock, [a, b, c]: [&str; 3]) {
    let mut laptop = Browser::new("laptop-browser");

    // A visitor fills a cart on A: an anonymous session.
    let r = laptop.add(a, "apple", 1).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let anonymous = laptop.cookie.clone().expect("a session cookie");

    // Logs in on B: a new ID, the old one dead, the cart carried over.
    let r = laptop.login(b, "alice").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(r.body["cart"], json!({"apple": 1}));
    let logged_in = laptop.cookie.clone().unwrap();
    assert_ne!(logged_in, anonymous, "login must regenerate the ID");

    // Another tab's request, sent with the pre-login cookie before the login answered, answers
    // now: it must not delete the login's cookie.
    for base in [a, b, c] {
        dead_cookie_is_refused_and_left_alone(base, &anonymous).await;
    }

    // Adds more on C and sees the whole cart on A.
    laptop.add(c, "banana", 2).await;
    let r = laptop.cart(a).await;
    assert_eq!(
        r.body,
        json!({"cart": {"apple": 1, "banana": 2}, "user": "alice"})
    );

    // Two tabs of the same session add concurrently, through different instances: no add
    // is lost, even on the same cart line.
    let mut tasks = Vec::new();
    for (tab, base) in [(0, a), (1, b), (2, c), (3, a)] {
        let (base, cookie) = (base.to_string(), laptop.cookie.clone());
        tasks.push(tokio::spawn(async move {
            let mut t = Browser::new("laptop-browser");
            t.cookie = cookie;
            for _ in 0..10 {
                let r = t.add(&base, "pear", 1).await;
                assert_eq!(r.status, StatusCode::OK, "{}", r.body);
                let r = t.add(&base, &format!("tab{tab}"), 1).await;
                assert_eq!(r.status, StatusCode::OK, "{}", r.body);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let cart = laptop.cart(b).await.body["cart"].clone();
    assert_eq!(cart["pear"], 40, "{cart}");
    for tab in 0..4 {
        assert_eq!(cart[format!("tab{tab}")], 10, "{cart}");
    }

    // A second device logs in; the devices page shows both, with what they sent.
    let mut phone = Browser::new("phone-browser");
    phone.login(c, "alice").await;
    let r = laptop.call("GET", &format!("{a}/devices"), None).await;
    let devices = r.body["devices"].as_array().unwrap().clone();
    assert_eq!(devices.len(), 2, "{}", r.body);
    let agents: Vec<&str> = devices
        .iter()
        .map(|d| d["user_agent"].as_str().unwrap())
        .collect();
    assert!(agents.contains(&"laptop-browser") && agents.contains(&"phone-browser"));
    assert!(devices
        .iter()
        .all(|d| d["ip"] == "127.0.0.1" && d["last_seen"].as_u64() > Some(0)));
    assert_eq!(devices.iter().filter(|d| d["current"] == true).count(), 1);

    // "Log out all my devices" from the laptop kills the phone too.
    let r = laptop.call("POST", &format!("{b}/logout-all"), None).await;
    assert_eq!(r.body["destroyed"], 2, "{}", r.body);
    assert!(r.cleared && laptop.cookie.is_none());
    let phone_cookie = phone.cookie.clone().unwrap();
    let r = phone.cart(a).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert!(!r.touched, "a dead session's cookie is left alone");
    dead_cookie_is_refused_and_left_alone(c, &phone_cookie).await;

    // After the idle timeout, the cookie gets 401 and is left alone.
    let mut idle = Browser::new("idle-browser");
    idle.add(b, "plum", 1).await;
    clock.advance(IDLE + Duration::from_secs(1));
    let r = idle.cart(c).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert_eq!(r.body, json!({"error": "session expired"}));
    assert!(!r.touched && idle.cookie.is_some());

    // The pre-login ID, replayed, gets nothing: session fixation is dead.
    let mut attacker = Browser::new("attacker");
    attacker.cookie = Some(anonymous.clone());
    for base in [a, b, c] {
        let r = attacker.cart(base).await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{}", r.body);
        attacker.cookie = Some(anonymous.clone());
    }
    sessiond.store.reap(usize::MAX);
    assert_eq!(
        sessiond.store.stats().sessions,
        0,
        "every session above has ended"
    );
}

/// The report, step by step on one instance: a cart gives cookie A, a login with A gives B,
/// and a request still carrying A gets its 401 without a `Set-Cookie` that would delete B.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_request_with_the_pre_login_cookie_does_not_log_the_user_out() {
    let (daemon, _clock) = sessiond().await;
    let shop = rust_storefront(daemon.grpc_addr).await;
    let mut browser = Browser::new("browser");
    let r = browser.add(&shop, "apple", 1).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let a = browser.cookie.clone().unwrap();
    let r = browser.login(&shop, "alice").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let b = browser.cookie.clone().unwrap();
    assert_ne!(a, b);

    // The late request answers with A in the request and B in the jar.
    browser.cookie = Some(a.clone());
    let r = browser.cart(&shop).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{}", r.body);
    assert!(
        !r.touched,
        "the late answer sent a Set-Cookie: B would be deleted"
    );
    dead_cookie_is_refused_and_left_alone(&shop, &a).await;

    // B still logs the user in.
    browser.cookie = Some(b);
    let r = browser.cart(&shop).await;
    assert_eq!(
        r.body,
        json!({"cart": {"apple": 1}, "user": "alice"}),
        "{}",
        r.body
    );
    daemon.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_rust_storefronts_share_one_sessiond() {
    let (daemon, clock) = sessiond().await;
    let mut urls = Vec::new();
    for _ in 0..3 {
        urls.push(rust_storefront(daemon.grpc_addr).await);
    }
    scenario(&daemon, &clock, [&urls[0], &urls[1], &urls[2]]).await;
    daemon.stop().await.unwrap();
}

/// The repository root.
fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The Flask storefront as a child process, killed on drop.
struct Flask(Child);

impl Drop for Flask {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `examples/storefront-flask` against `sessiond`, after the project's own script has
/// made sure its Python environment exists; returns its base URL.
fn flask_storefront(sessiond: SocketAddr) -> (Flask, String) {
    use std::io::BufRead;
    let setup = root().join("clients/python/setup-env.sh");
    let out = Command::new("bash")
        .arg(&setup)
        .output()
        .expect("run clients/python/setup-env.sh");
    assert!(
        out.status.success(),
        "clients/python/setup-env.sh failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let python = String::from_utf8_lossy(&out.stdout)
        .lines()
        .last()
        .expect("setup-env.sh prints the venv's python")
        .trim()
        .to_string();
    let mut child = Command::new(python)
        .arg(root().join("examples/storefront-flask/app.py"))
        .env("SESSIOND_ADDR", sessiond.to_string())
        .env("PORT", "0")
        .env(
            "STOREFRONT_IDLE_TIMEOUT_SECONDS",
            IDLE.as_secs().to_string(),
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the Flask storefront");
    let stdout = child.stdout.take().unwrap();
    let flask = Flask(child);
    let mut lines = std::io::BufReader::new(stdout).lines();
    let url = loop {
        let line = lines
            .next()
            .expect("the Flask storefront exited before listening")
            .unwrap();
        if let Some(url) = line.strip_prefix("listening on ") {
            break url.trim().to_string();
        }
    };
    // Keep draining its output so it never blocks on a full pipe.
    std::thread::spawn(move || lines.for_each(drop));
    (flask, url)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rust_and_flask_storefronts_share_one_sessiond() {
    let (daemon, clock) = sessiond().await;
    let rust = rust_storefront(daemon.grpc_addr).await;
    let addr = daemon.grpc_addr;
    let (_flask, flask) = tokio::task::spawn_blocking(move || flask_storefront(addr))
        .await
        .unwrap();
    // Every step crosses languages: A and C are Rust, B is Flask.
    scenario(&daemon, &clock, [&rust, &flask, &rust]).await;
    daemon.stop().await.unwrap();
}
