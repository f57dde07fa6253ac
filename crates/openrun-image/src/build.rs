//! `openrun image build`: runs a parsed Dockerfile ([`crate::dockerfile`]) into a tagged image.
//!
//! Each step after `FROM` is looked up in the build cache ([`crate::cache`]) by a key that
//! covers everything its result depends on: the image so far (its layers and config, the
//! shell, the `ARG`s in scope), the instruction with its words expanded, and for `COPY`/`ADD`
//! the digest of their sources (names, kinds, modes, sizes, contents, link targets). A miss
//! runs the step:
//!
//! - `RUN` in a real sandbox (the image so far as its lowers, its environment, working dir and
//!   user, no network, the writable layer on disk); its output is streamed as it comes. Once
//!   the command ends the sandbox is frozen, its writable layer becomes the step's layer (ids
//!   shifted back from the sandbox's range; whiteouts and opaque directories kept) and the
//!   sandbox is destroyed. A command that fails stops the build with its line and status.
//! - `COPY`/`ADD` write a new layer on the host side ([`crate::copy`]).
//! - `WORKDIR` makes a layer with the directory when the image lacks it.
//! - The others only change the config.
//!
//! Every step's layer is committed to the store as soon as it is made (the next step's
//! sandbox stacks it); the image is tagged only when every step succeeded, so a failed build
//! tags nothing (its layers stay until a prune finds them unused).

use std::collections::BTreeMap;
use std::io;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use openrun_protocol::frame::{read_frame, write_frame};
use openrun_protocol::{
    AgentMessage, ExecRequest, ExitStatus, Frame, FrameError, Request, RequestEnvelope, Response,
};
use openrun_runtime::{
    ClientError, ImageSource, Limits, Runtime, RuntimeError, SandboxSpec, Storage,
};
use serde_json::json;

use crate::cache::{key_of, Cache};
use crate::context::Context;
use crate::copy::{parse_chmod, resolve_owner, CopyStep};
use crate::dockerfile::{self, default_shell, Command, Dockerfile, Instruction, Kind, ParseError};
use crate::error::ImageError;
use crate::layer::IdShift;
use crate::rootfs::{self, ImageView, Node};
use crate::{ImageConfig, ImageRecord, ImageRef, Store, MAX_LAYERS};

/// Most bytes of a failed `RUN`'s output kept for its error.
const OUTPUT_TAIL: usize = 16 << 10;
/// Longest instruction text quoted in an error.
const SHOWN_INSTRUCTION: usize = 120;

/// Why a build failed.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// The Dockerfile does not parse, or uses what is not supported.
    #[error(transparent)]
    Parse(#[from] ParseError),
    /// A step that cannot be done as written (a missing source, an unknown user, a bad
    /// value once expanded, `ADD` of a URL, ...).
    #[error("Dockerfile line {line}: {instruction}: {message}")]
    Step {
        /// Line of the instruction.
        line: usize,
        /// The instruction (shortened).
        instruction: String,
        /// What is wrong.
        message: String,
    },
    /// A `RUN` command that did not succeed.
    #[error("Dockerfile line {line}: {instruction}: {status}")]
    RunFailed {
        /// Line of the instruction.
        line: usize,
        /// The instruction (shortened).
        instruction: String,
        /// How it ended (`exited with code 2`, `was killed by signal 9`, ...).
        status: String,
        /// The end of its output (stdout and stderr as they came).
        output: String,
    },
    /// Options or input the builder cannot use (no layers, a bad build argument, ...).
    #[error("{0}")]
    Invalid(String),
    /// The store refused or failed.
    #[error(transparent)]
    Image(#[from] ImageError),
    /// A build sandbox could not be made or used.
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    /// A host-side operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// Why it failed.
        #[source]
        source: io::Error,
    },
}

impl BuildError {
    /// Whether the error comes from the build's input (the Dockerfile, the context, the
    /// arguments, a failing command) rather than the host.
    pub fn is_user_error(&self) -> bool {
        match self {
            Self::Parse(_) | Self::Step { .. } | Self::RunFailed { .. } | Self::Invalid(_) => true,
            Self::Image(e) => e.is_user_error(),
            Self::Runtime(e) => e.is_user_error(),
            Self::Io { .. } => false,
        }
    }

    pub(crate) fn io(context: impl Into<String>, source: impl Into<io::Error>) -> Self {
        Self::Io {
            context: context.into(),
            source: source.into(),
        }
    }
}

/// What to build.
#[derive(Debug, Clone)]
pub struct BuildOptions {
    /// The name to tag the result with.
    pub tag: ImageRef,
    /// The build context (the directory `COPY` reads).
    pub context: PathBuf,
    /// Where the Dockerfile came from (recorded as the image's source).
    pub dockerfile: PathBuf,
    /// `--build-arg` values.
    pub build_args: BTreeMap<String, String>,
    /// Run every step even when the cache has it.
    pub no_cache: bool,
    /// Limits of every `RUN` sandbox: each one set replaces the default (none for memory,
    /// CPU and disk; the runtime's default pids).
    pub limits: Limits,
}

/// Progress of a build, as it happens.
#[derive(Debug)]
pub enum BuildEvent<'a> {
    /// A step starts (`number` of `total`, from 1).
    Step {
        /// Its number.
        number: usize,
        /// How many there are.
        total: usize,
        /// Its Dockerfile line.
        line: usize,
        /// The instruction.
        text: &'a str,
    },
    /// The step's result came from the cache.
    Cached {
        /// The layer it adds, if any.
        layer: Option<&'a str>,
    },
    /// Output of a `RUN` command (stdout and stderr as they came).
    Output(&'a [u8]),
    /// The step ran.
    Done {
        /// The layer it adds, if any.
        layer: Option<&'a str>,
        /// How long it took.
        elapsed: Duration,
    },
    /// Something the user should know (an `EXPOSE` with no effect, skipped files, unused
    /// build arguments).
    Warning(&'a str),
}

/// One step of a finished build.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct StepReport {
    /// Its Dockerfile line.
    pub line: usize,
    /// The instruction.
    pub instruction: String,
    /// Whether it came from the cache (`None` for `FROM` and the `ARG`s before it, which
    /// are not cached).
    pub cached: Option<bool>,
    /// The layer it added, if any.
    pub layer: Option<String>,
}

/// A finished build.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BuildReport {
    /// The tag given.
    pub image: String,
    /// sha256 of the image (its layers and config), `sha256:<hex>`.
    pub digest: String,
    /// Its record as stored.
    pub record: ImageRecord,
    /// Every step.
    pub steps: Vec<StepReport>,
}

impl BuildReport {
    /// Steps that can be cached, and how many of them were.
    pub fn cache_hits(&self) -> (usize, usize) {
        let cacheable = self.steps.iter().filter(|s| s.cached.is_some());
        let hits = cacheable.clone().filter(|s| s.cached == Some(true)).count();
        (hits, cacheable.count())
    }
}

/// The image being built.
#[derive(Debug, Clone, Default, serde::Serialize)]
struct State {
    layers: Vec<String>,
    config: ImageConfig,
    shell: Vec<String>,
    /// `ARG`s in scope: their values (`None`: declared without one).
    args: BTreeMap<String, Option<String>>,
}

impl State {
    /// The value of `name` for expansions: the environment first, then the `ARG`s.
    fn var(&self, name: &str) -> Option<String> {
        let prefix = format!("{name}=");
        self.config
            .env
            .iter()
            .rev()
            .find_map(|kv| kv.strip_prefix(&prefix).map(str::to_string))
            .or_else(|| self.args.get(name).cloned().flatten())
    }

    fn set_env(&mut self, name: &str, value: &str) {
        let prefix = format!("{name}=");
        self.config.env.retain(|kv| !kv.starts_with(&prefix));
        self.config.env.push(format!("{name}={value}"));
    }
}

/// Builds `dockerfile` with `options`, tagging the result; reports progress to `events`.
/// `runtime` runs the `RUN` steps: this process must be single-threaded (sandboxes are forked
/// from it, like `openrun run`).
pub fn build(
    store: &Store,
    runtime: &Runtime,
    dockerfile: &Dockerfile,
    options: &BuildOptions,
    events: &mut dyn FnMut(BuildEvent<'_>),
) -> Result<BuildReport, BuildError> {
    if options.tag.is_host() {
        return Err(BuildError::Invalid(
            "cannot tag a build \"host\": it is the built-in image".into(),
        ));
    }
    for name in options.build_args.keys() {
        if !dockerfile::is_var_name(name) {
            return Err(BuildError::Invalid(format!(
                "invalid --build-arg name {name:?} (letters, digits and _, not starting with a digit)"
            )));
        }
    }
    let context = Context::open(&options.context).map_err(|e| BuildError::Invalid(e.0))?;
    let mut builder = Builder {
        store,
        runtime,
        options,
        context,
        cache: Cache::new(store),
        events,
        state: State::default(),
        consumed: Vec::new(),
        cmd_set: false,
        steps: Vec::new(),
    };
    let total = dockerfile.global_args.len() + dockerfile.instructions.len();
    let mut number = 0;
    let mut globals = State::default();
    for ins in &dockerfile.global_args {
        number += 1;
        builder.announce(number, total, ins);
        if let Kind::Arg(args) = &ins.kind {
            builder.declare(&mut globals, ins, args, &BTreeMap::new())?;
        }
        builder.steps.push(StepReport {
            line: ins.line,
            instruction: ins.text.clone(),
            cached: None,
            layer: None,
        });
    }
    let mut parent = None;
    for ins in &dockerfile.instructions {
        number += 1;
        builder.announce(number, total, ins);
        if let Kind::From { image } = &ins.kind {
            let name = builder.expand(&globals, ins, image)?;
            parent = builder.from(ins, &name)?;
            builder.state.args.clear();
            builder.steps.push(StepReport {
                line: ins.line,
                instruction: ins.text.clone(),
                cached: None,
                layer: None,
            });
            continue;
        }
        let started = Instant::now();
        let (cached, layer) = builder.step(ins, &globals)?;
        match (cached, &layer) {
            (true, layer) => (builder.events)(BuildEvent::Cached {
                layer: layer.as_deref(),
            }),
            (false, layer) => (builder.events)(BuildEvent::Done {
                layer: layer.as_deref(),
                elapsed: started.elapsed(),
            }),
        }
        builder.steps.push(StepReport {
            line: ins.line,
            instruction: ins.text.clone(),
            cached: Some(cached),
            layer,
        });
    }
    let unused: Vec<&str> = options
        .build_args
        .keys()
        .filter(|k| !builder.consumed.contains(k))
        .map(String::as_str)
        .collect();
    if !unused.is_empty() {
        let message = format!("build arguments not used by any ARG: {}", unused.join(", "));
        (builder.events)(BuildEvent::Warning(&message));
    }
    let state = builder.state;
    if state.layers.is_empty() {
        return Err(BuildError::Invalid(
            "the image has no layers: after FROM scratch, COPY or ADD something".into(),
        ));
    }
    let record = ImageRecord {
        layers: state.layers,
        config: state.config,
        created_at: crate::now(),
        source: format!("dockerfile:{}", options.dockerfile.display()),
        parent,
        base: None,
    };
    store.put(&options.tag, &record).map_err(|e| match e {
        ImageError::MissingLayers(missing) => pruned(missing),
        e => e.into(),
    })?;
    let digest = format!(
        "sha256:{}",
        key_of(&json!({"layers": record.layers, "config": record.config}))
    );
    Ok(BuildReport {
        image: options.tag.to_string(),
        digest,
        record,
        steps: builder.steps,
    })
}

struct Builder<'a, 'e> {
    store: &'a Store,
    runtime: &'a Runtime,
    options: &'a BuildOptions,
    context: Context,
    cache: Cache<'a>,
    events: &'e mut dyn FnMut(BuildEvent<'_>),
    state: State,
    /// Build arguments some `ARG` took.
    consumed: Vec<String>,
    /// Whether this Dockerfile set `CMD` (an `ENTRYPOINT` resets an inherited one).
    cmd_set: bool,
    steps: Vec<StepReport>,
}

/// What a step does, once its words are expanded.
enum Plan {
    /// Only the config changes (to this state).
    Config(State),
    /// A `RUN` of this argv.
    Run(Vec<String>),
    /// A `COPY` or `ADD`.
    Copy(CopyPlan),
    /// `WORKDIR` of a directory the image lacks: the new state, and the directory's owner.
    Workdir(State, String, (u32, u32)),
}

struct CopyPlan {
    sources: Vec<String>,
    dest: String,
    owner: (u32, u32),
    chmod: Option<u32>,
    add: bool,
}

impl Builder<'_, '_> {
    fn announce(&mut self, number: usize, total: usize, ins: &Instruction) {
        (self.events)(BuildEvent::Step {
            number,
            total,
            line: ins.line,
            text: &ins.text,
        });
    }

    fn fail(&self, ins: &Instruction, message: impl Into<String>) -> BuildError {
        BuildError::Step {
            line: ins.line,
            instruction: shorten(&ins.text),
            message: message.into(),
        }
    }

    fn expand(
        &self,
        state: &State,
        ins: &Instruction,
        word: &dockerfile::Word,
    ) -> Result<String, BuildError> {
        word.expand(&|name| state.var(name))
            .map_err(|e| self.fail(ins, e))
    }

    /// Declares `args` in `state`: a build argument wins, then the default, then (for an
    /// `ARG` in the stage) the value of the same `ARG` before `FROM`.
    fn declare(
        &mut self,
        state: &mut State,
        ins: &Instruction,
        args: &[(String, Option<dockerfile::Word>)],
        globals: &BTreeMap<String, Option<String>>,
    ) -> Result<(), BuildError> {
        for (name, default) in args {
            let value = match (self.options.build_args.get(name), default) {
                (Some(v), _) => Some(v.clone()),
                (None, Some(word)) => Some(self.expand(state, ins, word)?),
                (None, None) => globals.get(name).cloned().flatten(),
            };
            if self.options.build_args.contains_key(name) && !self.consumed.contains(name) {
                self.consumed.push(name.clone());
            }
            state.args.insert(name.clone(), value);
        }
        Ok(())
    }

    /// Starts from `name`: `scratch` or an image of the store. Returns the parent to record.
    fn from(&mut self, ins: &Instruction, name: &str) -> Result<Option<String>, BuildError> {
        self.state = State {
            shell: default_shell(),
            ..State::default()
        };
        if name == "scratch" {
            return Ok(None);
        }
        let r = ImageRef::parse(name).map_err(|e| self.fail(ins, e.to_string()))?;
        // A tenant's snapshots are its own (the server resolves them per caller); a build
        // reads the store without tenancy, so it never starts from one, whatever the
        // Dockerfile's ARGs expand to.
        if is_tenant_image(&r) {
            return Err(self.fail(
                ins,
                format!("FROM {r}: a tenant's snapshot cannot be a build base"),
            ));
        }
        if r.is_host() {
            return Err(self.fail(
                ins,
                "the built-in host image cannot be built on; import or build a base image (e.g. openrun image build --debian bookworm)",
            ));
        }
        let record = self
            .store
            .get(&r)
            .map_err(|e| self.fail(ins, e.to_string()))?;
        if record.base.is_some() {
            return Err(self.fail(
                ins,
                format!("{r} is a snapshot of a sandbox on the built-in host image, which cannot be built on"),
            ));
        }
        self.state.layers = record.layers;
        self.state.config = record.config;
        Ok(Some(r.to_string()))
    }

    /// The host directories of the image so far, bottom to top.
    fn layer_dirs(&self) -> Vec<PathBuf> {
        self.state
            .layers
            .iter()
            .map(|l| self.store.layer_dir(l))
            .collect()
    }

    fn view(&self) -> Result<ImageView, BuildError> {
        ImageView::new(&self.layer_dirs())
            .map_err(|e| BuildError::io("cannot read the layers of the image being built", e))
    }

    /// Runs one step after `FROM`: returns whether it came from the cache, and its layer.
    fn step(
        &mut self,
        ins: &Instruction,
        globals: &State,
    ) -> Result<(bool, Option<String>), BuildError> {
        let plan = self.plan(ins, globals)?;
        let mut step_key = match &plan {
            Plan::Config(next) => json!({"config": next}),
            Plan::Run(argv) => json!({"run": argv}),
            Plan::Workdir(next, dir, owner) => {
                json!({"workdir": dir, "owner": owner, "next": next})
            }
            Plan::Copy(c) => json!({
                "copy": {"add": c.add, "sources": c.sources, "dest": c.dest, "owner": c.owner, "chmod": c.chmod}
            }),
        };
        let copy = match &plan {
            Plan::Copy(c) => {
                let view = self.view()?;
                let step = self.copy_step(c, &view);
                let (digest, skipped) = step.digest().map_err(|e| self.fail(ins, e))?;
                for s in skipped {
                    let message = format!("not copied (not a file, directory or link): {s}");
                    (self.events)(BuildEvent::Warning(&message));
                }
                step_key["inputs"] = json!(digest);
                Some(c)
            }
            _ => None,
        };
        let key = key_of(&json!({"v": 1, "state": self.state, "step": step_key}));
        let cached = if self.options.no_cache {
            None
        } else {
            self.cache.get(&key)
        };
        let (was_cached, layer) = match cached {
            Some(entry) => (true, entry.layer),
            None => {
                let layer = match &plan {
                    Plan::Config(_) => None,
                    Plan::Run(argv) => self.run(ins, argv)?,
                    Plan::Copy(_) => match copy {
                        Some(c) => self.copy(ins, c)?,
                        None => None,
                    },
                    Plan::Workdir(_, dir, owner) => self.workdir(ins, dir, *owner)?,
                };
                self.cache.put(&key, layer.as_deref())?;
                (false, layer)
            }
        };
        match plan {
            Plan::Config(next) | Plan::Workdir(next, ..) => self.state = next,
            Plan::Run(_) | Plan::Copy(_) => {}
        }
        if let Some(layer) = &layer {
            if self.state.layers.len() >= MAX_LAYERS {
                return Err(self.fail(
                    ins,
                    format!("the image would have more than {MAX_LAYERS} layers"),
                ));
            }
            self.state.layers.push(layer.clone());
        }
        Ok((was_cached, layer))
    }

    /// Expands the instruction's words into what it will do.
    fn plan(&mut self, ins: &Instruction, globals: &State) -> Result<Plan, BuildError> {
        let mut next = self.state.clone();
        match &ins.kind {
            Kind::From { .. } => Err(self.fail(ins, "a second FROM")),
            Kind::Arg(args) => {
                self.declare(&mut next, ins, args, &globals.args)?;
                Ok(Plan::Config(next))
            }
            Kind::Env(pairs) => {
                // Every value sees the variables as they were before this instruction.
                let mut values = Vec::new();
                for (k, v) in pairs {
                    let name = self.expand(&self.state, ins, k)?;
                    if name.is_empty() || name.contains(['=', '\0']) {
                        return Err(self.fail(ins, format!("invalid variable name {name:?}")));
                    }
                    values.push((name, self.expand(&self.state, ins, v)?));
                }
                for (k, v) in values {
                    next.set_env(&k, &v);
                }
                Ok(Plan::Config(next))
            }
            Kind::Label(pairs) => {
                for (k, v) in pairs {
                    let key = self.expand(&self.state, ins, k)?;
                    let value = self.expand(&self.state, ins, v)?;
                    if key.is_empty() {
                        return Err(self.fail(ins, "empty label key"));
                    }
                    next.config.labels.insert(key, value);
                }
                Ok(Plan::Config(next))
            }
            Kind::User(word) => {
                let user = self.expand(&self.state, ins, word)?;
                if user.is_empty() || user.contains(char::is_whitespace) {
                    return Err(self.fail(ins, format!("invalid user {user:?}")));
                }
                next.config.user = Some(user);
                Ok(Plan::Config(next))
            }
            Kind::Cmd(command) => {
                next.config.cmd = command.argv(&self.state.shell);
                self.cmd_set = true;
                Ok(Plan::Config(next))
            }
            Kind::Entrypoint(command) => {
                next.config.entrypoint = command.argv(&self.state.shell);
                if !self.cmd_set {
                    next.config.cmd.clear();
                }
                Ok(Plan::Config(next))
            }
            Kind::Shell(words) => {
                next.shell = words.clone();
                Ok(Plan::Config(next))
            }
            Kind::Expose(words) => {
                for word in words {
                    let port = self.expand(&self.state, ins, word)?;
                    if !valid_port(&port) {
                        return Err(self.fail(
                            ins,
                            format!("invalid port {port:?} (PORT[-PORT][/tcp|/udp|/sctp])"),
                        ));
                    }
                }
                (self.events)(BuildEvent::Warning(
                    "EXPOSE has no effect: sandboxes have no network",
                ));
                Ok(Plan::Config(next))
            }
            Kind::Run(command) => {
                if self.state.layers.is_empty() {
                    return Err(self.fail(
                        ins,
                        "the image is empty (FROM scratch): there is nothing to run",
                    ));
                }
                Ok(Plan::Run(self.run_argv(command)))
            }
            Kind::Workdir(word) => {
                let dir = self.expand(&self.state, ins, word)?;
                if dir.is_empty() {
                    return Err(self.fail(ins, "empty path"));
                }
                let base = self.state.config.working_dir.clone().unwrap_or_default();
                let dir = rootfs::clean(&if dir.starts_with('/') {
                    dir
                } else {
                    format!("{base}/{dir}")
                });
                next.config.working_dir = Some(dir.clone());
                let view = self.view()?;
                let exists = view.resolve(&dir, true).map_err(|e| self.fail(ins, e))?;
                if exists.missing.is_empty() && exists.last.is_none() {
                    return Ok(Plan::Config(next));
                }
                if let Some((_, Node::File { .. } | Node::Other)) = &exists.last {
                    return Err(self.fail(
                        ins,
                        format!("{} is not a directory in the image", exists.existing_path()),
                    ));
                }
                // Made for the current user, as Docker's BuildKit does.
                let owner = match &self.state.config.user {
                    Some(user) => resolve_owner(&view, user).map_err(|e| {
                        self.fail(ins, format!("cannot find the owner of the directory: {e}"))
                    })?,
                    None => (0, 0),
                };
                Ok(Plan::Workdir(next, dir, owner))
            }
            Kind::Copy(spec) | Kind::Add(spec) => {
                let add = matches!(ins.kind, Kind::Add(_));
                let mut sources = Vec::new();
                for word in &spec.sources {
                    let pattern = self.expand(&self.state, ins, word)?;
                    if add && is_url(&pattern) {
                        return Err(self.fail(
                            ins,
                            format!("ADD of a URL ({pattern}) is not supported: builds have no network; download it first and COPY it"),
                        ));
                    }
                    let found = self
                        .context
                        .expand(&pattern)
                        .map_err(|e| self.fail(ins, e.0))?;
                    sources.extend(found);
                }
                let raw_dest = self.expand(&self.state, ins, &spec.dest)?;
                if raw_dest.is_empty() {
                    return Err(self.fail(ins, "empty destination"));
                }
                let base = self.state.config.working_dir.clone().unwrap_or_default();
                let joined = if raw_dest.starts_with('/') {
                    raw_dest.clone()
                } else {
                    format!("{base}/{raw_dest}")
                };
                let mut dest = rootfs::clean(&joined);
                let dir_hint = raw_dest.ends_with('/')
                    || raw_dest.ends_with("/.")
                    || raw_dest == "."
                    || raw_dest.ends_with("/..")
                    || raw_dest == "..";
                if dir_hint && dest != "/" {
                    dest.push('/');
                }
                let view = self.view()?;
                let owner = match &spec.chown {
                    Some(word) => {
                        let owner = self.expand(&self.state, ins, word)?;
                        resolve_owner(&view, &owner).map_err(|e| self.fail(ins, e))?
                    }
                    None => (0, 0),
                };
                let chmod = match &spec.chmod {
                    Some(word) => {
                        let mode = self.expand(&self.state, ins, word)?;
                        Some(parse_chmod(&mode).map_err(|e| self.fail(ins, e))?)
                    }
                    None => None,
                };
                Ok(Plan::Copy(CopyPlan {
                    sources,
                    dest,
                    owner,
                    chmod,
                    add,
                }))
            }
        }
    }

    /// The argv of a `RUN`.
    fn run_argv(&self, command: &Command) -> Vec<String> {
        let shell = if self.state.shell.is_empty() {
            default_shell()
        } else {
            self.state.shell.clone()
        };
        command.argv(&shell)
    }

    fn copy_step<'v>(&'v self, c: &CopyPlan, view: &'v ImageView) -> CopyStep<'v> {
        CopyStep {
            ctx: &self.context,
            view,
            sources: c.sources.clone(),
            dest: c.dest.clone(),
            owner: c.owner,
            chmod: c.chmod,
            add: c.add,
        }
    }

    /// Makes and commits the layer of a `COPY`/`ADD`.
    fn copy(&mut self, ins: &Instruction, c: &CopyPlan) -> Result<Option<String>, BuildError> {
        let view = self.view()?;
        let work = self.store.work_dir()?;
        let tree = work.path().join("tree");
        let scratch = work.path().join("scratch");
        for dir in [&tree, &scratch] {
            std::fs::create_dir(dir)
                .map_err(|e| BuildError::io(format!("cannot create {}", dir.display()), e))?;
        }
        self.copy_step(c, &view)
            .write(&tree, &scratch)
            .map_err(|e| self.fail(ins, e))?;
        let source = format!("build:{} line {}", self.options.tag, ins.line);
        self.commit_tree(&tree, None, &source)
    }

    /// Makes and commits the layer that creates a `WORKDIR`.
    fn workdir(
        &mut self,
        ins: &Instruction,
        dir: &str,
        owner: (u32, u32),
    ) -> Result<Option<String>, BuildError> {
        let view = self.view()?;
        let work = self.store.work_dir()?;
        let tree = work.path().join("tree");
        std::fs::create_dir(&tree)
            .map_err(|e| BuildError::io(format!("cannot create {}", tree.display()), e))?;
        crate::copy::make_dirs(&view, dir, owner, &tree).map_err(|e| self.fail(ins, e))?;
        let source = format!("build:{} line {}", self.options.tag, ins.line);
        self.commit_tree(&tree, None, &source)
    }

    /// Adds the tree at `dir` to the store as a layer (`None` when it is empty).
    fn commit_tree(
        &self,
        dir: &std::path::Path,
        shift: Option<IdShift>,
        source: &str,
    ) -> Result<Option<String>, BuildError> {
        let empty = std::fs::read_dir(dir)
            .map_err(|e| BuildError::io(format!("cannot read {}", dir.display()), e))?
            .next()
            .is_none();
        if empty {
            return Ok(None);
        }
        let staged = self.store.stage_dir(dir, shift, source)?;
        let digest = staged.digest.clone();
        self.store.commit(vec![staged], None)?;
        Ok(Some(digest))
    }

    /// Runs `argv` in a sandbox of the image so far; its writable layer becomes the layer.
    fn run(&mut self, ins: &Instruction, argv: &[String]) -> Result<Option<String>, BuildError> {
        let mut spec = SandboxSpec::new(ImageSource::Layers {
            name: format!("build:{}", self.options.tag),
            layers: self.layer_dirs(),
        });
        spec.storage = Storage::Disk;
        spec.exit_with_creator = true;
        let limits = &self.options.limits;
        spec.limits.memory_bytes = limits.memory_bytes.or(spec.limits.memory_bytes);
        spec.limits.cpu_millis = limits.cpu_millis.or(spec.limits.cpu_millis);
        spec.limits.pids = limits.pids.or(spec.limits.pids);
        spec.limits.disk_bytes = limits.disk_bytes.or(spec.limits.disk_bytes);
        spec.limits.open_files = limits.open_files.or(spec.limits.open_files);
        // ARGs are in the environment of RUN steps (not of the image); ENV wins.
        for (k, v) in &self.state.args {
            if let Some(v) = v {
                spec.env.insert(k.clone(), v.clone());
            }
        }
        spec.env.append(&mut self.state.config.env_map());
        spec.cwd = self.state.config.working_dir.clone();
        spec.user = self.state.config.user.clone();
        let mut sandbox = {
            // The layers stay on disk (no prune) until the sandbox's record lists them.
            let _lease = self.store.lease()?;
            let missing: Vec<String> = self
                .state
                .layers
                .iter()
                .filter(|l| !self.store.has_layer(l))
                .cloned()
                .collect();
            if !missing.is_empty() {
                return Err(pruned(missing));
            }
            wait_single_threaded();
            self.runtime.create(&spec)?
        };
        let result = (|| {
            let control = sandbox.take_control().ok_or_else(|| {
                BuildError::io(
                    "the build sandbox has no control stream",
                    io::Error::from(io::ErrorKind::NotConnected),
                )
            })?;
            let (status, output) = exec(control, argv.to_vec(), self.events)?;
            let failure = match status {
                Ok(status) if status.success() => None,
                Ok(status) => Some(describe(&status)),
                Err(message) => Some(format!("cannot run {:?}: {message}", argv[0])),
            };
            if let Some(status) = failure {
                return Err(BuildError::RunFailed {
                    line: ins.line,
                    instruction: shorten(&ins.text),
                    status,
                    output,
                });
            }
            // Whatever the command left running stops writing before the layer is read.
            sandbox.pause()?;
            let upper = sandbox.upper_dir().ok_or_else(|| {
                BuildError::io(
                    "the build sandbox has no writable layer on disk",
                    io::Error::from(io::ErrorKind::NotFound),
                )
            })?;
            let shift = IdShift {
                base: sandbox.record().ids.host_base(),
                size: openrun_runtime::ids::RANGE_SIZE,
            };
            let source = format!("build:{} line {}", self.options.tag, ins.line);
            self.commit_tree(&upper, Some(shift), &source)
        })();
        let destroyed = self.runtime.destroy(sandbox);
        let layer = result?;
        destroyed?;
        Ok(layer)
    }
}

/// Whether `r` is a tenant's image (store name `tenants/<hash>/...`).
fn is_tenant_image(r: &ImageRef) -> bool {
    r.name
        .split('/')
        .next()
        .is_some_and(|first| first.eq_ignore_ascii_case("tenants"))
}

/// Runs `argv` attached through the agent's control stream, passing its output to `events`
/// as it comes. Returns how it ended (or why it could not start) and the end of its output.
///
/// Blocking I/O, no async runtime: a tokio runtime set up in this process would leave global
/// state that the next sandbox's agent (a fork of this process) cannot use.
fn exec(
    mut control: UnixStream,
    argv: Vec<String>,
    events: &mut dyn FnMut(BuildEvent<'_>),
) -> Result<(Result<ExitStatus, String>, String), BuildError> {
    let lost = |e: FrameError| RuntimeError::from(ClientError::Frame(e));
    let request = ExecRequest {
        argv,
        attach: true,
        tag: Some("build".into()),
        ..Default::default()
    };
    let envelope = RequestEnvelope {
        id: 1,
        request: Request::Exec(request),
    };
    write_frame(&mut control, &Frame::new(envelope)).map_err(lost)?;
    let mut tail: Vec<u8> = Vec::new();
    let mut pid = None;
    let status = loop {
        let frame: Frame<AgentMessage> = read_frame(&mut control).map_err(lost)?;
        match frame.header {
            AgentMessage::Response { id: 1, result } => match result {
                Ok(Response::Started { pid: started }) => pid = Some(started),
                Ok(other) => {
                    return Err(
                        RuntimeError::from(ClientError::Unexpected(format!("{other:?}"))).into(),
                    )
                }
                Err(err) => break Err(err.message),
            },
            AgentMessage::Output { .. } => {
                events(BuildEvent::Output(&frame.data));
                tail.extend_from_slice(&frame.data);
                if tail.len() > 2 * OUTPUT_TAIL {
                    tail.drain(..tail.len() - OUTPUT_TAIL);
                }
            }
            AgentMessage::Exit {
                pid: exited,
                status,
            } if Some(exited) == pid => break Ok(status),
            _ => {}
        }
    };
    let start = tail.len().saturating_sub(OUTPUT_TAIL);
    Ok((status, String::from_utf8_lossy(&tail[start..]).into_owned()))
}

/// Layers of the build gone before it could use or tag them: only a prune (which keeps the
/// layers of tagged images and live sandboxes, not those of a build in progress) removes them.
fn pruned(missing: Vec<String>) -> BuildError {
    BuildError::Invalid(format!(
        "layers this build made or uses were removed by a concurrent `openrun image prune` ({}); build again (the cache keeps what is still there)",
        missing.join(", ")
    ))
}

/// How a command ended, for the error.
fn describe(status: &ExitStatus) -> String {
    match (status.code, status.signal) {
        (_, Some(signal)) => format!("the command was killed by signal {signal}"),
        (Some(code), None) => format!("the command exited with code {code}"),
        (None, None) => "the command failed".into(),
    }
}

/// Waits (briefly) for threads that were joined to be gone from `/proc/self/task`: a
/// sandbox is forked from this process only while it is single-threaded.
fn wait_single_threaded() {
    let deadline = Instant::now() + Duration::from_secs(2);
    while Instant::now() < deadline {
        match std::fs::read_dir("/proc/self/task").map(|tasks| tasks.count()) {
            Ok(n) if n > 1 => std::thread::sleep(Duration::from_millis(1)),
            _ => return,
        }
    }
}

fn shorten(text: &str) -> String {
    if text.chars().count() <= SHOWN_INSTRUCTION {
        return text.to_string();
    }
    let mut s: String = text.chars().take(SHOWN_INSTRUCTION).collect();
    s.push('…');
    s
}

/// `scheme://...` or `git@host:...`.
fn is_url(s: &str) -> bool {
    if s.starts_with("git@") {
        return true;
    }
    match s.split_once("://") {
        Some((scheme, _)) => {
            !scheme.is_empty()
                && scheme
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
        }
        None => false,
    }
}

/// `PORT[-PORT][/tcp|/udp|/sctp]`.
fn valid_port(s: &str) -> bool {
    let (ports, proto) = match s.split_once('/') {
        Some((p, proto)) => (p, Some(proto)),
        None => (s, None),
    };
    let port_ok = |p: &str| p.parse::<u16>().is_ok_and(|n| n > 0);
    let ports_ok = match ports.split_once('-') {
        Some((a, b)) => port_ok(a) && port_ok(b),
        None => port_ok(ports),
    };
    ports_ok
        && proto.is_none_or(|p| matches!(p.to_ascii_lowercase().as_str(), "tcp" | "udp" | "sctp"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_and_ports() {
        assert!(is_url("https://example.com/x.tar.gz"));
        assert!(is_url("git@github.com:a/b.git"));
        assert!(!is_url("dir/file"));
        assert!(!is_url("a://"[..1].as_ref()));
        assert!(valid_port("8080"));
        assert!(valid_port("8080/tcp"));
        assert!(valid_port("1000-2000/udp"));
        assert!(!valid_port("0"));
        assert!(!valid_port("80/http"));
        assert!(!valid_port("x"));
    }

    /// The FROM check runs on the name the builder itself expanded: an ARG declared without
    /// a value is unset, so `${X-...}` takes its default.
    #[test]
    fn from_a_tenant_image_is_refused_after_expansion() {
        let dir = tempfile::tempdir().unwrap();
        let context = dir.path().join("ctx");
        std::fs::create_dir(&context).unwrap();
        let store = Store::open(&dir.path().join("data")).unwrap();
        let runtime = match Runtime::open(dir.path().join("data")) {
            Ok(runtime) => runtime,
            Err(e) => {
                eprintln!("skipped: no runtime here ({e})");
                return;
            }
        };
        for text in [
            "ARG X\nFROM ${X-tenants/abc/x}\nRUN true\n",
            "ARG X=tenants\nFROM ${X}/0123456789abcdef/up-recipe-1:latest\n",
            "ARG X\nARG Y=${X:-tenants/abc/y}\nFROM ${Y}\n",
        ] {
            let parsed = dockerfile::parse(text).unwrap();
            let options = BuildOptions {
                tag: ImageRef::parse("t:latest").unwrap(),
                context: context.clone(),
                dockerfile: context.join("Dockerfile"),
                build_args: BTreeMap::new(),
                no_cache: false,
                limits: Limits::default(),
            };
            let e = build(&store, &runtime, &parsed, &options, &mut |_| {}).unwrap_err();
            let message = e.to_string();
            assert!(
                message.contains("FROM tenants/")
                    && message.contains("a tenant's snapshot cannot be a build base"),
                "{text}: {message}"
            );
            assert!(e.is_user_error());
        }
    }
}
