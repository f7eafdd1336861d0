//! The web dashboard in a real headless Chromium (Debian's `chromium` and `chromium-driver`,
//! driven over WebDriver with fantoccini) against a real `escale serve` and Docker: log in,
//! create an app, deploy the fixture image, scale to 3 and watch the instances appear without
//! reloading, set a config var, roll back, watch a log line arrive, log out. Every page is
//! screenshotted into `target/tmp/screenshots/` (desktop and 360 px wide), and the browser's
//! console must hold no error (a CSP violation is one).

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::fixture_image;
use crate::support::server::TestServer;

const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
const CHROMIUM: &str = "/usr/bin/chromium";
const XSS: &str = "<script>alert(1)</script>";

/// chromedriver, killed (by its own pid) when dropped.
struct Driver {
    child: Child,
    url: String,
}

impl Driver {
    async fn start() -> Driver {
        assert!(
            std::path::Path::new(CHROMEDRIVER).exists() && std::path::Path::new(CHROMIUM).exists(),
            "the dashboard tests need Debian's chromium and chromium-driver \
             (scripts/test installs them: apt-get install chromium chromium-driver)"
        );
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let child = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver starts");
        let driver = Driver {
            child,
            url: format!("http://127.0.0.1:{port}"),
        };
        // Ready when it accepts connections.
        let deadline = Instant::now() + Duration::from_secs(20);
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            assert!(Instant::now() < deadline, "chromedriver did not listen");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        driver
    }

    async fn browser(&self) -> Client {
        let mut caps = serde_json::Map::new();
        caps.insert(
            "goog:chromeOptions".into(),
            json!({
                "binary": CHROMIUM,
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                         "--window-size=1280,1000", "--no-first-run", "--disable-extensions"],
            }),
        );
        caps.insert("goog:loggingPrefs".into(), json!({"browser": "ALL"}));
        caps.insert("unhandledPromptBehavior".into(), json!("ignore"));
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        ClientBuilder::new(connector)
            .capabilities(caps)
            .connect(&self.url)
            .await
            .expect("a WebDriver session")
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// chromedriver's browser log (`POST /session/{id}/se/log`): what the console got since the
/// last read.
#[derive(Debug)]
struct BrowserLog;

impl fantoccini::wd::WebDriverCompatibleCommand for BrowserLog {
    fn endpoint(
        &self,
        base_url: &url::Url,
        session_id: Option<&str>,
    ) -> Result<url::Url, url::ParseError> {
        base_url.join(&format!("session/{}/se/log", session_id.unwrap_or("")))
    }

    fn method_and_body(&self, _: &url::Url) -> (http::Method, Option<String>) {
        (http::Method::POST, Some(r#"{"type":"browser"}"#.into()))
    }
}

/// Console entries at level SEVERE, or mentioning the Content Security Policy.
async fn console_errors(c: &Client) -> Vec<String> {
    let v = c.issue_cmd(BrowserLog).await.expect("the browser log");
    v.as_array()
        .into_iter()
        .flatten()
        .filter(|e| {
            let msg = e["message"].as_str().unwrap_or("");
            e["level"] == "SEVERE" || msg.contains("Content Security Policy")
        })
        .map(|e| e.to_string())
        .collect()
}

fn screenshots_dir() -> PathBuf {
    let d = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("screenshots");
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Screenshots the page at desktop width and at 360 px, then back to desktop.
async fn shoot(c: &Client, name: &str) {
    let dir = screenshots_dir();
    let png = c.screenshot().await.expect("screenshot");
    std::fs::write(dir.join(format!("{name}.png")), png).unwrap();
    c.set_window_size(360, 800).await.unwrap();
    let png = c.screenshot().await.expect("screenshot");
    std::fs::write(dir.join(format!("{name}-360px.png")), png).unwrap();
    // Readable at 360 px: nothing makes the page scroll sideways.
    let wide: Value = c
        .execute(
            "return document.documentElement.scrollWidth - document.documentElement.clientWidth;",
            vec![],
        )
        .await
        .unwrap();
    assert!(
        wide.as_i64().unwrap_or(0) <= 1,
        "{name} scrolls sideways by {wide} px at 360 px"
    );
    c.set_window_size(1280, 1000).await.unwrap();
}

/// Runs `script` in the page until it returns something truthy other than `false`/`0`.
async fn until(c: &Client, what: &str, limit: Duration, script: &str) -> Value {
    let deadline = Instant::now() + limit;
    loop {
        let v = c.execute(script, vec![]).await.unwrap_or(Value::Null);
        let done = match &v {
            Value::Null | Value::Bool(false) => false,
            Value::Number(n) => n.as_f64() != Some(0.0),
            Value::String(s) => !s.is_empty(),
            _ => true,
        };
        if done {
            return v;
        }
        if Instant::now() > deadline {
            let body: Value = c
                .execute("return document.body.innerText;", vec![])
                .await
                .unwrap_or(Value::Null);
            panic!("timed out after {limit:?} waiting for {what}; the page says:\n{body}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Whether a WebDriver error is an element that a live refresh replaced after it was found.
fn stale(e: &fantoccini::error::CmdError) -> bool {
    matches!(
        e,
        fantoccini::error::CmdError::Standard(w)
            if w.error == fantoccini::error::ErrorStatus::StaleElementReference
    )
}

/// Fills `selector` with `text` (cleared first). Live regions are swapped in by the page's
/// script: an element found just before its region was refreshed is found again.
async fn fill(c: &Client, selector: &str, text: &str) {
    for attempt in 0.. {
        let e = c
            .find(Locator::Css(selector))
            .await
            .unwrap_or_else(|e| panic!("{selector}: {e}"));
        let r = match e.clear().await {
            Ok(()) => e.send_keys(text).await,
            Err(err) => Err(err),
        };
        match r {
            Ok(()) => return,
            Err(e) if stale(&e) && attempt < 5 => continue,
            Err(e) => panic!("{selector}: {e}"),
        }
    }
}

/// Clicks `selector` (found again if a live refresh replaced it meanwhile).
async fn click(c: &Client, selector: &str) {
    for attempt in 0.. {
        let r = c
            .find(Locator::Css(selector))
            .await
            .unwrap_or_else(|e| panic!("{selector}: {e}"))
            .click()
            .await;
        match r {
            Ok(()) => return,
            Err(e) if stale(&e) && attempt < 5 => continue,
            Err(e) => panic!("{selector}: {e}"),
        }
    }
}

/// Accepts the confirm dialog a button opened.
async fn accept_confirm(c: &Client) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while c.get_alert_text().await.is_err() {
        assert!(Instant::now() < deadline, "no confirm dialog opened");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    c.accept_alert().await.unwrap();
}

/// An expression: the healthy instance rows on the page.
const HEALTHY_ROWS: &str = "Array.from(document.querySelectorAll('#instances tr.instance'))\
    .filter(r => r.querySelector('.badge.healthy')).length";

/// One request to `addr`, with a raw request target.
async fn raw_request(addr: &str, host: &str, target: &str) -> String {
    let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!("GET {target} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    conn.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    let _ = conn.read_to_end(&mut out).await;
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn the_dashboard_drives_an_app_live_in_a_real_browser() {
    let image = fixture_image().await;
    let s = TestServer::start(&[]).await;
    let driver = Driver::start().await;
    let c = driver.browser().await;
    let base = s.api.clone();
    let app = format!("dash{}", &s.installation[s.installation.len() - 6..]);

    // Log in.
    c.goto(&format!("{base}/")).await.unwrap();
    until(
        &c,
        "the login page",
        Duration::from_secs(10),
        "return location.pathname === '/login';",
    )
    .await;
    shoot(&c, "01-login").await;
    fill(&c, "#name", "admin").await;
    fill(&c, "#password", "test-password-1").await;
    click(&c, "form.login button[type=submit]").await;
    until(
        &c,
        "the overview",
        Duration::from_secs(10),
        "return location.pathname === '/' && !!document.querySelector('#apps');",
    )
    .await;
    shoot(&c, "02-apps-empty").await;

    // Create an app: its page says how to deploy it.
    fill(&c, "#app-name", &app).await;
    click(&c, "section[aria-labelledby=new-app] button[type=submit]").await;
    let path = format!("/apps/{app}");
    until(
        &c,
        "the app page",
        Duration::from_secs(10),
        &format!("return location.pathname === '{path}';"),
    )
    .await;
    let text: Value = c
        .execute("return document.body.innerText;", vec![])
        .await
        .unwrap();
    assert!(
        text.as_str().unwrap().contains(&format!(
            "git remote add escale http://{}/git/{app}.git",
            base.trim_start_matches("http://")
        )),
        "{text}"
    );
    shoot(&c, "03-app-new").await;

    // Deploy the fixture image; its instance shows up healthy on the page.
    fill(&c, "#deploy-image", image).await;
    click(&c, "section[aria-labelledby=deploy-h] button[type=submit]").await;
    until(
        &c,
        "one healthy instance",
        Duration::from_secs(60),
        &format!("return location.pathname === '{path}' && ({HEALTHY_ROWS}) >= 1;"),
    )
    .await;

    // Scale to 3: after the form's own redirect, the page is not reloaded again, and the
    // instances appear as the events arrive.
    c.execute(
        "document.querySelector('#scale-web').value = ''; return true;",
        vec![],
    )
    .await
    .unwrap();
    fill(&c, "#scale-web", "3").await;
    c.execute("window.__beforeScale = 'yes'; return true;", vec![])
        .await
        .unwrap();
    click(&c, "form.scale button[type=submit]").await;
    until(&c, "the page after scaling", Duration::from_secs(10), &format!(
        "return !window.__beforeScale && location.pathname === '{path}' && document.readyState === 'complete' \
         && document.querySelector('#scale-web').value === '3';")).await;
    c.execute("window.__sameDocument = 'yes'; return true;", vec![])
        .await
        .unwrap();
    let started = Instant::now();
    until(
        &c,
        "three healthy instances",
        Duration::from_secs(60),
        &format!("return ({HEALTHY_ROWS}) === 3;"),
    )
    .await;
    let seen_after = started.elapsed();
    let same: Value = c
        .execute("return window.__sameDocument || null;", vec![])
        .await
        .unwrap();
    assert_eq!(same, json!("yes"), "the page was reloaded");
    let updated: Value = c
        .execute(
            "return document.querySelector('#instances').getAttribute('data-updated');",
            vec![],
        )
        .await
        .unwrap();
    assert!(
        updated.is_string(),
        "the instances region was swapped in live"
    );
    // The latency of the page: from each event's publication to its line in the activity
    // list (same machine clock).
    let latencies: Value = c
        .execute(
            "return Array.from(document.querySelectorAll('#activity li'))\
             .map(li => Number(li.getAttribute('data-seen')) - Number(li.getAttribute('data-at')));",
            vec![],
        )
        .await
        .unwrap();
    let lat: Vec<i64> = latencies
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_i64)
        .collect();
    assert!(!lat.is_empty(), "events reached the activity list");
    println!(
        "dashboard: 3 instances healthy on the page {seen_after:?} after the scale form's redirect; \
         event -> page latency over {} events: max {} ms, median {} ms",
        lat.len(),
        lat.iter().max().unwrap(),
        { let mut l = lat.clone(); l.sort(); l[l.len() / 2] }
    );
    shoot(&c, "04-app-3-instances").await;

    // Set a config var whose value is markup: shown as text, never run.
    fill(&c, "#cfg-key", "GREETING").await;
    fill(&c, "#cfg-value", XSS).await;
    click(
        &c,
        "section[aria-labelledby=config-h] form.inline button[type=submit]",
    )
    .await;
    until(&c, "the config var", Duration::from_secs(10), "return Array.from(document.querySelectorAll('table.config code')).some(e => e.textContent === '<script>alert(1)</script>');").await;
    assert!(c.get_alert_text().await.is_err(), "no script ran");
    let scripts: Value = c
        .execute(
            "return document.querySelectorAll('main script').length;",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(scripts, json!(0));
    // The config change is release v2; wait for it to serve, then roll back to v1.
    until(&c, "v2 serving on 3 instances", Duration::from_secs(60),
        "return Array.from(document.querySelectorAll('#instances tr.instance')).filter(r => r.querySelector('.badge.healthy') && r.textContent.includes('v2')).length === 3;").await;
    c.refresh().await.unwrap();
    click(
        &c,
        "table.releases form button[data-confirm='Roll back to v1?']",
    )
    .await;
    accept_confirm(&c).await;
    until(&c, "the rollback release v3", Duration::from_secs(10),
        "return Array.from(document.querySelectorAll('table.releases tr')).some(r => r.textContent.includes('v3') && r.textContent.includes('rollback'));").await;
    until(&c, "v3 serving on 3 instances", Duration::from_secs(60),
        "return Array.from(document.querySelectorAll('#instances tr.instance')).filter(r => r.querySelector('.badge.healthy') && r.textContent.includes('v3')).length === 3;").await;
    shoot(&c, "05-app-rolled-back").await;

    // A log line arrives: a request whose path is markup, logged by the app, shown as text.
    c.refresh().await.unwrap();
    until(
        &c,
        "the log stream's first lines",
        Duration::from_secs(20),
        "return document.querySelectorAll('#logs .line').length > 0;",
    )
    .await;
    // The proxy refuses a raw `<` in a request target (rightly), so the markup is written as
    // entities: shown as text they stay `&lt;...&gt;`; parsed as HTML they would become a tag.
    let proxy = s.proxy.clone().expect("the proxy listens");
    let payload = "/logged&lt;img&gt;&amp;&quot;";
    let answer = raw_request(&proxy, &format!("{app}.localhost"), payload).await;
    assert!(answer.starts_with("HTTP/1.1 404"), "{answer}");
    until(&c, "the log line", Duration::from_secs(20), &format!(
        "return Array.from(document.querySelectorAll('#logs .line')).some(l => l.textContent.includes('{payload}'));")).await;
    let scripts: Value = c
        .execute(
            "return document.querySelectorAll('#logs script').length;",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(scripts, json!(0), "the log line is text");
    assert!(c.get_alert_text().await.is_err(), "no script ran");
    // The filter keeps matching lines only.
    fill(&c, "#log-filter", "/logged").await;
    let imgs: Value = c
        .execute(
            "return document.querySelectorAll('#logs img').length;",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(imgs, json!(0), "the log line is text");
    let hidden: Value = c
        .execute("return Array.from(document.querySelectorAll('#logs .line')).filter(l => !l.hidden).every(l => l.textContent.includes('/logged'));", vec![])
        .await
        .unwrap();
    assert_eq!(hidden, json!(true));
    shoot(&c, "06-app-logs").await;

    // The other pages.
    for (path, name, ready) in [
        ("/", "07-apps", "#apps table"),
        ("/nodes", "08-nodes", "main h1"),
        ("/events", "09-events", "table.events"),
        ("/account", "10-account", "#tokens-h"),
    ] {
        c.goto(&format!("{base}{path}")).await.unwrap();
        until(
            &c,
            path,
            Duration::from_secs(10),
            &format!("return !!document.querySelector('{ready}');"),
        )
        .await;
        shoot(&c, name).await;
    }
    c.goto(&format!("{base}/")).await.unwrap();
    let overview = until(
        &c,
        "the overview's table",
        Duration::from_secs(10),
        "const e = document.querySelector('#apps table'); return e ? e.innerText : '';",
    )
    .await;
    assert!(overview.as_str().unwrap().contains(&app), "{overview}");
    assert!(overview.as_str().unwrap().contains("3/3"), "{overview}");

    // Create a token: shown once.
    c.goto(&format!("{base}/account")).await.unwrap();
    fill(&c, "#token-name", "from-the-browser").await;
    click(
        &c,
        "section[aria-labelledby=tokens-h] form.inline button[type=submit]",
    )
    .await;
    let token: Value = until(
        &c,
        "the new token",
        Duration::from_secs(10),
        "const e = document.querySelector('#new-token'); return e ? e.textContent : '';",
    )
    .await;
    assert!(token.as_str().unwrap().starts_with("esc_"));

    // Log out: the session is gone; the pages send us to the login.
    click(&c, "form.logout button[type=submit]").await;
    until(
        &c,
        "the login page after logout",
        Duration::from_secs(10),
        "return location.pathname === '/login';",
    )
    .await;
    c.goto(&format!("{base}{path}")).await.unwrap();
    until(
        &c,
        "the login page",
        Duration::from_secs(10),
        "return location.pathname === '/login';",
    )
    .await;

    let errors = console_errors(&c).await;
    assert!(
        errors.is_empty(),
        "console errors (CSP violations included): {errors:#?}"
    );
    c.close().await.unwrap();
    drop(driver);
}

/// One HTTP/1.1 exchange on a new connection (`Connection: close`); the whole answer.
async fn http(addr: &str, head: &str, body: &str) -> String {
    let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!(
        "{head}\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    conn.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    conn.read_to_end(&mut out).await.unwrap();
    String::from_utf8_lossy(&out).into_owned()
}

/// Logs in through the login form over plain HTTP; the `Cookie` header of the session.
async fn form_login(addr: &str, name: &str, password: &str) -> String {
    let page = http(addr, "GET /login HTTP/1.1", "").await;
    let cookie = page
        .lines()
        .find_map(|l| l.strip_prefix("set-cookie: escale_login="))
        .and_then(|v| v.split(';').next())
        .expect("the login cookie")
        .to_string();
    let token = page
        .split("name=\"login_token\" value=\"")
        .nth(1)
        .and_then(|r| r.split('"').next())
        .expect("the login token");
    let body = format!("login_token={token}&name={name}&password={password}");
    let answer = http(
        addr,
        &format!(
            "POST /login HTTP/1.1\r\nOrigin: http://{addr}\r\nCookie: escale_login={cookie}\r\n\
             Content-Type: application/x-www-form-urlencoded"
        ),
        &body,
    )
    .await;
    let session = answer
        .lines()
        .find_map(|l| l.strip_prefix("set-cookie: escale_session="))
        .and_then(|v| v.split(';').next())
        .unwrap_or_else(|| panic!("no session: {answer}"));
    format!("escale_session={session}")
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap()
}

/// For `scripts/bench-dashboard`: the resident memory of an idle `escale serve` with 20
/// dashboard pages open (each an app page: its event stream and its log stream), against the
/// same server with none; the app runs one instance of the fixture.
#[tokio::test]
#[ignore = "a measurement, run by scripts/bench-dashboard"]
async fn bench_dashboard_idle_rss() {
    let image = fixture_image().await;
    let s = TestServer::start(&[]).await;
    let app = format!("rss{}", &s.installation[s.installation.len() - 6..]);
    s.ok(&["apps", "create", &app]);
    s.ok(&["deploy", &app, "--image", image]);
    let addr = s.api.trim_start_matches("http://").to_string();
    let cookie = form_login(&addr, "admin", "test-password-1").await;
    let pid = s.pid().expect("the server runs");
    // Settle: the page itself rendered once.
    let page = http(
        &addr,
        &format!("GET /apps/{app} HTTP/1.1\r\nCookie: {cookie}"),
        "",
    )
    .await;
    assert!(page.starts_with("HTTP/1.1 200"), "{page}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = rss_kib(pid);
    let mut streams = Vec::new();
    for _ in 0..20 {
        for path in [format!("/live?app={app}"), format!("/apps/{app}/logs/live")] {
            let mut conn = tokio::net::TcpStream::connect(&addr).await.unwrap();
            let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nCookie: {cookie}\r\n\r\n");
            conn.write_all(req.as_bytes()).await.unwrap();
            let mut buf = vec![0u8; 4096];
            let n = conn.read(&mut buf).await.unwrap();
            let head = String::from_utf8_lossy(&buf[..n]);
            assert!(head.starts_with("HTTP/1.1 200"), "{head}");
            streams.push(conn);
        }
    }
    tokio::time::sleep(Duration::from_secs(5)).await;
    let after = rss_kib(pid);
    println!(
        "escale serve RSS: {before} KiB idle, {after} KiB with 20 dashboard pages \
         ({} SSE streams: events + logs each), {} KiB per page",
        streams.len(),
        (after.saturating_sub(before)) / 20
    );
}
