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
//! what is watched is what was resolved. Subdirectories of a recursive watch are opened from
//! their parent's descriptor without following a symlink.
//!
//! Mapping (like envd's fsnotify): `IN_CREATE` and `IN_MOVED_TO` are `create`, `IN_MODIFY`
//! `write`, `IN_ATTRIB` `chmod`, `IN_DELETE` `remove`, `IN_MOVED_FROM` `rename`. The
//! temporary files of the agent's atomic writes are hidden: their rename over the final name
//! is reported as `create` and `write` of that name.

use std::cell::RefCell;
use std::collections::{HashMap, HashSet, VecDeque};
use std::mem::MaybeUninit;
use std::os::fd::AsRawFd;
use std::rc::{Rc, Weak};
use std::sync::Arc;

use openrun_protocol::{AgentError, AgentMessage, ErrorCode, FileEventKind, Frame};
use rustix::fd::{AsFd, OwnedFd};
use rustix::fs::inotify::{self, CreateFlags, ReadFlags, WatchFlags};
use rustix::fs::{Dir, FileType};
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
/// Events one watch keeps for a connection that reads slowly before it drops them (and
/// reports `overflow`).
pub(crate) const MAX_QUEUED: usize = 4096;
/// Bytes read from the inotify descriptor at once.
const READ_BUFFER: usize = 64 * 1024;
/// Renames of temporary files remembered until their `IN_MOVED_TO` arrives.
const MAX_PENDING_COOKIES: usize = 256;

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
}

impl Mailbox {
    fn push(&self, name: String, kind: FileEventKind) {
        {
            let mut q = self.queue.borrow_mut();
            if q.ended.is_some() {
                return;
            }
            if kind == FileEventKind::Overflow {
                q.overflow = true;
            } else if q
                .events
                .back()
                .is_some_and(|(n, k)| *k == kind && *n == name)
            {
                // The same change again before anyone read the first: one event says it.
                return;
            } else if q.events.len() >= MAX_QUEUED {
                q.overflow = true;
            } else {
                q.events.push_back((name, kind));
            }
        }
        self.notify.notify_one();
    }

    fn end(&self, reason: String) {
        self.queue.borrow_mut().ended.get_or_insert(reason);
        self.notify.notify_one();
    }
}

/// One watch.
#[derive(Debug)]
struct Watch {
    /// The directory as the client named it.
    path: String,
    recursive: bool,
    /// Descriptor of the watched directory itself.
    root_wd: i32,
    /// Every watched directory: descriptor to path relative to the root (`""` for the root).
    dirs: HashMap<i32, String>,
    mailbox: Rc<Mailbox>,
    pump: Option<JoinHandle<()>>,
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

#[derive(Debug, Default)]
struct State {
    inotify: Option<Inotify>,
    next_id: u64,
    watches: HashMap<u64, Watch>,
    /// Which watches use each kernel watch descriptor.
    users: HashMap<i32, HashSet<u64>>,
    /// Cookies of temporary files moved away, whose `IN_MOVED_TO` is an atomic write.
    temp_moves: VecDeque<u32>,
}

/// Every watch of the agent.
#[derive(Debug)]
pub(crate) struct Watches {
    files: Arc<Files>,
    state: RefCell<State>,
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

/// A directory the kernel watches for a watch, as found by [`add_tree`].
type Added = Vec<(i32, String)>;

impl Watches {
    /// No watches yet; the inotify instance is made at the first.
    pub(crate) fn new(files: Arc<Files>) -> Rc<Self> {
        Rc::new(Self {
            files,
            state: RefCell::new(State::default()),
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
    /// beyond [`MAX_WATCHES`] watches or [`MAX_DIRS`] directories in all.
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
            MAX_DIRS.saturating_sub(state.users.len())
        };
        let fd = self.instance()?;
        let files = self.files.clone();
        let (added, result) = {
            let path = path.clone();
            let fd = fd.clone();
            tokio::task::spawn_blocking(move || {
                let mut added = Vec::new();
                let result = files.open_dir(&path).and_then(|dir| {
                    add_tree(
                        &fd,
                        dir,
                        String::new(),
                        recursive,
                        budget,
                        &path,
                        &mut added,
                    )
                });
                (added, result)
            })
            .await
            .map_err(|e| internal("watching failed", e))?
        };
        if let Err(e) = result {
            self.forget_unused(&added);
            return Err(e);
        }
        let Some(&(root_wd, _)) = added.first() else {
            return Err(internal(
                "watching failed",
                "no descriptor for the directory",
            ));
        };
        let mailbox = Rc::new(Mailbox::default());
        let mut state = self.state.borrow_mut();
        state.next_id += 1;
        let id = state.next_id;
        for (wd, _) in &added {
            state.users.entry(*wd).or_default().insert(id);
        }
        state.watches.insert(
            id,
            Watch {
                path,
                recursive,
                root_wd,
                dirs: added.into_iter().collect(),
                mailbox: mailbox.clone(),
                pump: None,
            },
        );
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
        if let Some(ino) = &state.inotify {
            for wd in unused {
                // Fails only for a watch the kernel already dropped (its directory is gone).
                let _ = inotify::remove_watch(&*ino.fd, wd);
            }
        }
    }

    /// After a failed watch: removes the kernel watches it added that no watch uses.
    fn forget_unused(&self, added: &Added) {
        let state = self.state.borrow();
        if let Some(ino) = &state.inotify {
            for (wd, _) in added {
                if !state.users.contains_key(wd) {
                    let _ = inotify::remove_watch(&*ino.fd, *wd);
                }
            }
        }
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
        let moved_away = flags.contains(ReadFlags::MOVED_FROM);
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
                let Some(rel) = w.dirs.get(&event.wd) else {
                    continue;
                };
                let rel = join(rel, &name);
                for kind in kinds {
                    w.mailbox.push(rel.clone(), *kind);
                }
                if w.recursive && is_dir && appeared {
                    grow.push((*id, rel.clone()));
                } else if w.recursive && is_dir && moved_away {
                    shrink.push((*id, rel));
                }
            }
        }
        for (id, rel) in shrink {
            self.forget_subtree(id, &rel);
        }
        for (id, rel) in grow {
            let watches = self.clone();
            tokio::task::spawn_local(async move { watches.grow(id, rel).await });
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
                w.dirs.remove(&wd);
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

    /// A directory of watch `id` moved away: stops watching it and everything below.
    fn forget_subtree(&self, id: u64, rel: &str) {
        let wds: Vec<i32> = {
            let mut state = self.state.borrow_mut();
            let Some(w) = state.watches.get_mut(&id) else {
                return;
            };
            let prefix = format!("{rel}/");
            let gone: Vec<i32> = w
                .dirs
                .iter()
                .filter(|(_, r)| *r == rel || r.starts_with(&prefix))
                .map(|(wd, _)| *wd)
                .collect();
            for wd in &gone {
                w.dirs.remove(wd);
            }
            gone
        };
        self.release(id, &wds);
    }

    /// A directory appeared at `rel` in recursive watch `id`: watches it and its subtree.
    async fn grow(self: Rc<Self>, id: u64, rel: String) {
        let (path, budget, fd) = {
            let state = self.state.borrow();
            let (Some(w), Some(ino)) = (state.watches.get(&id), &state.inotify) else {
                return;
            };
            (
                w.path.clone(),
                MAX_DIRS.saturating_sub(state.users.len()),
                ino.fd.clone(),
            )
        };
        let files = self.files.clone();
        let (added, result) = {
            let rel = rel.clone();
            let outcome = tokio::task::spawn_blocking(move || {
                let mut added = Vec::new();
                let (parent, name) = match rel.rsplit_once('/') {
                    Some((parent, name)) => (join(&path, parent), name.to_string()),
                    None => (path.clone(), rel.clone()),
                };
                let result = files.open_dir(&parent).and_then(|dir| {
                    let sub = open_subdir(&dir, name.as_str()).map_err(|e| errno_error(e, &rel))?;
                    if !watchable_subdir(sub.as_fd()) {
                        return Ok(());
                    }
                    add_tree(&fd, sub, rel.clone(), true, budget, &path, &mut added)
                });
                (added, result)
            })
            .await;
            match outcome {
                Ok(outcome) => outcome,
                Err(_) => return,
            }
        };
        let mut state = self.state.borrow_mut();
        let Some(w) = state.watches.get_mut(&id) else {
            drop(state);
            self.forget_unused(&added);
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
        for (wd, r) in &added {
            w.dirs.insert(*wd, r.clone());
        }
        for (wd, _) in &added {
            state.users.entry(*wd).or_default().insert(id);
        }
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

/// Adds a kernel watch for `dir` (relative path `rel`) and, when `recursive`, for every
/// directory below it, breadth first, appending what it added to `added`. More than `budget`
/// directories is [`ErrorCode::TooLarge`]; subdirectories that vanish or cannot be read are
/// skipped. `path` names the watch in errors.
fn add_tree(
    ino: &OwnedFd,
    dir: OwnedFd,
    rel: String,
    recursive: bool,
    budget: usize,
    path: &str,
    added: &mut Added,
) -> Result<(), AgentError> {
    let mut pending = VecDeque::from([(dir, rel)]);
    while let Some((dir, rel)) = pending.pop_front() {
        if added.len() >= budget {
            return Err(AgentError::new(
                ErrorCode::TooLarge,
                format!(
                    "cannot watch {path}: more than {budget} directories to watch \
                     (the sandbox watches at most {MAX_DIRS} in all)"
                ),
            ));
        }
        let target = format!("/proc/self/fd/{}", dir.as_raw_fd());
        let wd = inotify::add_watch(ino, target.as_str(), MASK).map_err(|e| match e {
            Errno::NOSPC => AgentError::new(
                ErrorCode::TooLarge,
                format!(
                    "cannot watch {path}: the sandbox's inotify watches are used up \
                     (fs.inotify.max_user_watches)"
                ),
            ),
            other => errno_error(other, path),
        })?;
        added.push((wd, rel.clone()));
        if !recursive {
            continue;
        }
        let Ok(mut entries) = Dir::read_from(&dir) else {
            continue;
        };
        while let Some(Ok(entry)) = entries.read() {
            let name = entry.file_name();
            if name == c"." || name == c".." {
                continue;
            }
            if !matches!(entry.file_type(), FileType::Directory | FileType::Unknown) {
                continue;
            }
            // Opened without following a symlink; a non-directory fails with ENOTDIR.
            let Ok(sub) = open_subdir(&dir, name) else {
                continue;
            };
            if !watchable_subdir(sub.as_fd()) {
                continue;
            }
            let child = join(&rel, &String::from_utf8_lossy(name.to_bytes()));
            pending.push_back((sub, child));
        }
    }
    Ok(())
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
async fn pump(id: u64, mailbox: Rc<Mailbox>, out: OutTx) {
    loop {
        let (events, overflow, ended) = {
            let mut q = mailbox.queue.borrow_mut();
            let events: Vec<_> = q.events.drain(..).collect();
            let overflow = std::mem::take(&mut q.overflow);
            (events, overflow, q.ended.clone())
        };
        if events.is_empty() && !overflow && ended.is_none() {
            mailbox.notify.notified().await;
            continue;
        }
        let overflow = overflow.then(|| (String::new(), FileEventKind::Overflow));
        for (name, kind) in events.into_iter().chain(overflow) {
            let frame = Frame::new(AgentMessage::FileEvent {
                watch: id,
                name,
                kind,
            });
            if out.send(Outbound::Frame(frame)).await.is_err() {
                return;
            }
        }
        if let Some(reason) = ended {
            let frame = Frame::new(AgentMessage::WatchEnded { watch: id, reason });
            let _ = out.send(Outbound::Frame(frame)).await;
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
    fn names_join_below_the_root() {
        assert_eq!(join("", "a"), "a");
        assert_eq!(join("x/y", "a"), "x/y/a");
    }
}
