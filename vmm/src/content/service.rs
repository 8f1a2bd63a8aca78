//! The content service: the VMM's own vsock port where the guest asks for
//! content by ID (protocol version 1, `docs/content.md`).
//!
//! ```text
//! guest                                              VMM ("content" thread per connection)
//!   STASIS-CONTENT/1 GET sha256:<hex> [A-B]\n  ───►  checks 1-5, 7, 8; spends a use
//!   STASIS-CONTENT/1 OK <len> <size> <id>\n    ◄───  or: STASIS-CONTENT/1 ERR <code> <word>: <msg>\n
//!   <len bytes>                                ◄───  read, hashed (the whole item), sent
//!   STASIS-CONTENT/1 END OK\n                  ◄───  or END ERR 6 mismatch: … when the hash differs
//! ```
//!
//! The vsock device hands each guest connection to [`ContentService`]
//! (a [`HostService`]) as one end of a Unix stream pair; a thread serves
//! the other end, so a slow item or a slow guest holds up only its own
//! connection. Every request line is bounded ([`MAX_REQUEST_LINE`]), every
//! connection times out when idle ([`IDLE_TIMEOUT`]) or when the guest
//! stops reading ([`WRITE_TIMEOUT`]), at most [`MAX_CONNECTIONS`] are served
//! at once, and requests are rate-limited per VM.

use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use super::grants::{GrantInfo, GrantLimits, Grants};
use super::store::{ItemError, Store, StoreError};
use super::ContentId;
use crate::devices::virtio::vsock::HostService;
use crate::devices::virtio::WarnLimiter;

/// The host port the service listens on unless `--content-port` says
/// otherwise.
pub const DEFAULT_PORT: u32 = 5050;
/// Requests per second a VM may make unless `--content-rate` says
/// otherwise.
pub const DEFAULT_RATE: u32 = 1000;
/// The longest request line, newline included.
pub const MAX_REQUEST_LINE: usize = 256;
/// Connections served at once; more are refused with `rate-limited`.
pub const MAX_CONNECTIONS: usize = 64;
/// A connection with no request for this long is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// A guest that takes no data for this long loses its connection.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(60);
/// The protocol's tag at the start of every line.
const TAG: &str = "STASIS-CONTENT/1";
/// Items are read, hashed and sent in pieces of this size.
const CHUNK: usize = 256 * 1024;

/// Why a request is refused: the code, word and order of the checks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// Not a version-1 request line.
    BadRequest,
    /// The ID is malformed.
    BadId,
    /// Not granted to this VM (or no longer).
    NotGranted,
    /// Not in the store.
    NotFound,
    /// The range is malformed or outside the item.
    BadRange,
    /// The item no longer hashes to its ID.
    Mismatch,
    /// The item is larger than the VM may fetch.
    TooLarge,
    /// Too many requests or connections.
    RateLimited,
    /// The store cannot be read.
    StoreError,
}

impl Refusal {
    /// The number on the wire.
    pub fn code(self) -> u8 {
        match self {
            Refusal::BadRequest => 1,
            Refusal::BadId => 2,
            Refusal::NotGranted => 3,
            Refusal::NotFound => 4,
            Refusal::BadRange => 5,
            Refusal::Mismatch => 6,
            Refusal::TooLarge => 7,
            Refusal::RateLimited => 8,
            Refusal::StoreError => 9,
        }
    }

    /// The word on the wire.
    pub fn word(self) -> &'static str {
        match self {
            Refusal::BadRequest => "bad-request",
            Refusal::BadId => "bad-id",
            Refusal::NotGranted => "not-granted",
            Refusal::NotFound => "not-found",
            Refusal::BadRange => "bad-range",
            Refusal::Mismatch => "mismatch",
            Refusal::TooLarge => "too-large",
            Refusal::RateLimited => "rate-limited",
            Refusal::StoreError => "store-error",
        }
    }
}

/// A refusal and the sentence that goes with it.
type Refused = (Refusal, String);

/// How a VM serves content.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContentConfig {
    /// The store.
    pub store: PathBuf,
    /// The vsock host port.
    pub port: u32,
    /// The largest item the VM may fetch, in bytes.
    pub max_size: Option<u64>,
    /// Requests per second; 0: no limit.
    pub rate: u32,
    /// What is granted from the start.
    pub grants: Vec<(ContentId, GrantLimits)>,
}

impl ContentConfig {
    /// Serving `store` with the defaults and no grants.
    pub fn new(store: PathBuf) -> Self {
        ContentConfig { store, port: DEFAULT_PORT, max_size: None, rate: DEFAULT_RATE, grants: Vec::new() }
    }
}

/// Why the service cannot start or a grant cannot be given.
#[derive(Debug, thiserror::Error)]
pub enum ContentError {
    /// The store cannot be used.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A granted ID is not in the store.
    #[error("cannot grant {0}: the content store {1} has no such item (add it with `stasis content add`)")]
    NotInStore(ContentId, PathBuf),
    /// A granted item cannot be opened.
    #[error("cannot grant {0}")]
    Item(ContentId, #[source] ItemError),
    /// The port is one the guest cannot connect to.
    #[error("invalid content port {0}: it must be 1 to 4294967294")]
    Port(u32),
}

/// The content service of one VM.
pub struct ContentService {
    inner: Arc<Inner>,
}

struct Inner {
    store: Store,
    max_size: Option<u64>,
    grants: Mutex<Grants>,
    rate: Mutex<TokenBucket>,
    active: AtomicUsize,
    warn: Mutex<WarnLimiter>,
}

impl ContentService {
    /// Opens the store and checks that every initial grant is in it.
    pub fn start(config: &ContentConfig) -> Result<ContentService, ContentError> {
        if config.port == 0 || config.port == u32::MAX {
            return Err(ContentError::Port(config.port));
        }
        let store = Store::open(&config.store)?;
        let now = Instant::now();
        let mut grants = Grants::new();
        for (id, limits) in &config.grants {
            check_in_store(&store, id)?;
            grants.grant(*id, *limits, now);
        }
        let inner = Inner {
            store,
            max_size: config.max_size,
            grants: Mutex::new(grants),
            rate: Mutex::new(TokenBucket::new(config.rate, now)),
            active: AtomicUsize::new(0),
            warn: Mutex::new(WarnLimiter::new()),
        };
        Ok(ContentService { inner: Arc::new(inner) })
    }

    /// Grants each of `ids` (all must be in the store; nothing is granted
    /// otherwise).
    pub fn grant(&self, ids: &[ContentId], limits: GrantLimits) -> Result<(), ContentError> {
        for id in ids {
            check_in_store(&self.inner.store, id)?;
        }
        let now = Instant::now();
        let mut grants = lock(&self.inner.grants);
        for id in ids {
            grants.grant(*id, limits, now);
        }
        Ok(())
    }

    /// Takes the grants of `ids` away; the IDs that were not granted.
    pub fn revoke(&self, ids: &[ContentId]) -> Vec<ContentId> {
        let mut grants = lock(&self.inner.grants);
        ids.iter().filter(|id| !grants.revoke(id)).copied().collect()
    }

    /// The live grants.
    pub fn grants(&self) -> Vec<GrantInfo> {
        lock(&self.inner.grants).list(Instant::now())
    }

    /// Serves one connection until it closes (the threads [`HostService::connect`]
    /// starts run this).
    pub fn serve(&self, stream: UnixStream) {
        serve_connection(&self.inner, stream);
    }
}

impl HostService for ContentService {
    fn connect(&self) -> io::Result<UnixStream> {
        let (ours, theirs) = UnixStream::pair()?;
        let active = self.inner.active.fetch_add(1, Ordering::SeqCst);
        if active >= MAX_CONNECTIONS {
            self.inner.active.fetch_sub(1, Ordering::SeqCst);
            let message = format!("{MAX_CONNECTIONS} connections are open already");
            self.inner.refused(Refusal::RateLimited, &message, "a new connection");
            // A short line fits any socket buffer: this does not block.
            let mut theirs = theirs;
            let _ = theirs.write_all(error_line(Refusal::RateLimited, &message).as_bytes());
            return Ok(ours);
        }
        let inner = Arc::clone(&self.inner);
        let spawned = thread::Builder::new().name("content".into()).spawn(move || {
            serve_connection(&inner, theirs);
            inner.active.fetch_sub(1, Ordering::SeqCst);
        });
        if let Err(e) = spawned {
            self.inner.active.fetch_sub(1, Ordering::SeqCst);
            return Err(e);
        }
        Ok(ours)
    }
}

/// Checks that `store` holds `id`, for a grant.
fn check_in_store(store: &Store, id: &ContentId) -> Result<(), ContentError> {
    match store.contains(id) {
        Ok(true) => Ok(()),
        Ok(false) => Err(ContentError::NotInStore(*id, store.root().to_path_buf())),
        Err(e) => Err(ContentError::Item(*id, e)),
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A parsed request.
#[derive(Debug, PartialEq, Eq)]
struct Request {
    id: ContentId,
    /// First byte, and the end (exclusive) if given.
    range: Option<(u64, Option<u64>)>,
}

/// The outcome of serving one request: go on with the next, or close.
enum Next {
    Continue,
    Close,
}

impl Inner {
    /// Logs a refusal on the host (rate-limited: a guest can ask fast).
    fn refused(&self, refusal: Refusal, message: &str, what: &str) {
        lock(&self.warn).warn(format_args!("content: refused {what}: {}: {message}", refusal.word()));
    }
}

fn serve_connection(inner: &Inner, stream: UnixStream) {
    let setup = stream
        .set_read_timeout(Some(IDLE_TIMEOUT))
        .and_then(|()| stream.set_write_timeout(Some(WRITE_TIMEOUT)))
        .and_then(|()| stream.try_clone());
    let mut writer = match setup {
        Ok(writer) => writer,
        Err(e) => {
            log::warn!("content: cannot set up a connection: {e}");
            return;
        }
    };
    let mut reader = BufReader::with_capacity(MAX_REQUEST_LINE * 2, stream);
    let mut line = Vec::with_capacity(MAX_REQUEST_LINE + 1);
    loop {
        line.clear();
        let read = (&mut reader).take(MAX_REQUEST_LINE as u64).read_until(b'\n', &mut line);
        match read {
            Ok(0) => return,
            Ok(_) if line.last() == Some(&b'\n') => {}
            Ok(_) if line.len() >= MAX_REQUEST_LINE => {
                // The rest of the line cannot be told from the next request.
                let message = format!("the request line is longer than {MAX_REQUEST_LINE} bytes");
                inner.refused(Refusal::BadRequest, &message, "a request");
                let _ = writer.write_all(error_line(Refusal::BadRequest, &message).as_bytes());
                close_after_reply(&writer, reader.into_inner());
                return;
            }
            // Half a line, then the guest closed its side.
            Ok(_) => return,
            Err(e) => {
                log::debug!("content: connection ends: {e}");
                return;
            }
        }
        match handle_request(inner, &line, &mut writer) {
            Ok(Next::Continue) => {}
            Ok(Next::Close) => return,
            Err(e) => {
                log::debug!("content: cannot write to the guest: {e}");
                return;
            }
        }
    }
}

/// Ends a connection whose peer may still be sending: closing with unread
/// input would reset it, and the peer could lose the reply. The write side
/// is shut, and the input drained for a moment, up to a bound.
fn close_after_reply(writer: &UnixStream, mut reader: UnixStream) {
    let _ = writer.shutdown(std::net::Shutdown::Write);
    let _ = reader.set_read_timeout(Some(Duration::from_secs(1)));
    let _ = io::copy(&mut (&mut reader).take(1 << 20), &mut io::sink());
}

/// Checks and serves one request line (newline included).
fn handle_request(inner: &Inner, line: &[u8], out: &mut impl Write) -> io::Result<Next> {
    let request = match parse_request(line) {
        Ok(r) => r,
        Err((refusal, message)) => {
            inner.refused(refusal, &message, "a request");
            out.write_all(error_line(refusal, &message).as_bytes())?;
            return Ok(Next::Continue);
        }
    };
    let id = request.id;
    let (file, size, start, end) = match admit(inner, &request) {
        Ok(v) => v,
        Err((refusal, message)) => {
            inner.refused(refusal, &message, &id.to_string());
            out.write_all(error_line(refusal, &message).as_bytes())?;
            return Ok(Next::Continue);
        }
    };
    out.write_all(format!("{TAG} OK {} {size} {id}\n", end - start).as_bytes())?;
    match stream_item(file, size, start, end, &id, out)? {
        Ok(()) => {
            log::info!("content: served {id} bytes {start}-{end} of {size}");
            out.write_all(format!("{TAG} END OK\n").as_bytes())?;
            Ok(Next::Continue)
        }
        Err(Streamed::Mismatch) => {
            let message = format!("content does not match its ID {id}: the store's copy changed since it was added");
            log::error!("content: {message}");
            out.write_all(format!("{TAG} END ERR {} {}: {message}\n", Refusal::Mismatch.code(), Refusal::Mismatch.word()).as_bytes())?;
            Ok(Next::Continue)
        }
        Err(Streamed::CutShort(why)) => {
            // Fewer bytes than announced: the guest sees the connection
            // close early and keeps nothing.
            log::error!("content: cannot read {id} from the store, closing the connection: {why}");
            Ok(Next::Close)
        }
    }
}

/// Checks 3, 4, 5, 7 and 8 in that order and spends a use: the open item,
/// its size and the byte range to send.
fn admit(inner: &Inner, request: &Request) -> Result<(File, u64, u64, u64), Refused> {
    let id = &request.id;
    let now = Instant::now();
    if !lock(&inner.grants).allows(id, now) {
        return Err((Refusal::NotGranted, format!("{id} is not granted to this VM")));
    }
    let (file, size) = match inner.store.open_item(id) {
        Ok(v) => v,
        Err(ItemError::NotFound(_)) => return Err((Refusal::NotFound, format!("the content store has no item {id}"))),
        Err(e) => {
            log::error!("content: {}", crate::error_chain(&e));
            return Err((Refusal::StoreError, format!("the host cannot read {id} from its content store")));
        }
    };
    let (start, end) = match request.range {
        None => (0, size),
        Some((start, end)) => {
            let end = end.unwrap_or(size);
            if start > end || end > size {
                return Err((Refusal::BadRange, format!("range {start}-{end} is outside {id}, which is {size} bytes")));
            }
            (start, end)
        }
    };
    if let Some(max) = inner.max_size.filter(|&max| size > max) {
        return Err((Refusal::TooLarge, format!("{id} is {size} bytes; this VM may fetch items of at most {max} bytes")));
    }
    if !lock(&inner.rate).take(now) {
        return Err((Refusal::RateLimited, "too many requests; try again in a second".to_owned()));
    }
    if !lock(&inner.grants).spend(id, now) {
        return Err((Refusal::NotGranted, format!("{id} is not granted to this VM")));
    }
    Ok((file, size, start, end))
}

/// What went wrong while an item streamed.
enum Streamed {
    /// All bytes went out but they do not hash to the ID.
    Mismatch,
    /// The item could not be read to its end.
    CutShort(String),
}

/// Reads the whole item (`size` bytes), hashing it, and sends bytes
/// `start..end`. The outer error is the guest's stream failing.
fn stream_item(
    mut file: File,
    size: u64,
    start: u64,
    end: u64,
    id: &ContentId,
    out: &mut impl Write,
) -> io::Result<Result<(), Streamed>> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; CHUNK.min(usize::try_from(size).unwrap_or(CHUNK)).max(1)];
    let mut offset = 0u64;
    while offset < size {
        let want = usize::try_from((size - offset).min(buf.len() as u64)).unwrap_or(buf.len());
        let n = match file.read(&mut buf[..want]) {
            Ok(0) => return Ok(Err(Streamed::CutShort(format!("it ended after {offset} of {size} bytes")))),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Ok(Err(Streamed::CutShort(e.to_string()))),
        };
        let piece = &buf[..n];
        hasher.update(piece);
        // The part of this piece inside the range.
        let lo = start.clamp(offset, offset + n as u64) - offset;
        let hi = end.clamp(offset, offset + n as u64) - offset;
        if lo < hi {
            out.write_all(&piece[lo as usize..hi as usize])?;
        }
        offset += n as u64;
    }
    let digest: [u8; 32] = hasher.finalize().into();
    if &digest != id.digest() {
        return Ok(Err(Streamed::Mismatch));
    }
    Ok(Ok(()))
}

/// `STASIS-CONTENT/1 ERR <code> <word>: <message>\n`.
fn error_line(refusal: Refusal, message: &str) -> String {
    format!("{TAG} ERR {} {}: {message}\n", refusal.code(), refusal.word())
}

/// Parses a request line (newline included): checks 1, 2 and the range's
/// syntax.
fn parse_request(line: &[u8]) -> Result<Request, Refused> {
    let bad = |message: String| (Refusal::BadRequest, message);
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    if !line.iter().all(|b| b.is_ascii_graphic() || *b == b' ') {
        return Err(bad("the request line must be printable ASCII".to_owned()));
    }
    // Only ASCII is left, so this cannot fail.
    let line = std::str::from_utf8(line).map_err(|_| bad("the request line must be ASCII".to_owned()))?;
    let words: Vec<&str> = line.split(' ').collect();
    match words.first() {
        Some(&TAG) => {}
        Some(tag) if tag.starts_with("STASIS-CONTENT/") => {
            return Err(bad(format!("protocol version {tag:?} is not spoken here; this host speaks {TAG}")));
        }
        _ => return Err(bad(format!("a request starts with {TAG} (see docs/content.md)"))),
    }
    match words.get(1) {
        Some(&"GET") => {}
        Some(verb) => return Err(bad(format!("unknown request {verb:?}: the only request is GET"))),
        None => return Err(bad(format!("expected `{TAG} GET <id> [A-B]`"))),
    }
    if !(3..=4).contains(&words.len()) {
        return Err(bad(format!("expected `{TAG} GET <id> [A-B]`, got {} words", words.len())));
    }
    let id: ContentId = words[2].parse().map_err(|e: super::BadId| (Refusal::BadId, e.to_string()))?;
    let range = match words.get(3) {
        None => None,
        Some(range) => Some(parse_range(range).ok_or_else(|| {
            (Refusal::BadRange, format!("range {range:?} is not A-B or A- (decimal byte offsets, B excluded)"))
        })?),
    };
    Ok(Request { id, range })
}

/// `A-B` or `A-` with decimal offsets.
fn parse_range(text: &str) -> Option<(u64, Option<u64>)> {
    let (a, b) = text.split_once('-')?;
    let number = |s: &str| -> Option<u64> {
        if s.is_empty() || s.len() > 20 || !s.bytes().all(|c| c.is_ascii_digit()) {
            return None;
        }
        s.parse().ok()
    };
    let start = number(a)?;
    let end = if b.is_empty() { None } else { Some(number(b)?) };
    Some((start, end))
}

/// Requests per second with a burst of one second's worth.
struct TokenBucket {
    rate: u32,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    fn new(rate: u32, now: Instant) -> Self {
        TokenBucket { rate, tokens: f64::from(rate), last: now }
    }

    /// Takes a token if there is one; a rate of 0 has no limit.
    fn take(&mut self, now: Instant) -> bool {
        if self.rate == 0 {
            return true;
        }
        let rate = f64::from(self.rate);
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * rate).min(rate);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use std::fs;
    use std::os::unix::fs::PermissionsExt;
    use std::path::Path;

    use super::*;

    /// A store with the given items, and their IDs.
    fn store_with(dir: &Path, items: &[&[u8]]) -> (PathBuf, Vec<ContentId>) {
        let root = dir.join("store");
        let store = Store::create_or_open(&root).expect("store");
        let ids = items
            .iter()
            .enumerate()
            .map(|(i, data)| {
                let path = dir.join(format!("item{i}"));
                fs::write(&path, data).expect("write");
                store.add(&path).expect("add").id
            })
            .collect();
        (root, ids)
    }

    /// Sends `request` over a fresh connection and returns everything the
    /// service wrote until it closed (the client shuts its side after the
    /// request, so the service ends after one reply).
    fn ask(service: &ContentService, request: &[u8]) -> Vec<u8> {
        let mut client = service.connect().expect("connect");
        client.set_nonblocking(false).expect("blocking");
        client.write_all(request).expect("send");
        client.shutdown(std::net::Shutdown::Write).expect("shutdown");
        let mut reply = Vec::new();
        client.read_to_end(&mut reply).expect("read");
        reply
    }

    fn reply_text(reply: &[u8]) -> String {
        String::from_utf8_lossy(reply).into_owned()
    }

    fn get(id: &ContentId) -> Vec<u8> {
        format!("{TAG} GET {id}\n").into_bytes()
    }

    #[test]
    fn granted_item_streams_with_its_header_and_trailer() {
        let dir = tempfile::tempdir().expect("tempdir");
        let data: Vec<u8> = (0..600_000u32).map(|i| (i % 251) as u8).collect();
        let (root, ids) = store_with(dir.path(), &[&data, b"other"]);
        let mut config = ContentConfig::new(root);
        config.grants.push((ids[0], GrantLimits::default()));
        let service = ContentService::start(&config).expect("start");

        let reply = ask(&service, &get(&ids[0]));
        let header = format!("{TAG} OK {} {} {}\n", data.len(), data.len(), ids[0]);
        assert!(reply.starts_with(header.as_bytes()), "{}", reply_text(&reply[..100]));
        let body = &reply[header.len()..header.len() + data.len()];
        assert!(body == data.as_slice(), "the bytes are the item's");
        assert_eq!(&reply[header.len() + data.len()..], format!("{TAG} END OK\n").as_bytes());

        // A range, and two requests on one connection.
        let two = [format!("{TAG} GET {} 10-20\n", ids[0]), format!("{TAG} GET {} 599990-\n", ids[0])].concat();
        let reply = ask(&service, two.as_bytes());
        let first = format!("{TAG} OK 10 600000 {}\n", ids[0]);
        let mut expect = first.into_bytes();
        expect.extend_from_slice(&data[10..20]);
        expect.extend_from_slice(format!("{TAG} END OK\n{TAG} OK 10 600000 {}\n", ids[0]).as_bytes());
        expect.extend_from_slice(&data[599_990..]);
        expect.extend_from_slice(format!("{TAG} END OK\n").as_bytes());
        assert_eq!(reply_text(&reply), reply_text(&expect));
        assert_eq!(service.grants()[0].served, 3);
    }

    #[test]
    fn each_check_has_its_own_refusal() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (root, ids) = store_with(dir.path(), &[b"granted", b"not granted", &[7u8; 100]]);
        let absent = ContentId::from_digest([9; 32]);
        let mut config = ContentConfig::new(root.clone());
        config.grants.push((ids[0], GrantLimits::default()));
        config.grants.push((ids[2], GrantLimits::default()));
        config.max_size = Some(50);
        let service = ContentService::start(&config).expect("start");
        // Granted, then removed from the store.
        fs::write(dir.path().join("gone"), b"gone").expect("write");
        let gone = Store::open(&root).expect("open").add(&dir.path().join("gone")).expect("add").id;
        service.grant(&[gone], GrantLimits::default()).expect("grant");
        fs::remove_file(root.join("sha256").join(gone.hex())).expect("remove");

        let cases: Vec<(Vec<u8>, Refusal)> = vec![
            (b"HELLO\n".to_vec(), Refusal::BadRequest),
            (format!("STASIS-CONTENT/2 GET {}\n", ids[0]).into_bytes(), Refusal::BadRequest),
            (format!("{TAG} PUT {}\n", ids[0]).into_bytes(), Refusal::BadRequest),
            (format!("{TAG} GET {} 1-2 x\n", ids[0]).into_bytes(), Refusal::BadRequest),
            (format!("{TAG} GET \u{e9}\n").into_bytes(), Refusal::BadRequest),
            (format!("{TAG} GET sha256:xyz\n").into_bytes(), Refusal::BadId),
            (format!("{TAG} GET ../../etc/passwd\n").into_bytes(), Refusal::BadId),
            (get(&ids[1]), Refusal::NotGranted),
            (get(&absent), Refusal::NotGranted),
            (get(&gone), Refusal::NotFound),
            (format!("{TAG} GET {} 5-2\n", ids[0]).into_bytes(), Refusal::BadRange),
            (format!("{TAG} GET {} 0-8\n", ids[0]).into_bytes(), Refusal::BadRange),
            (format!("{TAG} GET {} x-1\n", ids[0]).into_bytes(), Refusal::BadRange),
            (get(&ids[2]), Refusal::TooLarge),
        ];
        for (request, refusal) in cases {
            let reply = reply_text(&ask(&service, &request));
            let expect = format!("{TAG} ERR {} {}: ", refusal.code(), refusal.word());
            assert!(reply.starts_with(&expect) && reply.ends_with('\n'), "{request:?}: {reply:?}");
            assert_eq!(reply.matches('\n').count(), 1, "{request:?}: one line: {reply:?}");
        }
        // Still served after all that.
        assert!(reply_text(&ask(&service, &get(&ids[0]))).ends_with("END OK\n"));
    }

    #[test]
    fn overlong_and_half_lines_close_the_connection() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (root, ids) = store_with(dir.path(), &[b"x"]);
        let mut config = ContentConfig::new(root);
        config.grants.push((ids[0], GrantLimits::default()));
        let service = ContentService::start(&config).expect("start");
        let mut long = vec![b'A'; 10_000];
        long.push(b'\n');
        long.extend_from_slice(&get(&ids[0]));
        let reply = reply_text(&ask(&service, &long));
        assert!(reply.starts_with(&format!("{TAG} ERR 1 bad-request: the request line is longer")), "{reply}");
        assert_eq!(reply.matches('\n').count(), 1, "nothing served after it: {reply}");
        // Half a request, then the guest closes: no reply, no hang.
        assert_eq!(ask(&service, format!("{TAG} GET {}", ids[0]).as_bytes()), b"");
    }

    #[test]
    fn altered_item_ends_with_a_mismatch() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (root, ids) = store_with(dir.path(), &[&[1u8; 300_000]]);
        let path = root.join("sha256").join(ids[0].hex());
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).expect("chmod");
        let mut altered = vec![1u8; 300_000];
        altered[123_456] = 2;
        fs::write(&path, &altered).expect("alter");
        let mut config = ContentConfig::new(root);
        config.grants.push((ids[0], GrantLimits::default()));
        let service = ContentService::start(&config).expect("start");
        for request in [get(&ids[0]), format!("{TAG} GET {} 0-10\n", ids[0]).into_bytes()] {
            let reply = ask(&service, &request);
            let tail = reply_text(&reply[reply.len() - 200..]);
            assert!(tail.contains(&format!("{TAG} END ERR 6 mismatch: content does not match its ID")), "{tail}");
        }
        // Shrunk below its size: the connection closes before all bytes.
        fs::write(&path, [1u8; 10]).expect("shrink");
        let reply = ask(&service, &get(&ids[0]));
        assert_eq!(reply_text(&reply), format!("{TAG} OK 10 10 {}\n\u{1}\u{1}\u{1}\u{1}\u{1}\u{1}\u{1}\u{1}\u{1}\u{1}{TAG} END ERR 6 mismatch: content does not match its ID {}: the store's copy changed since it was added\n", ids[0], ids[0]));
    }

    #[test]
    fn use_limits_revocation_and_rate_limits() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (root, ids) = store_with(dir.path(), &[b"a", b"b"]);
        let mut config = ContentConfig::new(root);
        config.grants.push((ids[0], GrantLimits { uses: Some(2), expires_after: None }));
        config.grants.push((ids[1], GrantLimits::default()));
        config.rate = 3;
        let service = ContentService::start(&config).expect("start");
        assert!(reply_text(&ask(&service, &get(&ids[0]))).ends_with("END OK\n"));
        assert!(reply_text(&ask(&service, &get(&ids[0]))).ends_with("END OK\n"));
        assert!(reply_text(&ask(&service, &get(&ids[0]))).contains("ERR 3 not-granted"), "used up");
        assert!(reply_text(&ask(&service, &get(&ids[1]))).ends_with("END OK\n"));
        assert!(reply_text(&ask(&service, &get(&ids[1]))).contains("ERR 8 rate-limited"), "4th in a second");
        assert_eq!(service.revoke(&[ids[1], ids[0]]), vec![ids[0]], "ids[0] was used up already");
        assert!(service.grants().is_empty());
        let unknown = ContentId::from_digest([3; 32]);
        assert!(matches!(service.grant(&[ids[0], unknown], GrantLimits::default()), Err(ContentError::NotInStore(..))));
        assert!(service.grants().is_empty(), "nothing granted when one ID is not in the store");
    }

    #[test]
    fn start_refuses_grants_not_in_the_store_and_bad_ports() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (root, _) = store_with(dir.path(), &[b"a"]);
        let mut config = ContentConfig::new(root.clone());
        config.grants.push((ContentId::from_digest([1; 32]), GrantLimits::default()));
        let err = ContentService::start(&config).err().expect("refused");
        assert!(err.to_string().contains("has no such item"), "{err}");
        let mut config = ContentConfig::new(root);
        config.port = 0;
        assert!(matches!(ContentService::start(&config), Err(ContentError::Port(0))));
        let config = ContentConfig::new(dir.path().join("missing"));
        assert!(matches!(ContentService::start(&config), Err(ContentError::Store(StoreError::Missing(_)))));
    }

    #[test]
    fn ranges_parse() {
        assert_eq!(parse_range("0-10"), Some((0, Some(10))));
        assert_eq!(parse_range("5-"), Some((5, None)));
        for bad in ["", "-", "-5", "1-2-3", "a-b", "+1-2", "1 -2", "99999999999999999999999-"] {
            assert_eq!(parse_range(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn too_many_connections_are_refused_with_a_line() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (root, _) = store_with(dir.path(), &[b"a"]);
        let service = ContentService::start(&ContentConfig::new(root)).expect("start");
        let held: Vec<UnixStream> = (0..MAX_CONNECTIONS).map(|_| service.connect().expect("connect")).collect();
        let mut extra = service.connect().expect("connect");
        extra.set_nonblocking(false).expect("blocking");
        let mut reply = String::new();
        extra.read_to_string(&mut reply).expect("read");
        assert!(reply.starts_with(&format!("{TAG} ERR 8 rate-limited")), "{reply}");
        drop(held);
    }
}
