//! `xenmsr::xenstore` against a simulated xenstored on a heap page laid out as the store
//! ring. The test transport runs one step of the server in each `wait`, so everything is
//! synchronous and deterministic.

use std::alloc::{Layout, alloc_zeroed, dealloc};
use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, VecDeque};
use std::ptr::NonNull;
use std::rc::Rc;

use xenmsr::xenstore::{
    Client, EVENT_QUEUE_LEN, MAX_WATCHES, NAME_MAX, PAYLOAD_MAX, Ring, Transport, XsError,
};

const XS_READ: u32 = 2;
const XS_WATCH: u32 = 4;
const XS_UNWATCH: u32 = 5;
const XS_WRITE: u32 = 11;
const XS_RM: u32 = 13;
const XS_WATCH_EVENT: u32 = 15;
const XS_ERROR: u32 = 16;

const REQ_CONS: usize = 2048;
const REQ_PROD: usize = 2052;
const RSP_CONS: usize = 2056;
const RSP_PROD: usize = 2060;

/// A 4 KiB page-aligned heap page, only ever accessed through raw pointers.
struct Page(NonNull<u8>);

impl Page {
    fn layout() -> Layout {
        Layout::from_size_align(4096, 4096).unwrap()
    }

    fn new() -> Page {
        // SAFETY: the layout has a non-zero size.
        let page = unsafe { alloc_zeroed(Page::layout()) };
        Page(NonNull::new(page).expect("out of memory"))
    }

    fn load(&self, offset: usize) -> u32 {
        assert!(offset + 4 <= 4096 && offset.is_multiple_of(4));
        // SAFETY: an aligned u32 inside the live page.
        unsafe {
            self.0
                .as_ptr()
                .wrapping_add(offset)
                .cast::<u32>()
                .read_volatile()
        }
    }

    fn store(&self, offset: usize, value: u32) {
        assert!(offset + 4 <= 4096 && offset.is_multiple_of(4));
        // SAFETY: an aligned u32 inside the live page.
        unsafe {
            self.0
                .as_ptr()
                .wrapping_add(offset)
                .cast::<u32>()
                .write_volatile(value)
        }
    }

    fn byte(&self, offset: usize) -> u8 {
        assert!(offset < 4096);
        // SAFETY: a byte inside the live page.
        unsafe { self.0.as_ptr().wrapping_add(offset).read_volatile() }
    }

    fn set_byte(&self, offset: usize, value: u8) {
        assert!(offset < 4096);
        // SAFETY: a byte inside the live page.
        unsafe { self.0.as_ptr().wrapping_add(offset).write_volatile(value) }
    }
}

impl Drop for Page {
    fn drop(&mut self) {
        // SAFETY: allocated in `Page::new` with this layout, freed once.
        unsafe { dealloc(self.0.as_ptr(), Page::layout()) }
    }
}

/// Changes the next reply's header words or payload (once).
type Mangle = Box<dyn FnMut(&mut [u32; 4], &mut Vec<u8>)>;

/// The simulated xenstored.
struct Sim {
    page: Rc<Page>,
    store: BTreeMap<String, Vec<u8>>,
    watches: Vec<(String, String)>,
    /// Every `XS_WATCH` request seen, in order.
    watch_log: Vec<(String, String)>,
    /// Request bytes taken from the ring, not yet a whole message.
    inbox: Vec<u8>,
    /// Response bytes not yet in the ring.
    outbox: VecDeque<u8>,
    /// The most response bytes one step puts in the ring.
    chunk: usize,
    /// Does nothing at all while set.
    silent: bool,
    mangle: Option<Mangle>,
    requests: usize,
}

impl Sim {
    fn new(page: Rc<Page>) -> Sim {
        Sim {
            page,
            store: BTreeMap::new(),
            watches: Vec::new(),
            watch_log: Vec::new(),
            inbox: Vec::new(),
            outbox: VecDeque::new(),
            chunk: usize::MAX,
            silent: false,
            mangle: None,
            requests: 0,
        }
    }

    /// Sets all four ring indices (before a client is made, or for a reset).
    fn set_indices(&mut self, value: u32) {
        for offset in [REQ_CONS, REQ_PROD, RSP_CONS, RSP_PROD] {
            self.page.store(offset, value);
        }
    }

    /// What a restore into a new domain does: indices to 0, watches and partial
    /// messages gone (the nodes stay).
    fn reset(&mut self) {
        self.set_indices(0);
        self.watches.clear();
        self.inbox.clear();
        self.outbox.clear();
    }

    /// One round: take in requests, answer whole ones, move responses into the ring.
    fn step(&mut self) {
        if self.silent {
            return;
        }
        let prod = self.page.load(REQ_PROD);
        let mut cons = self.page.load(REQ_CONS);
        assert!(
            prod.wrapping_sub(cons) <= 1024,
            "the client overfilled the ring"
        );
        while cons != prod {
            self.inbox.push(self.page.byte((cons & 1023) as usize));
            cons = cons.wrapping_add(1);
        }
        self.page.store(REQ_CONS, cons);
        while self.inbox.len() >= 16 {
            let word =
                |i: usize| u32::from_le_bytes(self.inbox[i * 4..i * 4 + 4].try_into().unwrap());
            let (ty, id, tx, len) = (word(0), word(1), word(2), word(3) as usize);
            assert_eq!(tx, 0);
            assert!(len <= PAYLOAD_MAX, "the client sent {len} bytes");
            if self.inbox.len() < 16 + len {
                break;
            }
            let payload: Vec<u8> = self.inbox.drain(..16 + len).skip(16).collect();
            self.requests += 1;
            self.handle(ty, id, &payload);
        }
        self.flush();
    }

    /// Moves queued response bytes into the ring, as far as room and `chunk` allow.
    fn flush(&mut self) {
        let cons = self.page.load(RSP_CONS);
        let mut prod = self.page.load(RSP_PROD);
        let mut moved = 0;
        while prod.wrapping_sub(cons) < 1024 && moved < self.chunk {
            let Some(byte) = self.outbox.pop_front() else {
                break;
            };
            self.page.set_byte(1024 + (prod & 1023) as usize, byte);
            prod = prod.wrapping_add(1);
            moved += 1;
        }
        self.page.store(RSP_PROD, prod);
    }

    fn send(&mut self, ty: u32, id: u32, payload: &[u8]) {
        let mut header = [ty, id, 0, payload.len() as u32];
        let mut payload = payload.to_vec();
        if ty != XS_WATCH_EVENT
            && let Some(mut mangle) = self.mangle.take()
        {
            mangle(&mut header, &mut payload);
        }
        for word in header {
            self.outbox.extend(word.to_le_bytes());
        }
        self.outbox.extend(payload);
    }

    fn error(&mut self, id: u32, name: &str) {
        self.send(XS_ERROR, id, format!("{name}\0").as_bytes());
    }

    fn event(&mut self, path: &str, token: &str) {
        self.send(XS_WATCH_EVENT, 0, format!("{path}\0{token}\0").as_bytes());
    }

    /// Fires every watch on `path` or a parent of it.
    fn fire(&mut self, path: &str) {
        let hits: Vec<String> = self
            .watches
            .iter()
            .filter(|(watched, _)| {
                path == watched
                    || (path.starts_with(watched.as_str())
                        && path.as_bytes()[watched.len()] == b'/')
            })
            .map(|(_, token)| token.clone())
            .collect();
        for token in hits {
            self.event(path, &token);
        }
    }

    /// A write by someone else (the toolstack).
    fn external_write(&mut self, path: &str, value: &[u8]) {
        self.store.insert(path.to_owned(), value.to_vec());
        self.fire(path);
    }

    fn handle(&mut self, ty: u32, id: u32, payload: &[u8]) {
        let mut fields = payload.splitn(2, |&b| b == 0);
        let path = String::from_utf8(fields.next().unwrap().to_vec()).expect("path not UTF-8");
        let rest = fields.next().expect("no NUL after the path");
        match ty {
            XS_READ => {
                assert!(rest.is_empty());
                match self.store.get(&path).cloned() {
                    Some(value) => self.send(XS_READ, id, &value),
                    None => self.error(id, "ENOENT"),
                }
            }
            XS_WRITE => {
                self.store.insert(path.clone(), rest.to_vec());
                self.send(XS_WRITE, id, b"OK\0");
                self.fire(&path);
            }
            XS_RM => {
                assert!(rest.is_empty());
                if !self.store.contains_key(&path) {
                    self.error(id, "ENOENT");
                    return;
                }
                let under = format!("{path}/");
                self.store
                    .retain(|key, _| *key != path && !key.starts_with(&under));
                self.send(XS_RM, id, b"OK\0");
                self.fire(&path);
            }
            XS_WATCH | XS_UNWATCH => {
                let token = rest.strip_suffix(b"\0").expect("token without NUL");
                let token = String::from_utf8(token.to_vec()).unwrap();
                let watch = (path.clone(), token.clone());
                let known = self.watches.iter().position(|w| *w == watch);
                if ty == XS_WATCH {
                    self.watch_log.push(watch.clone());
                    if known.is_some() {
                        return self.error(id, "EEXIST");
                    }
                    self.watches.push(watch);
                    self.send(XS_WATCH, id, b"OK\0");
                    self.event(&path, &token);
                } else {
                    match known {
                        Some(i) => {
                            self.watches.remove(i);
                            self.send(XS_UNWATCH, id, b"OK\0");
                        }
                        None => self.error(id, "ENOENT"),
                    }
                }
            }
            _ => self.error(id, "EINVAL"),
        }
    }
}

/// The test's transport: `wait` runs a server step, at most `budget` times a request.
struct SimTransport {
    sim: Rc<RefCell<Sim>>,
    port: u32,
    budget: usize,
    waits: Cell<usize>,
    total_waits: Cell<usize>,
    /// Notifications by port.
    notified: RefCell<BTreeMap<u32, usize>>,
}

impl Transport for SimTransport {
    fn notify(&self) {
        *self.notified.borrow_mut().entry(self.port).or_default() += 1;
    }

    fn wait(&self) -> bool {
        self.total_waits.set(self.total_waits.get() + 1);
        if self.waits.get() >= self.budget {
            return false;
        }
        self.waits.set(self.waits.get() + 1);
        self.sim.borrow_mut().step();
        true
    }

    fn begin(&self) {
        self.waits.set(0);
    }
}

struct Setup {
    page: Rc<Page>,
    sim: Rc<RefCell<Sim>>,
    xs: Client<SimTransport>,
}

impl Setup {
    fn sim(&self) -> std::cell::RefMut<'_, Sim> {
        self.sim.borrow_mut()
    }
}

/// A sim and a client, with every ring index starting at `start`.
fn setup(start: u32) -> Setup {
    let page = Rc::new(Page::new());
    let sim = Rc::new(RefCell::new(Sim::new(page.clone())));
    sim.borrow_mut().set_indices(start);
    // SAFETY: a live, page-aligned page that only the client and the sim use, both
    // through raw pointers; `Setup` keeps it alive as long as the client.
    let ring = unsafe { Ring::new(page.0) };
    let transport = SimTransport {
        sim: sim.clone(),
        port: 7,
        budget: 100,
        waits: Cell::new(0),
        total_waits: Cell::new(0),
        notified: RefCell::new(BTreeMap::new()),
    };
    let xs = Client::new(ring, transport);
    Setup { page, sim, xs }
}

fn read_string(xs: &mut Client<SimTransport>, path: &str) -> Result<String, XsError> {
    let mut buf = [0u8; PAYLOAD_MAX];
    let n = xs.read(path, &mut buf)?;
    Ok(String::from_utf8(buf[..n].to_vec()).unwrap())
}

fn events(xs: &mut Client<SimTransport>) -> Vec<(String, String)> {
    std::iter::from_fn(|| xs.next_event())
        .map(|e| (e.path().to_owned(), e.token().to_owned()))
        .collect()
}

fn pair(path: &str, token: &str) -> (String, String) {
    (path.to_owned(), token.to_owned())
}

#[test]
fn read_write_rm_round_trip() {
    let mut t = setup(0);
    t.xs.write("data/a", b"hello").unwrap();
    assert_eq!(t.sim().store.get("data/a").unwrap(), b"hello");
    assert_eq!(read_string(&mut t.xs, "data/a").unwrap(), "hello");
    t.xs.write("data/a", b"").unwrap();
    assert_eq!(read_string(&mut t.xs, "data/a").unwrap(), "");
    t.xs.write("data/b", b"x\0y").unwrap();
    let mut buf = [0u8; 8];
    assert_eq!(t.xs.read("data/b", &mut buf), Ok(3));
    assert_eq!(&buf[..3], b"x\0y");
    t.xs.rm("data/a").unwrap();
    assert!(!t.sim().store.contains_key("data/a"));
    assert!(t.xs.read("data/a", &mut buf).unwrap_err().is_enoent());
    assert_eq!(t.sim().requests, 8);
    // Every index change was followed by a notification.
    assert!(t.xs.transport().notified.borrow()[&7] >= 16);
}

#[test]
fn enoent_is_typed() {
    let mut t = setup(0);
    let mut buf = [0u8; 16];
    let error = t.xs.read("no/such/node", &mut buf).unwrap_err();
    let XsError::Xenstore(errno) = error else {
        panic!("{error:?}");
    };
    assert!(errno.is_enoent());
    assert!(!errno.is("EACCES"));
    assert_eq!(errno.as_str(), "ENOENT");
    assert_eq!(error.to_string(), "xenstore error ENOENT");
    assert!(t.xs.rm("no/such/node").unwrap_err().is_enoent());
    // Still in step.
    t.sim().store.insert("x".into(), b"1".to_vec());
    assert_eq!(read_string(&mut t.xs, "x").unwrap(), "1");
}

#[test]
fn invalid_arguments_send_nothing() {
    let mut t = setup(0);
    let mut buf = [0u8; 4];
    assert!(matches!(
        t.xs.read("a\0b", &mut buf),
        Err(XsError::Invalid(_))
    ));
    assert!(matches!(t.xs.watch("a", "t\0"), Err(XsError::Invalid(_))));
    let long = "p".repeat(NAME_MAX + 1);
    assert_eq!(t.xs.watch(&long, "t"), Err(XsError::TooLong));
    assert_eq!(t.sim().requests, 0);
}

#[test]
fn watch_fires_at_once_and_on_change() {
    let mut t = setup(0);
    t.xs.watch("control/shutdown", "shutdown").unwrap();
    assert_eq!(events(&mut t.xs), [pair("control/shutdown", "shutdown")]);
    assert_eq!(t.xs.next_event().map(|e| e.token().to_owned()), None);
    // The toolstack asks for a suspend; the event comes with the next server round.
    t.sim().external_write("control/shutdown", b"suspend");
    t.sim().step();
    assert_eq!(events(&mut t.xs), [pair("control/shutdown", "shutdown")]);
    let mut buf = [0u8; 16];
    let n = t.xs.read("control/shutdown", &mut buf).unwrap();
    assert_eq!(&buf[..n], b"suspend");
    // The acknowledgement fires the watch too (own writes count).
    t.xs.write("control/shutdown", b"").unwrap();
    assert_eq!(t.sim().store["control/shutdown"], b"");
    assert_eq!(events(&mut t.xs), [pair("control/shutdown", "shutdown")]);
    // Children fire the parent's watch with their own path.
    t.xs.watch("cpu", "cpu").unwrap();
    t.sim().external_write("cpu/3/availability", b"offline");
    t.sim().external_write("cpuX", b"no");
    t.sim().step();
    assert_eq!(
        events(&mut t.xs),
        [pair("cpu", "cpu"), pair("cpu/3/availability", "cpu")]
    );
    assert_eq!(t.xs.dropped_events(), 0);
}

#[test]
fn event_while_reply_awaited_is_queued() {
    let mut t = setup(0);
    t.xs.watch("cpu", "cpu").unwrap();
    assert_eq!(events(&mut t.xs).len(), 1);
    t.sim().store.insert("name".into(), b"guest".to_vec());
    // The event is queued in the server before the reply: it reaches the ring first.
    t.sim().external_write("cpu/1/availability", b"online");
    t.sim().chunk = 5;
    assert_eq!(read_string(&mut t.xs, "name").unwrap(), "guest");
    assert_eq!(events(&mut t.xs), [pair("cpu/1/availability", "cpu")]);
}

#[test]
fn unwatch_forgets_the_watch_and_its_events() {
    let mut t = setup(0);
    t.xs.watch("a", "ta").unwrap();
    t.xs.watch("b", "tb").unwrap();
    t.sim().external_write("a/x", b"1");
    t.sim().step();
    t.xs.unwatch("a", "ta").unwrap();
    assert_eq!(t.sim().watches, [pair("b", "tb")]);
    t.sim().external_write("b", b"2");
    t.sim().step();
    // The queued events of "ta" went; only "tb"'s remain.
    assert_eq!(events(&mut t.xs), [pair("b", "tb"), pair("b", "tb")]);
    assert!(t.xs.unwatch("a", "ta").unwrap_err().is_enoent());
}

#[test]
fn watch_table_full_and_eexist() {
    let mut t = setup(0);
    for i in 0..MAX_WATCHES {
        t.xs.watch(&format!("w{i}"), "t").unwrap();
    }
    assert_eq!(t.xs.watch("one/more", "t"), Err(XsError::WatchTableFull));
    assert_eq!(t.sim().watches.len(), MAX_WATCHES);
    // The same watch again: the server says EEXIST, which counts as success.
    assert_eq!(t.xs.watch("w0", "t"), Ok(()));
    assert_eq!(t.sim().watch_log.len(), MAX_WATCHES + 1);
    t.xs.unwatch("w2", "t").unwrap();
    t.xs.watch("one/more", "t").unwrap();
    assert!(t.sim().watches.contains(&pair("one/more", "t")));
}

#[test]
fn full_event_queue_drops_the_oldest() {
    let mut t = setup(0);
    t.xs.watch("data", "d").unwrap();
    assert_eq!(events(&mut t.xs).len(), 1);
    let total = EVENT_QUEUE_LEN + 3;
    for i in 0..total {
        t.sim().external_write(&format!("data/{i}"), b"v");
    }
    t.sim().step();
    let got = events(&mut t.xs);
    let want: Vec<_> = (total - EVENT_QUEUE_LEN..total)
        .map(|i| pair(&format!("data/{i}"), "d"))
        .collect();
    assert_eq!(got, want);
    assert_eq!(t.xs.dropped_events(), 3);
}

#[test]
fn long_event_path_is_truncated_and_flagged() {
    let mut t = setup(0);
    t.xs.watch("data", "d").unwrap();
    let _ = events(&mut t.xs);
    let long = format!("data/{}", "q".repeat(100));
    t.sim().external_write(&long, b"v");
    t.sim().step();
    let event = t.xs.next_event().unwrap();
    assert!(event.path_truncated());
    assert_eq!(event.path(), &long[..NAME_MAX]);
    assert_eq!(event.token(), "d");
    // An event for a token nobody registered, and a malformed one: dropped.
    t.sim().event("data", "stranger");
    t.sim().send(XS_WATCH_EVENT, 0, b"data-without-token");
    t.sim().event("data", "d");
    t.sim().step();
    let event = t.xs.next_event().unwrap();
    assert!(!event.path_truncated());
    assert_eq!((event.path(), event.token()), ("data", "d"));
    assert!(t.xs.next_event().is_none());
    assert_eq!(t.xs.dropped_events(), 2);
}

/// Write, read back, watch: everything crosses the ring's end.
fn exercise_wrapping(start: u32) {
    let mut t = setup(start);
    t.sim().chunk = 37;
    t.xs.watch("data", "d").unwrap();
    for round in 0..12 {
        let value: Vec<u8> = (0..(round * 97 % 700))
            .map(|i| (i * 7 + round) as u8)
            .collect();
        t.xs.write(&format!("data/{round}"), &value).unwrap();
        let mut buf = [0u8; 1024];
        let n = t.xs.read(&format!("data/{round}"), &mut buf).unwrap();
        assert_eq!(&buf[..n], &value[..]);
    }
    let got = events(&mut t.xs);
    assert_eq!(got.len(), EVENT_QUEUE_LEN);
    assert_eq!(got.last().unwrap(), &pair("data/11", "d"));
    assert_eq!(t.xs.dropped_events(), 13 - EVENT_QUEUE_LEN as u64);
    let travelled = t.page.load(REQ_PROD).wrapping_sub(start);
    assert!(travelled > 3000, "{travelled}");
    assert!(t.page.load(RSP_PROD).wrapping_sub(start) > 3000);
}

#[test]
fn messages_wrap_around_the_ring() {
    exercise_wrapping(1000);
}

#[test]
fn indices_wrap_around_u32() {
    exercise_wrapping(u32::MAX - 20);
}

#[test]
fn values_up_to_the_payload_limit() {
    let mut t = setup(1000);
    // A 4096-byte value written by the toolstack, read whole.
    let big: Vec<u8> = (0..PAYLOAD_MAX).map(|i| (i % 251) as u8).collect();
    t.sim().store.insert("big".into(), big.clone());
    let mut buf = vec![0u8; PAYLOAD_MAX];
    assert_eq!(t.xs.read("big", &mut buf), Ok(PAYLOAD_MAX));
    assert_eq!(buf, big);
    // The largest write that fits: path, NUL and value make 4096 bytes.
    let path = "data/max";
    let value = &big[..PAYLOAD_MAX - path.len() - 1];
    t.xs.write(path, value).unwrap();
    assert_eq!(t.sim().store[path], value);
    // One byte more is refused before anything is sent.
    let requests = t.sim().requests;
    assert_eq!(
        t.xs.write(path, &big[..value.len() + 1]),
        Err(XsError::TooLong)
    );
    assert_eq!(t.sim().requests, requests);
    assert_eq!(t.xs.read(path, &mut buf), Ok(value.len()));
    assert_eq!(&buf[..value.len()], value);
}

#[test]
fn reply_longer_than_the_buffer_keeps_the_stream_in_step() {
    let mut t = setup(0);
    t.sim().store.insert("long".into(), vec![b'L'; 3000]);
    t.sim().store.insert("short".into(), b"ok".to_vec());
    t.sim().chunk = 100;
    let mut buf = [0u8; 10];
    assert_eq!(t.xs.read("long", &mut buf), Err(XsError::TooLong));
    assert_eq!(buf, [b'L'; 10]);
    assert_eq!(t.xs.read("short", &mut buf), Ok(2));
    assert_eq!(&buf[..2], b"ok");
    assert_eq!(t.xs.read("long", &mut [0u8; 2999]), Err(XsError::TooLong));
    let mut exact = [0u8; 3000];
    assert_eq!(t.xs.read("long", &mut exact), Ok(3000));
}

#[test]
fn hostile_rsp_prod_far_ahead() {
    let mut t = setup(0);
    t.sim().store.insert("k".into(), b"v".to_vec());
    let cons = t.page.load(RSP_CONS);
    t.page.store(RSP_PROD, cons.wrapping_add(2000));
    let mut buf = [0u8; 8];
    assert!(matches!(
        t.xs.read("k", &mut buf),
        Err(XsError::Protocol(_))
    ));
    // The client skipped to the server's index; the server goes on from there, and the
    // late reply to the failed read is dropped.
    assert_eq!(t.page.load(RSP_CONS), cons.wrapping_add(2000));
    assert_eq!(t.xs.read("k", &mut buf), Ok(1));
    assert_eq!(&buf[..1], b"v");
}

#[test]
fn hostile_header_len_5000() {
    let mut t = setup(0);
    t.sim().store.insert("k".into(), b"v".to_vec());
    t.sim().mangle = Some(Box::new(|header, _| header[3] = 5000));
    let mut buf = [0u8; 8];
    let error = t.xs.read("k", &mut buf).unwrap_err();
    assert!(matches!(error, XsError::Protocol(_)), "{error:?}");
    assert!(error.to_string().starts_with("xenstore protocol error"));
    assert_eq!(t.xs.read("k", &mut buf), Ok(1));
}

#[test]
fn hostile_wrong_req_id() {
    let mut t = setup(0);
    t.sim().store.insert("k".into(), b"v".to_vec());
    // An id never used.
    t.sim().mangle = Some(Box::new(|header, _| {
        header[1] = header[1].wrapping_add(1000)
    }));
    let mut buf = [0u8; 8];
    assert!(matches!(
        t.xs.read("k", &mut buf),
        Err(XsError::Protocol(_))
    ));
    assert_eq!(t.xs.read("k", &mut buf), Ok(1));
    // An earlier request's id: dropped, and the real reply never comes.
    t.sim().mangle = Some(Box::new(|header, _| header[1] -= 1));
    assert_eq!(t.xs.read("k", &mut buf), Err(XsError::Timeout));
    assert_eq!(t.xs.read("k", &mut buf), Ok(1));
    // A reply of the wrong type, and a malformed error.
    t.sim().mangle = Some(Box::new(|header, _| header[0] = XS_WRITE));
    assert!(matches!(
        t.xs.read("k", &mut buf),
        Err(XsError::Protocol(_))
    ));
    t.sim().mangle = Some(Box::new(|header, payload| {
        header[0] = XS_ERROR;
        *payload = b"\xff\xfe garbage".to_vec();
        header[3] = payload.len() as u32;
    }));
    assert!(matches!(
        t.xs.read("k", &mut buf),
        Err(XsError::Protocol(_))
    ));
    // A write whose reply is not OK.
    t.sim().mangle = Some(Box::new(|header, payload| {
        *payload = b"NO".to_vec();
        header[3] = 2;
    }));
    assert!(matches!(t.xs.write("k", b"w"), Err(XsError::Protocol(_))));
    assert_eq!(t.xs.read("k", &mut buf), Ok(1));
    assert_eq!(&buf[..1], b"w");
}

#[test]
fn silent_server_times_out_then_recovers() {
    let mut t = setup(0);
    t.sim().store.insert("k".into(), b"v".to_vec());
    t.sim().silent = true;
    let mut buf = [0u8; 8];
    let before = t.xs.transport().total_waits.get();
    assert_eq!(t.xs.read("k", &mut buf), Err(XsError::Timeout));
    // `budget` waits that said yes, then the one that said no.
    assert_eq!(t.xs.transport().total_waits.get() - before, 101);
    t.sim().silent = false;
    // The old request is answered first; its reply is dropped, the new one's taken.
    t.sim().store.insert("k".into(), b"new".to_vec());
    assert_eq!(t.xs.read("k", &mut buf), Ok(3));
    assert_eq!(&buf[..3], b"new");
    assert_eq!(t.sim().requests, 2);
}

#[test]
fn server_that_stops_consuming_times_out_without_cutting_small_requests() {
    let mut t = setup(0);
    t.sim().silent = true;
    // Fill the request ring: each request that fits is written whole or not at all.
    let value = [b'v'; 600];
    assert_eq!(t.xs.write("a", &value), Err(XsError::Timeout));
    let after_first = t.page.load(REQ_PROD);
    assert_eq!(after_first, 16 + 2 + 600);
    assert_eq!(t.xs.write("b", &value), Err(XsError::Timeout));
    assert_eq!(
        t.page.load(REQ_PROD),
        after_first,
        "a partial message was written"
    );
    // A request bigger than the ring is cut; the rest is owed and sent as filler.
    t.sim().silent = false;
    t.sim().step();
    t.sim().silent = true;
    let big = [b'B'; 3000];
    assert_eq!(t.xs.write("c", &big), Err(XsError::Timeout));
    t.sim().silent = false;
    assert_eq!(t.xs.write("d", b"1"), Ok(()));
    assert_eq!(t.sim().store["a"], value);
    let c = t.sim().store["c"].clone();
    assert_eq!(c.len(), 3000);
    assert!(c.starts_with(b"BBBB") && c.ends_with(&[0xff, 0xff]));
    assert_eq!(t.sim().store["d"], b"1");
    assert!(!t.sim().store.contains_key("b"));
}

#[test]
fn hostile_req_cons() {
    let mut t = setup(0);
    t.page.store(REQ_CONS, 5000);
    assert!(matches!(t.xs.write("k", b"v"), Err(XsError::Protocol(_))));
    t.page.store(REQ_CONS, 0);
    t.xs.write("k", b"v").unwrap();
}

/// A deterministic pseudo-random sequence.
struct Lcg(u64);

impl Lcg {
    fn next_u32(&mut self) -> u32 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) as u32
    }
}

#[test]
fn garbage_responses_never_panic_or_hang() {
    let mut t = setup(0);
    t.xs.watch("data", "d").unwrap();
    let mut rng = Lcg(42);
    let mut buf = [0u8; 64];
    for round in 0..300 {
        // Garbage bytes, sometimes a plausible header, sometimes impossible indices.
        t.sim().silent = true;
        let cons = t.page.load(RSP_CONS);
        let n = rng.next_u32() % 1024;
        for i in 0..n {
            let byte = match rng.next_u32() % 4 {
                0 => 0,
                1 => XS_WATCH_EVENT as u8,
                _ => rng.next_u32() as u8,
            };
            t.page
                .set_byte(1024 + (cons.wrapping_add(i) & 1023) as usize, byte);
        }
        let prod = match round % 7 {
            0 => rng.next_u32(),
            _ => cons.wrapping_add(n),
        };
        t.page.store(RSP_PROD, prod);
        match round % 3 {
            0 => {
                let _ = t.xs.read("k", &mut buf);
            }
            1 => {
                let _ = t.xs.write("k", b"v");
            }
            _ => while t.xs.next_event().is_some() {},
        }
        assert!(t.xs.transport().waits.get() <= 100);
    }
    // Fresh start: everything works again.
    t.sim().reset();
    t.sim().silent = false;
    t.xs.reconnect().unwrap();
    t.xs.write("k", b"fine").unwrap();
    assert_eq!(read_string(&mut t.xs, "k").unwrap(), "fine");
}

#[test]
fn resume_registers_the_watches_again() {
    let mut t = setup(0);
    t.xs.watch("control/shutdown", "shutdown").unwrap();
    t.xs.watch("cpu", "cpu").unwrap();
    let _ = events(&mut t.xs);
    t.sim().external_write("control/shutdown", b"suspend");
    t.sim().step();
    assert_eq!(events(&mut t.xs), [pair("control/shutdown", "shutdown")]);
    t.xs.write("control/shutdown", b"").unwrap();
    let _ = events(&mut t.xs);
    // Half a message is in the ring when the domain is suspended.
    t.sim().external_write("cpu/1/availability", b"online");
    t.sim().chunk = 9;
    t.sim().step();
    assert!(t.xs.next_event().is_none());
    // Restored into a new domain: fresh indices, no watches, a new port.
    t.sim().reset();
    t.sim().chunk = usize::MAX;
    t.sim().watch_log.clear();
    t.xs.transport_mut().port = 9;
    // SAFETY: the same live page as before.
    let ring = unsafe { Ring::new(t.page.0) };
    t.xs.resume(ring).unwrap();
    assert_eq!(
        t.sim().watch_log,
        [pair("control/shutdown", "shutdown"), pair("cpu", "cpu")]
    );
    assert_eq!(t.sim().watches.len(), 2);
    assert!(t.xs.transport().notified.borrow()[&9] > 0);
    assert_eq!(
        events(&mut t.xs),
        [pair("control/shutdown", "shutdown"), pair("cpu", "cpu")]
    );
    // Requests work, and the re-registered watches fire.
    t.sim().external_write("cpu/2/availability", b"offline");
    assert_eq!(
        read_string(&mut t.xs, "cpu/2/availability").unwrap(),
        "offline"
    );
    assert_eq!(events(&mut t.xs), [pair("cpu/2/availability", "cpu")]);
    // A cancelled suspend: the server kept everything; reconnect is harmless (EEXIST).
    t.xs.reconnect().unwrap();
    assert_eq!(t.sim().watches.len(), 2);
    assert_eq!(t.sim().watch_log.len(), 4);
}
