//! Directory watches: `Watch` and `Unwatch`, and the `FileEvent`s they produce.
//!
//! One inotify instance serves the whole agent, created at the first watch: the kernel counts
//! instances per user (the runtime caps a sandbox's at 1024), and the sandbox's own programs
//! need theirs. Each watch maps the instance's watch descriptors (one per directory; the
//! kernel hands out the same descriptor for a directory two watches share) to paths relative
//! to its root, and keeps a bounded queue of events that a pump task sends on its connection:
//! a connection that reads slowly loses events (an `overflow` event says so) instead of
//! growing the agent's memory or stalling the other watches.
//!
//! Paths resolve like every file operation ([`Files::open_dir`]: inside the root, never on
//! procfs); the directory is then watched through its descriptor (`/proc/self/fd/N`), so
//! what is watched is what was resolved. Subdirectories of a recursive watch are found
//! breadth first, queued by name (never by descriptor: the sandbox may have 64 open files), and
//! opened below the watched directory without following any symlink. Each watched directory
//! is kept as its parent's descriptor and its name; paths are built per event, and a tree
//! deeper than `PATH_MAX` is refused. New subdirectories wait in one queue per sandbox that
//! one task serves, so a burst of them holds one blocking thread at most.
//!
//! Mapping (like envd's fsnotify): `IN_CREATE` and `IN_MOVED_TO` are `create`, `IN_MODIFY`
//! `write`, `IN_ATTRIB` `chmod`, `IN_DELETE` `remove`, `IN_MOVED_FROM` `rename`. The
//! temporary files of the agent's atomic writes are hidden: their rename over the final name
//! is reported as `create` and `write` of that name.

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, HashSet, VecDeque};
use std::mem::MaybeUninit;
use std::os::fd::AsRawFd;
use std::rc::{Rc, Weak};
use std::sync::Arc;

use openrun_protocol::{AgentError, AgentMessage, ErrorCode, FileEventKind, Frame};
use rustix::fd::{AsFd, OwnedFd};
use rustix::fs::inotify::{self, CreateFlags, ReadFlags, WatchFlags};
use rustix::fs::{Dir, FileType, Mode, OFlags, ResolveFlags};
use rustix::io::Errno;
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::sync::Notify;
use tokio::task::JoinHandle;

use crate::connection::{OutTx, Outbound};
use crate::errors::{errno_error, errno_text, internal};
use crate::files::{is_temp_name, open_subdir, watchable_subdir, Files};

/// Watches one connection may hold at once.
pub(crate) const MAX_WATCHES_PER_CONNECTION: usize = 64;
/// Watches the whole agent (the sandbox) may hold at once.
pub(crate) const MAX_WATCHES: usize = 512;
/// Directories watched at once over all watches (each is a kernel watch; the runtime allows a
/// sandbox 131,072 in all, shared with its own programs).
pub(crate) const MAX_DIRS: usize = 16_384;
/// Directories the watches hold in all, counting a directory once per watch that holds it
/// (the agent's memory for them: at most a name of 255 bytes each).
pub(crate) const MAX_DIR_ENTRIES: usize = 65_536;
/// Longest path of a watched directory (the watched path, a slash and the path below it),
/// as the kernel's `PATH_MAX` (with its NUL): a deeper directory cannot be named in one call.
pub(crate) const MAX_PATH: usize = 4095;
/// Events one watch keeps for a connection that reads slowly before it drops them (and
/// reports `overflow`).
pub(crate) const MAX_QUEUED: usize = 4096;
/// Bytes of events one watch keeps (names, plus [`EVENT_COST`] each) before it drops them.
pub(crate) const MAX_QUEUED_BYTES: usize = 256 * 1024;
/// Bytes of events all watches keep together before they drop them.
pub(crate) const MAX_QUEUED_BYTES_TOTAL: usize = 8 * 1024 * 1024;
/// What a queued event costs besides its name.
const EVENT_COST: usize = 48;
/// New subdirectories of recursive watches waiting to be watched; beyond it the watch whose
/// directory could not wait gets an `overflow` event.
const MAX_GROW_PENDING: usize = 4096;
/// Bytes read from the inotify descriptor at once.
const READ_BUFFER: usize = 64 * 1024;
/// Renames of temporary files remembered until their `IN_MOVED_TO` arrives.
const MAX_PENDING_COOKIES: usize = 256;
/// The parent of a watch's root in [`Node::parent`].
const NO_PARENT: i32 = -1;

/// What every watched directory reports.
const MASK: WatchFlags = WatchFlags::CREATE
    .union(WatchFlags::MODIFY)
    .union(WatchFlags::ATTRIB)
    .union(WatchFlags::DELETE)
    .union(WatchFlags::MOVED_FROM)
    .union(WatchFlags::MOVED_TO)
    .union(WatchFlags::DELETE_SELF)
    .union(WatchFlags::ONLYDIR)
    .union(WatchFlags::EXCL_UNLINK);

/// The events of one watch waiting for its connection.
#[derive(Debug, Default)]
struct Queue {
    events: VecDeque<(String, FileEventKind)>,
    /// What `events` cost ([`EVENT_COST`] plus the name, each).
    bytes: usize,
    /// Events were dropped since the last one sent.
    overflow: bool,
    /// The watch ended by itself, for this reason.
    ended: Option<String>,
}

/// A watch's queue and the signal that it has something.
#[derive(Debug, Default)]
struct Mailbox {
    queue: RefCell<Queue>,
    notify: Notify,
    /// Bytes queued by every mailbox of the agent.
    total: Rc<Cell<usize>>,
}

impl Mailbox {
    fn new(total: Rc<Cell<usize>>) -> Self {
        Self {
            queue: RefCell::default(),
            notify: Notify::new(),
            total,
        }
    }

    fn push(&self, name: String, kind: FileEventKind) {
        {
            let mut q = self.queue.borrow_mut();
            if q.ended.is_some() {
                return;
            }
            let cost = EVENT_COST + name.len();
            if kind == FileEventKind::Overflow {
                q.overflow = true;
            } else if q
                .events
                .back()
                .is_some_and(|(n, k)| *k == kind && *n == name)
            {
                // The same change again before anyone read the first: one event says it.
                return;
            } else if q.events.len() >= MAX_QUEUED
                || q.bytes + cost > MAX_QUEUED_BYTES
                || self.total.get() + cost > MAX_QUEUED_BYTES_TOTAL
            {
                q.overflow = true;
            } else {
                q.events.push_back((name, kind));
                q.bytes += cost;
                self.total.set(self.total.get() + cost);
            }
        }
        self.notify.notify_one();
    }

    /// The next thing to send: the queued events, then the loss, then the end.
    fn pop(&self) -> Option<Next> {
        let mut q = self.queue.borrow_mut();
        if let Some((name, kind)) = q.events.pop_front() {
            let cost = EVENT_COST + name.len();
            q.bytes -= cost;
            self.total.set(self.total.get().saturating_sub(cost));
            return Some(Next::Event(name, kind));
        }
        if std::mem::take(&mut q.overflow) {
            return Some(Next::Event(String::new(), FileEventKind::Overflow));
        }
        q.ended.clone().map(Next::Ended)
    }

    fn end(&self, reason: String) {
        self.queue.borrow_mut().ended.get_or_insert(reason);
        self.notify.notify_one();
    }
}

impl Drop for Mailbox {
    fn drop(&mut self) {
        let left = self.queue.get_mut().bytes;
        self.total.set(self.total.get().saturating_sub(left));
    }
}

/// What [`Mailbox::pop`] found.
#[derive(Debug)]
enum Next {
    Event(String, FileEventKind),
    Ended(String),
}

/// A watched directory of a watch: its parent's descriptor and its name (paths are built
/// when an event needs one, so a deep tree costs memory linear in its size).
#[derive(Debug, Clone)]
struct Node {
    /// Descriptor of the parent directory ([`NO_PARENT`] for the watch's root).
    parent: i32,
    /// Name in the parent (`""` for the root).
    name: Box<str>,
    /// Length of its path relative to the watch's root.
    len: usize,
}

/// One watch.
#[derive(Debug)]
struct Watch {
    /// The directory as the client named it.
    path: String,
    recursive: bool,
    /// Descriptor of the watched directory itself.
    root_wd: i32,
    /// Every watched directory by descriptor.
    dirs: HashMap<i32, Node>,
    /// The same by parent and name.
    by_name: HashMap<(i32, Box<str>), i32>,
    mailbox: Rc<Mailbox>,
    pump: Option<JoinHandle<()>>,
}

impl Watch {
    /// The path of directory `wd` relative to the root (`""` for the root); `None` when it
    /// is not (or no longer) part of this watch.
    fn rel(&self, wd: i32) -> Option<String> {
        let mut names = Vec::new();
        let mut at = wd;
        // Bounded: a chain longer than the map would be a cycle.
        for _ in 0..=self.dirs.len() {
            if at == NO_PARENT {
                names.reverse();
                return Some(names.join("/"));
            }
            let node = self.dirs.get(&at)?;
            if node.parent != NO_PARENT {
                names.push(&*node.name);
            }
            at = node.parent;
        }
        None
    }

    /// The directory named `name` in directory `parent`.
    fn child(&self, parent: i32, name: &str) -> Option<i32> {
        self.by_name.get(&(parent, name.into())).copied()
    }

    /// Adds directory `wd`; whether it was new to the watch.
    fn insert(&mut self, wd: i32, node: Node) -> bool {
        if self.dirs.contains_key(&wd) {
            return false;
        }
        self.by_name.insert((node.parent, node.name.clone()), wd);
        self.dirs.insert(wd, node);
        true
    }

    /// Forgets directory `wd`.
    fn remove(&mut self, wd: i32) {
        if let Some(node) = self.dirs.remove(&wd) {
            let key = (node.parent, node.name);
            if self.by_name.get(&key) == Some(&wd) {
                self.by_name.remove(&key);
            }
        }
    }

    /// Longest path below the root a watched directory may have.
    fn max_len(&self) -> usize {
        max_rel_len(&self.path)
    }
}

/// Longest relative path of a watched directory below `path`.
fn max_rel_len(path: &str) -> usize {
    MAX_PATH.saturating_sub(path.trim_end_matches('/').len() + 1)
}

/// The agent's inotify instance.
#[derive(Debug)]
struct Inotify {
    fd: Arc<OwnedFd>,
    reader: JoinHandle<()>,
}

impl Drop for Inotify {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

/// A new subdirectory of a recursive watch, to be watched: (watch, parent's descriptor, name).
type Grow = (u64, i32, Box<str>);

#[derive(Debug, Default)]
struct State {
    inotify: Option<Inotify>,
    next_id: u64,
    watches: HashMap<u64, Watch>,
    /// Which watches use each kernel watch descriptor.
    users: HashMap<i32, HashSet<u64>>,
    /// Cookies of temporary files moved away, whose `IN_MOVED_TO` is an atomic write.
    temp_moves: VecDeque<u32>,
    /// Kernel watches being added (outside this thread) right now: while any are, unused
    /// descriptors are not removed (the kernel hands an add the descriptor of a directory
    /// already watched, which a removal would take away under it).
    adding: usize,
    /// Unused descriptors whose removal waits for the adds in flight.
    deferred: Vec<i32>,
    /// New subdirectories waiting to be watched, in order, and the same as a set.
    grow_queue: VecDeque<Grow>,
    grow_set: HashSet<Grow>,
    /// Whether the task that watches them runs.
    growing: bool,
}

impl State {
    /// Removes the kernel watches among `wds` that no watch uses (later, when adds are in
    /// flight).
    fn remove_unused(&mut self, wds: impl IntoIterator<Item = i32>) {
        if self.adding > 0 {
            self.deferred.extend(wds);
            return;
        }
        if let Some(ino) = &self.inotify {
            for wd in wds {
                if !self.users.contains_key(&wd) {
                    // Fails only for a watch the kernel already dropped (its directory is
                    // gone).
                    let _ = inotify::remove_watch(&*ino.fd, wd);
                }
            }
        }
    }

    /// Directories held by all watches (one per watch that holds it).
    fn entries(&self) -> usize {
        self.watches.values().map(|w| w.dirs.len()).sum()
    }

    /// How many more directories a watch may add.
    fn budget(&self) -> usize {
        MAX_DIRS
            .saturating_sub(self.users.len())
            .min(MAX_DIR_ENTRIES.saturating_sub(self.entries()))
    }
}

/// Every watch of the agent.
#[derive(Debug)]
pub(crate) struct Watches {
    files: Arc<Files>,
    state: RefCell<State>,
    /// Bytes queued by every watch's mailbox.
    queued: Rc<Cell<usize>>,
}

/// An add of kernel watches in flight: counted in [`State::adding`] until dropped.
struct Adding<'a>(&'a Watches);

impl<'a> Adding<'a> {
    fn new(watches: &'a Watches) -> Self {
        watches.state.borrow_mut().adding += 1;
        Self(watches)
    }
}

impl Drop for Adding<'_> {
    fn drop(&mut self) {
        let mut state = self.0.state.borrow_mut();
        state.adding -= 1;
        if state.adding == 0 {
            let deferred = std::mem::take(&mut state.deferred);
            state.remove_unused(deferred);
        }
    }
}

/// A watch that is registered but whose events do not flow yet: the connection answers the
/// request first, then calls [`Started::start`].
#[derive(Debug)]
pub(crate) struct Started {
    /// The watch's id.
    pub(crate) id: u64,
    watches: Weak<Watches>,
    mailbox: Rc<Mailbox>,
}

impl Started {
    /// Starts sending the watch's events on `out`.
    pub(crate) fn start(self, out: OutTx) {
        let task = tokio::task::spawn_local(pump(self.id, self.mailbox, out));
        if let Some(watches) = self.watches.upgrade() {
            if let Some(w) = watches.state.borrow_mut().watches.get_mut(&self.id) {
                w.pump = Some(task);
            }
        }
    }
}

/// The directories [`add_tree`] added, and how it ended.
type Added = (Vec<(i32, Node)>, Result<(), AgentError>);

impl Watches {
    /// No watches yet; the inotify instance is made at the first.
    pub(crate) fn new(files: Arc<Files>) -> Rc<Self> {
        Rc::new(Self {
            files,
            state: RefCell::new(State::default()),
            queued: Rc::default(),
        })
    }

    /// The inotify descriptor, made (with its reader task) at the first call.
    fn instance(self: &Rc<Self>) -> Result<Arc<OwnedFd>, AgentError> {
        if let Some(ino) = &self.state.borrow().inotify {
            return Ok(ino.fd.clone());
        }
        let fd =
            inotify::init(CreateFlags::CLOEXEC | CreateFlags::NONBLOCK).map_err(|e| match e {
                Errno::MFILE | Errno::NFILE => AgentError::new(
                    ErrorCode::TooLarge,
                    format!(
                        "cannot watch: the sandbox's inotify instances are used up \
                     (fs.inotify.max_user_instances, or its open files limit): {}",
                        errno_text(e)
                    ),
                ),
                other => internal("cannot create an inotify instance", errno_text(other)),
            })?;
        let fd = Arc::new(fd);
        // SAFETY: the `Arc` keeps the descriptor open, with the same number, for as long as
        // the `AsyncFd` (which owns one of its references) lives.
        let async_fd = unsafe { AsyncFd::register_with_interest(fd.clone(), Interest::READABLE) }
            .map_err(|e| internal("cannot poll the inotify instance", e))?;
        let reader = tokio::task::spawn_local(read_loop(Rc::downgrade(self), async_fd));
        self.state.borrow_mut().inotify = Some(Inotify {
            fd: fd.clone(),
            reader,
        });
        Ok(fd)
    }

    /// Starts watching `path` (and, when `recursive`, every directory below it). Refused
    /// beyond [`MAX_WATCHES`] watches ([`ErrorCode::TooLarge`]: wait for others to stop), and
    /// for a tree beyond [`MAX_DIRS`] directories, deeper than [`MAX_PATH`], or beyond the
    /// kernel's watches ([`ErrorCode::InvalidArgument`]: waiting does not help).
    pub(crate) async fn watch(
        self: &Rc<Self>,
        path: String,
        recursive: bool,
    ) -> Result<Started, AgentError> {
        let budget = {
            let state = self.state.borrow();
            if state.watches.len() >= MAX_WATCHES {
                return Err(AgentError::new(
                    ErrorCode::TooLarge,
                    format!(
                        "the sandbox already has {MAX_WATCHES} directory watches; stop some first"
                    ),
                ));
            }
            state.budget()
        };
        let fd = self.instance()?;
        let files = self.files.clone();
        let adding = Adding::new(self);
        let (added, result) = {
            let path = path.clone();
            let fd = fd.clone();
            tokio::task::spawn_blocking(move || match files.open_dir(&path) {
                Ok(dir) => {
                    let top = Node {
                        parent: NO_PARENT,
                        name: "".into(),
                        len: 0,
                    };
                    let tree = Tree {
                        ino: &fd,
                        path: &path,
                        recursive,
                        budget,
                        max_len: max_rel_len(&path),
                    };
                    tree.add(dir, top)
                }
                Err(e) => (Vec::new(), Err(e)),
            })
            .await
            .map_err(|e| internal("watching failed", e))?
        };
        let mut state = self.state.borrow_mut();
        if let Err(e) = result {
            state.remove_unused(added.into_iter().map(|(wd, _)| wd));
            drop(state);
            drop(adding);
            return Err(e);
        }
        let Some(&(root_wd, _)) = added.first() else {
            return Err(internal(
                "watching failed",
                "no descriptor for the directory",
            ));
        };
        let mailbox = Rc::new(Mailbox::new(self.queued.clone()));
        state.next_id += 1;
        let id = state.next_id;
        for (wd, _) in &added {
            state.users.entry(*wd).or_default().insert(id);
        }
        let mut watch = Watch {
            path,
            recursive,
            root_wd,
            dirs: HashMap::new(),
            by_name: HashMap::new(),
            mailbox: mailbox.clone(),
            pump: None,
        };
        for (wd, node) in added {
            watch.insert(wd, node);
        }
        state.watches.insert(id, watch);
        drop(state);
        drop(adding);
        Ok(Started {
            id,
            watches: Rc::downgrade(self),
            mailbox,
        })
    }

    /// Stops watch `id`; [`ErrorCode::NotFound`] when there is none (it may have ended by
    /// itself).
    pub(crate) fn unwatch(&self, id: u64) -> Result<(), AgentError> {
        if self.stop(id) {
            Ok(())
        } else {
            Err(AgentError::new(
                ErrorCode::NotFound,
                format!("no such watch: {id} (it may have ended)"),
            ))
        }
    }

    /// Stops watch `id` if it exists; whether it did.
    pub(crate) fn stop(&self, id: u64) -> bool {
        let Some(watch) = self.state.borrow_mut().watches.remove(&id) else {
            return false;
        };
        if let Some(pump) = &watch.pump {
            pump.abort();
        }
        let wds: Vec<i32> = watch.dirs.keys().copied().collect();
        self.release(id, &wds);
        true
    }

    /// Drops watch `id`'s use of `wds`, and the kernel watches nobody uses any more.
    fn release(&self, id: u64, wds: &[i32]) {
        let mut state = self.state.borrow_mut();
        let mut unused = Vec::new();
        for wd in wds {
            if let Some(users) = state.users.get_mut(wd) {
                users.remove(&id);
                if users.is_empty() {
                    state.users.remove(wd);
                    unused.push(*wd);
                }
            }
        }
        state.remove_unused(unused);
    }

    /// Handles one event read from the instance.
    fn dispatch(self: &Rc<Self>, event: RawEvent) {
        let flags = event.flags;
        if flags.contains(ReadFlags::QUEUE_OVERFLOW) {
            for w in self.state.borrow().watches.values() {
                w.mailbox.push(String::new(), FileEventKind::Overflow);
            }
            return;
        }
        if flags.contains(ReadFlags::IGNORED) {
            self.dropped_by_kernel(event.wd);
            return;
        }
        let Some(name) = event.name else {
            // About the directory itself (`IN_DELETE_SELF`): its parent reports the removal,
            // and `IN_IGNORED` follows.
            return;
        };
        let is_dir = flags.contains(ReadFlags::ISDIR);
        let mut kinds: &[FileEventKind] = &[];
        {
            let mut state = self.state.borrow_mut();
            if is_temp_name(&name) {
                if flags.contains(ReadFlags::MOVED_FROM) {
                    if state.temp_moves.len() >= MAX_PENDING_COOKIES {
                        state.temp_moves.pop_front();
                    }
                    state.temp_moves.push_back(event.cookie);
                }
                return;
            }
            if flags.contains(ReadFlags::MOVED_TO) {
                let atomic_write = match state.temp_moves.iter().position(|c| *c == event.cookie) {
                    Some(at) => {
                        state.temp_moves.remove(at);
                        true
                    }
                    None => false,
                };
                kinds = if atomic_write {
                    &[FileEventKind::Create, FileEventKind::Write]
                } else {
                    &[FileEventKind::Create]
                };
            } else if flags.contains(ReadFlags::CREATE) {
                kinds = &[FileEventKind::Create];
            } else if flags.contains(ReadFlags::MODIFY) {
                kinds = &[FileEventKind::Write];
            } else if flags.contains(ReadFlags::ATTRIB) {
                kinds = &[FileEventKind::Chmod];
            } else if flags.contains(ReadFlags::DELETE) {
                kinds = &[FileEventKind::Remove];
            } else if flags.contains(ReadFlags::MOVED_FROM) {
                kinds = &[FileEventKind::Rename];
            }
        }
        let name = String::from_utf8_lossy(&name).into_owned();
        let appeared = flags.intersects(ReadFlags::CREATE | ReadFlags::MOVED_TO);
        // Moved away or removed: a directory of that name that appears later is another one.
        let moved_away = flags.intersects(ReadFlags::MOVED_FROM | ReadFlags::DELETE);
        let mut grow = Vec::new();
        let mut shrink = Vec::new();
        {
            let state = self.state.borrow();
            let Some(users) = state.users.get(&event.wd) else {
                return;
            };
            for id in users {
                let Some(w) = state.watches.get(id) else {
                    continue;
                };
                let Some(rel) = w.rel(event.wd) else {
                    continue;
                };
                let rel = join(&rel, &name);
                for kind in kinds {
                    w.mailbox.push(rel.clone(), *kind);
                }
                if w.recursive && is_dir && appeared {
                    grow.push((*id, event.wd, Box::<str>::from(name.as_str())));
                } else if w.recursive && is_dir && moved_away {
                    if let Some(wd) = w.child(event.wd, &name) {
                        shrink.push((*id, wd));
                    }
                }
            }
        }
        for (id, wd) in shrink {
            self.forget_subtree(id, wd);
        }
        for item in grow {
            self.queue_grow(item);
        }
    }

    /// The kernel dropped descriptor `wd` (its directory is gone, or it was removed): a
    /// watch whose root it was ends.
    fn dropped_by_kernel(&self, wd: i32) {
        let mut state = self.state.borrow_mut();
        let Some(users) = state.users.remove(&wd) else {
            return;
        };
        let mut ended = Vec::new();
        for id in users {
            if let Some(w) = state.watches.get_mut(&id) {
                w.remove(wd);
                if w.root_wd == wd {
                    ended.push(id);
                }
            }
        }
        drop(state);
        for id in ended {
            let watch = self.state.borrow_mut().watches.remove(&id);
            if let Some(w) = watch {
                w.mailbox.end("the watched directory was removed".into());
                let wds: Vec<i32> = w.dirs.keys().copied().collect();
                self.release(id, &wds);
            }
        }
    }

    /// Directory `top` of watch `id` moved away: stops watching it and everything below.
    fn forget_subtree(&self, id: u64, top: i32) {
        let wds: Vec<i32> = {
            let mut state = self.state.borrow_mut();
            let Some(w) = state.watches.get_mut(&id) else {
                return;
            };
            let mut children: HashMap<i32, Vec<i32>> = HashMap::new();
            for (wd, node) in &w.dirs {
                children.entry(node.parent).or_default().push(*wd);
            }
            let mut gone = vec![top];
            let mut at = 0;
            while let Some(wd) = gone.get(at).copied() {
                at += 1;
                if let Some(below) = children.remove(&wd) {
                    gone.extend(below);
                }
            }
            for wd in &gone {
                w.remove(*wd);
            }
            gone
        };
        self.release(id, &wds);
    }

    /// Queues a new subdirectory of a recursive watch (once), and starts the one task that
    /// watches them, one at a time, if it is not running.
    fn queue_grow(self: &Rc<Self>, item: Grow) {
        let mut state = self.state.borrow_mut();
        if state.grow_set.contains(&item) {
            return;
        }
        if state.grow_queue.len() >= MAX_GROW_PENDING {
            if let Some(w) = state.watches.get(&item.0) {
                w.mailbox.push(String::new(), FileEventKind::Overflow);
            }
            return;
        }
        state.grow_set.insert(item.clone());
        state.grow_queue.push_back(item);
        if !state.growing {
            state.growing = true;
            let watches = self.clone();
            tokio::task::spawn_local(async move {
                loop {
                    let next = {
                        let mut state = watches.state.borrow_mut();
                        let next = state.grow_queue.pop_front();
                        match &next {
                            Some(item) => {
                                state.grow_set.remove(item);
                            }
                            None => state.growing = false,
                        }
                        next
                    };
                    match next {
                        Some((id, parent, name)) => watches.grow(id, parent, name).await,
                        None => return,
                    }
                }
            });
        }
    }

    /// A directory `name` appeared in directory `parent` of recursive watch `id`: watches it
    /// and its subtree.
    async fn grow(&self, id: u64, parent: i32, name: Box<str>) {
        let (path, top, budget, max_len, fd) = {
            let state = self.state.borrow();
            let (Some(w), Some(ino)) = (state.watches.get(&id), &state.inotify) else {
                return;
            };
            let (Some(rel), Some(node)) = (w.rel(parent), w.dirs.get(&parent)) else {
                return;
            };
            if w.child(parent, &name).is_some() {
                // Already watched (found by the walk of its parent).
                return;
            }
            let top = Node {
                parent,
                len: node.len + usize::from(node.len > 0) + name.len(),
                name,
            };
            if top.len > w.max_len() {
                w.mailbox.push(String::new(), FileEventKind::Overflow);
                return;
            }
            (
                join(&w.path, &rel),
                top,
                state.budget(),
                w.max_len(),
                ino.fd.clone(),
            )
        };
        let files = self.files.clone();
        let adding = Adding::new(self);
        let outcome = tokio::task::spawn_blocking(move || {
            let dir = match files.open_dir(&path) {
                Ok(dir) => dir,
                Err(e) => return (Vec::new(), Err(e)),
            };
            let sub = match open_subdir(&dir, &*top.name) {
                Ok(sub) => sub,
                Err(e) => return (Vec::new(), Err(errno_error(e, &join(&path, &top.name)))),
            };
            drop(dir);
            if !watchable_subdir(sub.as_fd()) {
                return (Vec::new(), Ok(()));
            }
            let tree = Tree {
                ino: &fd,
                path: &path,
                recursive: true,
                budget,
                max_len,
            };
            tree.add(sub, top)
        })
        .await;
        let (added, result) = match outcome {
            Ok(outcome) => outcome,
            Err(_) => return,
        };
        let mut state = self.state.borrow_mut();
        let Some(w) = state.watches.get_mut(&id) else {
            state.remove_unused(added.into_iter().map(|(wd, _)| wd));
            return;
        };
        match result {
            Ok(()) => {}
            // Gone again, or not a directory any more: nothing to watch.
            Err(e) if matches!(e.code, ErrorCode::NotFound | ErrorCode::NotADirectory) => {}
            Err(e) => {
                tracing::debug!(watch = id, error = %e, "cannot watch a new subdirectory");
                w.mailbox.push(String::new(), FileEventKind::Overflow);
            }
        }
        let mut fresh = Vec::new();
        for (wd, node) in added {
            if w.insert(wd, node) {
                fresh.push(wd);
            }
        }
        for wd in fresh {
            state.users.entry(wd).or_default().insert(id);
        }
        drop(state);
        drop(adding);
    }
}

/// `rel` and `name` joined with a slash (just `name` when `rel` is empty).
fn join(rel: &str, name: &str) -> String {
    if rel.is_empty() {
        name.to_string()
    } else {
        format!("{}/{name}", rel.trim_end_matches('/'))
    }
}

/// One walk that adds kernel watches for a directory and (when `recursive`) its subtree.
struct Tree<'a> {
    ino: &'a OwnedFd,
    /// The directory the walk starts in, as the client named it (for errors).
    path: &'a str,
    recursive: bool,
    /// Most directories it may add.
    budget: usize,
    /// Longest relative path below the watch's root it may add.
    max_len: usize,
}

/// A directory found by [`Tree::add`]: its index in the walk's list of directories, or the
/// node it starts from.
#[derive(Debug)]
struct Found {
    /// Index of the parent in the walk's list (`None` for the start).
    parent: Option<usize>,
    name: Box<str>,
    len: usize,
    /// Its kernel watch, once added (`None`: not added, or already added by this walk
    /// through another path, e.g. a bind mount).
    wd: Option<i32>,
}

impl Tree<'_> {
    /// Adds kernel watches for `dir` (described by `top`) and, when recursive, every
    /// directory below it, breadth first. Only directory names wait in the queue, never
    /// descriptors: a directory is opened when its turn comes, from `dir` without following
    /// any symlink. More than `budget` directories (added or waiting), or one deeper than
    /// `max_len`, is [`ErrorCode::InvalidArgument`]; directories that vanish (or turn into
    /// something else) are skipped; any other failure (unreadable, out of descriptors) is an
    /// error naming the directory. Returns what it added even when it fails.
    fn add(&self, dir: OwnedFd, top: Node) -> Added {
        let mut added = Vec::new();
        let result = self.walk(&dir, top, &mut added);
        (added, result)
    }

    fn walk(
        &self,
        base: &OwnedFd,
        top: Node,
        added: &mut Vec<(i32, Node)>,
    ) -> Result<(), AgentError> {
        let mut found = vec![Found {
            parent: None,
            name: top.name.clone(),
            len: top.len,
            wd: None,
        }];
        let mut seen = HashSet::new();
        let mut next = 0;
        while next < found.len() {
            let at = next;
            next += 1;
            let below = self.below(&found, at);
            let opened;
            let dir = if at == 0 {
                base
            } else {
                match open_beneath(base, &below) {
                    Ok(dir) => {
                        opened = dir;
                        &opened
                    }
                    Err(Errno::NOENT | Errno::NOTDIR | Errno::LOOP | Errno::XDEV) => continue,
                    Err(e) => return Err(self.failure(e, &below)),
                }
            };
            if at > 0 && !watchable_subdir(dir.as_fd()) {
                continue;
            }
            let target = format!("/proc/self/fd/{}", dir.as_raw_fd());
            let wd = match inotify::add_watch(self.ino, target.as_str(), MASK) {
                Ok(wd) => wd,
                Err(Errno::NOENT) if at > 0 => continue,
                Err(Errno::NOSPC) => {
                    return Err(AgentError::new(
                        ErrorCode::InvalidArgument,
                        format!(
                            "cannot watch {}: the sandbox's inotify watches are used up \
                             (fs.inotify.max_user_watches); watch a smaller tree",
                            self.path
                        ),
                    ))
                }
                Err(e) => return Err(self.failure(e, &below)),
            };
            if !seen.insert(wd) {
                // The same directory again (a bind mount): watched already, walked already.
                continue;
            }
            found[at].wd = Some(wd);
            let parent = match found[at].parent {
                None => top.parent,
                Some(p) => found[p].wd.unwrap_or(NO_PARENT),
            };
            added.push((
                wd,
                Node {
                    parent,
                    name: found[at].name.clone(),
                    len: found[at].len,
                },
            ));
            if !self.recursive {
                continue;
            }
            let mut entries = match Dir::read_from(dir) {
                Ok(entries) => entries,
                Err(Errno::NOENT) => continue,
                Err(e) => return Err(self.failure(e, &below)),
            };
            while let Some(entry) = entries.read() {
                let entry = match entry {
                    Ok(entry) => entry,
                    Err(Errno::NOENT) => break,
                    Err(e) => return Err(self.failure(e, &below)),
                };
                let name = entry.file_name();
                if name == c"." || name == c".." {
                    continue;
                }
                if !matches!(entry.file_type(), FileType::Directory | FileType::Unknown) {
                    continue;
                }
                let name: Box<str> = String::from_utf8_lossy(name.to_bytes()).into();
                let len = found[at].len + usize::from(found[at].len > 0) + name.len();
                if len > self.max_len {
                    return Err(AgentError::new(
                        ErrorCode::InvalidArgument,
                        format!(
                            "cannot watch {} recursively: it has directories deeper than \
                             {MAX_PATH} bytes of path (e.g. below {}); watch a deeper directory \
                             instead",
                            self.path,
                            join(self.path, &self.below(&found, at))
                        ),
                    ));
                }
                if found.len() >= self.budget {
                    return Err(AgentError::new(
                        ErrorCode::InvalidArgument,
                        format!(
                            "cannot watch {} recursively: more than {} directories to watch \
                             (the sandbox watches at most {MAX_DIRS} directories in all); \
                             watch a smaller tree",
                            self.path, self.budget
                        ),
                    ));
                }
                found.push(Found {
                    parent: Some(at),
                    name,
                    len,
                    wd: None,
                });
            }
        }
        Ok(())
    }

    /// The path of `found[at]` below the start of the walk (`""` for the start).
    fn below(&self, found: &[Found], at: usize) -> String {
        let mut names = Vec::new();
        let mut i = Some(at);
        while let Some(n) = i {
            if n == 0 {
                break;
            }
            names.push(&*found[n].name);
            i = found[n].parent;
        }
        names.reverse();
        names.join("/")
    }

    /// A failure to open, watch or read directory `below` (relative to the walk's start).
    fn failure(&self, e: Errno, below: &str) -> AgentError {
        let dir = join(self.path, below);
        match e {
            Errno::MFILE | Errno::NFILE | Errno::NOMEM => AgentError::new(
                ErrorCode::TooLarge,
                format!(
                    "cannot watch {}: the agent is out of resources opening {dir} ({}); try again \
                     later",
                    self.path,
                    errno_text(e)
                ),
            ),
            other => {
                let e = errno_error(other, &dir);
                AgentError::new(e.code, format!("cannot watch {}: {}", self.path, e.message))
            }
        }
    }
}

/// Opens directory `path` below `base`, never following a symlink (nor leaving `base`).
fn open_beneath(base: &OwnedFd, path: &str) -> Result<OwnedFd, Errno> {
    let mut last = Errno::AGAIN;
    for _ in 0..16 {
        match rustix::fs::openat2(
            base,
            path,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
            ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS,
        ) {
            Err(e @ (Errno::AGAIN | Errno::INTR)) => last = e,
            other => return other,
        }
    }
    Err(last)
}

/// One event read from the instance, owned.
#[derive(Debug)]
struct RawEvent {
    wd: i32,
    flags: ReadFlags,
    cookie: u32,
    name: Option<Vec<u8>>,
}

/// Reads the instance's events and dispatches them, until the agent drops its watches.
async fn read_loop(watches: Weak<Watches>, fd: AsyncFd<Arc<OwnedFd>>) {
    let mut buf = vec![MaybeUninit::<u8>::uninit(); READ_BUFFER];
    loop {
        let mut guard = match fd.readable().await {
            Ok(guard) => guard,
            Err(e) => {
                tracing::warn!(error = %e, "cannot poll the inotify instance");
                return;
            }
        };
        let batch = guard.try_io(|inner| {
            let mut reader = inotify::Reader::new(&**inner.get_ref(), &mut buf);
            let mut events = Vec::new();
            loop {
                match reader.next() {
                    Ok(e) => events.push(RawEvent {
                        wd: e.wd(),
                        flags: e.events(),
                        cookie: e.cookie(),
                        name: e.file_name().map(|n| n.to_bytes().to_vec()),
                    }),
                    Err(Errno::WOULDBLOCK) if events.is_empty() => {
                        return Err(std::io::ErrorKind::WouldBlock.into())
                    }
                    Err(Errno::WOULDBLOCK) => break,
                    Err(e) => return Err(std::io::Error::from(e)),
                }
                if reader.is_buffer_empty() {
                    break;
                }
            }
            Ok(events)
        });
        let events = match batch {
            Ok(Ok(events)) => events,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "cannot read the inotify instance");
                return;
            }
            // Not readable after all; wait again.
            Err(_would_block) => continue,
        };
        let Some(watches) = watches.upgrade() else {
            return;
        };
        for event in events {
            watches.dispatch(event);
        }
    }
}

/// Sends watch `id`'s events on `out` as they come, until it ends or the connection closes.
/// Events leave the queue one at a time, so the queue's caps bound all the watch holds.
async fn pump(id: u64, mailbox: Rc<Mailbox>, out: OutTx) {
    loop {
        let Some(next) = mailbox.pop() else {
            mailbox.notify.notified().await;
            continue;
        };
        let (message, last) = match next {
            Next::Event(name, kind) => (
                AgentMessage::FileEvent {
                    watch: id,
                    name,
                    kind,
                },
                false,
            ),
            Next::Ended(reason) => (AgentMessage::WatchEnded { watch: id, reason }, true),
        };
        if out
            .send(Outbound::Frame(Frame::new(message)))
            .await
            .is_err()
            || last
        {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_queue_keeps_the_oldest_and_marks_the_loss() {
        let m = Mailbox::default();
        for i in 0..MAX_QUEUED + 10 {
            m.push(format!("f{i}"), FileEventKind::Create);
        }
        let q = m.queue.borrow();
        assert_eq!(q.events.len(), MAX_QUEUED);
        assert_eq!(q.events[0].0, "f0");
        assert!(q.overflow);
    }

    #[test]
    fn repeated_changes_are_one_event() {
        let m = Mailbox::default();
        m.push("a".into(), FileEventKind::Write);
        m.push("a".into(), FileEventKind::Write);
        m.push("b".into(), FileEventKind::Write);
        m.push("a".into(), FileEventKind::Write);
        let q = m.queue.borrow();
        let names: Vec<&str> = q.events.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["a", "b", "a"]);
    }

    #[test]
    fn queues_are_capped_by_bytes_per_watch_and_in_all() {
        let total = Rc::new(Cell::new(0));
        let long = "x".repeat(4000);
        let m = Mailbox::new(total.clone());
        for i in 0..200 {
            m.push(format!("{long}{i}"), FileEventKind::Create);
        }
        let kept = m.queue.borrow().events.len();
        assert!(kept < 200 && kept * 4000 <= MAX_QUEUED_BYTES, "{kept}");
        assert!(m.queue.borrow().overflow);
        assert_eq!(total.get(), m.queue.borrow().bytes);
        // Many watches together stop at the agent's cap.
        let others: Vec<Mailbox> = (0..64).map(|_| Mailbox::new(total.clone())).collect();
        for o in &others {
            for i in 0..100 {
                o.push(format!("{long}{i}"), FileEventKind::Create);
            }
        }
        assert!(total.get() <= MAX_QUEUED_BYTES_TOTAL);
        assert!(others.last().is_some_and(|o| o.queue.borrow().overflow));
        // Sending and dropping give the bytes back.
        while let Some(Next::Event(..)) = m.pop() {}
        drop(others);
        drop(m);
        assert_eq!(total.get(), 0);
    }

    #[test]
    fn paths_are_built_from_parents() {
        let node = |parent, name: &str, len| Node {
            parent,
            name: name.into(),
            len,
        };
        let mut w = Watch {
            path: "/w".into(),
            recursive: true,
            root_wd: 1,
            dirs: HashMap::new(),
            by_name: HashMap::new(),
            mailbox: Rc::default(),
            pump: None,
        };
        for (wd, n) in [
            (1, node(NO_PARENT, "", 0)),
            (2, node(1, "a", 1)),
            (3, node(2, "b", 3)),
            // A cycle (cannot happen, must not hang).
            (4, node(5, "x", 1)),
            (5, node(4, "y", 1)),
        ] {
            assert!(w.insert(wd, n));
        }
        assert!(!w.insert(2, node(1, "again", 5)));
        assert_eq!(w.rel(1).as_deref(), Some(""));
        assert_eq!(w.rel(3).as_deref(), Some("a/b"));
        assert_eq!(w.rel(9), None);
        assert_eq!(w.rel(4), None);
        assert_eq!(w.child(2, "b"), Some(3));
        w.remove(3);
        assert_eq!(w.child(2, "b"), None);
        assert_eq!(w.rel(3), None);
        assert_eq!(max_rel_len("/w"), MAX_PATH - 3);
    }

    #[test]
    fn names_join_below_the_root() {
        assert_eq!(join("", "a"), "a");
        assert_eq!(join("x/y", "a"), "x/y/a");
    }
}
