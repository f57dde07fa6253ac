//! The Dockerfile subset `openrun image build` understands: parsing (pure) and the word
//! expansion the builder applies with the variables in scope.
//!
//! Supported: `FROM` (one stage: a store image or `scratch`; `AS name` is accepted), `RUN`,
//! `CMD`, `ENTRYPOINT` (shell and JSON exec form), `COPY` and `ADD` (local files of the build
//! context; `--chown`, `--chmod`, `--link`), `ENV`, `ARG` (also before `FROM`), `WORKDIR`,
//! `USER`, `LABEL`, `SHELL`, comments, line continuations and the `escape` parser directive.
//! `EXPOSE` is accepted and has no effect (sandboxes have no network); `MAINTAINER` becomes the
//! label `maintainer`. `HEALTHCHECK`, `ONBUILD`, `VOLUME`, `STOPSIGNAL`, a second `FROM`
//! (multi-stage builds), `COPY --from`, `RUN --mount` and the like, and heredocs are refused
//! naming the instruction and its line.

use std::fmt;

/// A syntax error, an unsupported instruction or a bad value, with the line it is on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseError {
    /// 1-based line of the instruction (`None` for the file as a whole).
    pub line: Option<usize>,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(line) => write!(f, "Dockerfile line {line}: {}", self.message),
            None => write!(f, "Dockerfile: {}", self.message),
        }
    }
}

impl std::error::Error for ParseError {}

/// A parsed Dockerfile.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dockerfile {
    /// `ARG`s before `FROM` (usable in `FROM`, and after it when declared again).
    pub global_args: Vec<Instruction>,
    /// `FROM` and everything after it, in order.
    pub instructions: Vec<Instruction>,
}

/// One instruction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Instruction {
    /// 1-based line it starts on.
    pub line: usize,
    /// The instruction as written, continuation lines joined (`RUN apt-get update`).
    pub text: String,
    /// What it does.
    pub kind: Kind,
}

/// What an instruction does. Words are kept unexpanded ([`Word`]): the builder expands them
/// with the variables in scope at that step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    /// `FROM image [AS name]`.
    From {
        /// The image (`scratch`, or `name[:tag]` of the store).
        image: Word,
    },
    /// `ARG name[=default] ...`.
    Arg(Vec<(String, Option<Word>)>),
    /// `RUN`.
    Run(Command),
    /// `COPY`.
    Copy(CopySpec),
    /// `ADD` (a local tar archive is extracted).
    Add(CopySpec),
    /// `ENV name=value ...` (or the legacy `ENV name value`).
    Env(Vec<(Word, Word)>),
    /// `LABEL key=value ...`.
    Label(Vec<(Word, Word)>),
    /// `WORKDIR path`.
    Workdir(Word),
    /// `USER user[:group]`.
    User(Word),
    /// `CMD`.
    Cmd(Command),
    /// `ENTRYPOINT`.
    Entrypoint(Command),
    /// `SHELL ["executable", "parameters"]`: the shell of later shell-form instructions.
    Shell(Vec<String>),
    /// `EXPOSE port[/proto] ...`: recorded nowhere (sandboxes have no network).
    Expose(Vec<Word>),
}

/// A command of `RUN`, `CMD` or `ENTRYPOINT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Shell form: run by the shell (`/bin/sh -c` unless `SHELL` changed it).
    Shell(String),
    /// Exec form (a JSON array): the program and its arguments, as written.
    Exec(Vec<String>),
}

impl Command {
    /// The argv this command runs with `shell` as the shell of the shell form.
    pub fn argv(&self, shell: &[String]) -> Vec<String> {
        match self {
            Command::Shell(text) => shell.iter().cloned().chain([text.clone()]).collect(),
            Command::Exec(argv) => argv.clone(),
        }
    }
}

/// Sources and destination of `COPY`/`ADD`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopySpec {
    /// Source paths (relative to the build context; may hold `*`, `?` and `[...]`).
    pub sources: Vec<Word>,
    /// Destination in the image (relative ones start at the working directory).
    pub dest: Word,
    /// `--chown=user[:group]`.
    pub chown: Option<Word>,
    /// `--chmod=MODE` (octal).
    pub chmod: Option<Word>,
}

/// A word as written (quotes and escapes kept), expanded at build time by [`Word::expand`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Word {
    raw: String,
    escape: char,
}

/// The default shell of shell-form instructions.
pub fn default_shell() -> Vec<String> {
    vec!["/bin/sh".to_string(), "-c".to_string()]
}

impl Word {
    pub(crate) fn new(raw: &str, escape: char) -> Self {
        Self {
            raw: raw.to_string(),
            escape,
        }
    }

    /// The word as written.
    pub fn raw(&self) -> &str {
        &self.raw
    }

    /// Removes quotes and escapes and substitutes `$NAME`, `${NAME}`, `${NAME:-default}`,
    /// `${NAME-default}`, `${NAME:+alternative}`, `${NAME+alternative}`, `${NAME:?message}`
    /// and `${NAME?message}` with `vars` (unset names are empty). Single quotes keep their
    /// contents literal; in double quotes only `$`, `"` and the escape character are special.
    pub fn expand(&self, vars: &dyn Fn(&str) -> Option<String>) -> Result<String, String> {
        let chars: Vec<char> = self.raw.chars().collect();
        let mut expander = Expander {
            chars: &chars,
            pos: 0,
            escape: self.escape,
            vars,
            depth: 0,
        };
        let out = expander.until(None)?;
        Ok(out)
    }
}

/// Deepest nesting of `${NAME:-...}` words the expander follows: each level is a recursion,
/// and a Dockerfile nesting thousands deep would overflow the stack.
pub const MAX_NESTING: usize = 64;

struct Expander<'a> {
    chars: &'a [char],
    pos: usize,
    escape: char,
    vars: &'a dyn Fn(&str) -> Option<String>,
    /// `${...}` words being expanded around the current position.
    depth: usize,
}

impl Expander<'_> {
    fn peek(&self) -> Option<char> {
        self.chars.get(self.pos).copied()
    }

    /// Processes up to (not including) `stop` at the top level, or to the end.
    fn until(&mut self, stop: Option<char>) -> Result<String, String> {
        let mut out = String::new();
        while let Some(c) = self.peek() {
            if Some(c) == stop {
                return Ok(out);
            }
            self.pos += 1;
            match c {
                '\'' => loop {
                    match self.peek() {
                        Some('\'') => {
                            self.pos += 1;
                            break;
                        }
                        Some(c) => {
                            out.push(c);
                            self.pos += 1;
                        }
                        None => return Err("unterminated single quote".into()),
                    }
                },
                '"' => loop {
                    match self.peek() {
                        Some('"') => {
                            self.pos += 1;
                            break;
                        }
                        Some(c) if c == self.escape => {
                            self.pos += 1;
                            match self.peek() {
                                Some(n) if n == '"' || n == '$' || n == self.escape => {
                                    out.push(n);
                                    self.pos += 1;
                                }
                                _ => out.push(c),
                            }
                        }
                        Some('$') => {
                            self.pos += 1;
                            out.push_str(&self.variable()?);
                        }
                        Some(c) => {
                            out.push(c);
                            self.pos += 1;
                        }
                        None => return Err("unterminated double quote".into()),
                    }
                },
                c if c == self.escape => match self.peek() {
                    Some(n) => {
                        out.push(n);
                        self.pos += 1;
                    }
                    None => out.push(c),
                },
                '$' => out.push_str(&self.variable()?),
                c => out.push(c),
            }
        }
        match stop {
            Some(s) => Err(format!("missing {s:?}")),
            None => Ok(out),
        }
    }

    /// After a `$`: the substitution, or a literal `$` when no name follows.
    fn variable(&mut self) -> Result<String, String> {
        let is_name = |c: char| c.is_ascii_alphanumeric() || c == '_';
        if self.peek() != Some('{') {
            let start = self.pos;
            while self.peek().is_some_and(is_name) {
                self.pos += 1;
            }
            if start == self.pos {
                return Ok("$".into());
            }
            let name: String = self.chars[start..self.pos].iter().collect();
            return Ok((self.vars)(&name).unwrap_or_default());
        }
        self.pos += 1;
        let start = self.pos;
        while self.peek().is_some_and(is_name) {
            self.pos += 1;
        }
        let name: String = self.chars[start..self.pos].iter().collect();
        if name.is_empty() {
            return Err("bad substitution: ${} needs a variable name".into());
        }
        let value = (self.vars)(&name);
        let colon = self.peek() == Some(':');
        if colon {
            self.pos += 1;
        }
        let op = self.peek();
        match op {
            Some('}') if !colon => {
                self.pos += 1;
                Ok(value.unwrap_or_default())
            }
            Some(op @ ('-' | '+' | '?')) => {
                self.pos += 1;
                if self.depth >= MAX_NESTING {
                    return Err(format!(
                        "bad substitution: more than {MAX_NESTING} nested ${{...}} words"
                    ));
                }
                self.depth += 1;
                let word = self.until(Some('}'));
                self.depth -= 1;
                let word = word?;
                self.pos += 1;
                // With a colon an empty value counts as unset.
                let set = match &value {
                    Some(v) => !(colon && v.is_empty()),
                    None => false,
                };
                match op {
                    '-' => Ok(if set { value.unwrap_or_default() } else { word }),
                    '+' => Ok(if set { word } else { String::new() }),
                    _ if set => Ok(value.unwrap_or_default()),
                    _ if word.is_empty() => Err(format!("{name}: is not set")),
                    _ => Err(format!("{name}: {word}")),
                }
            }
            Some(c) => Err(format!(
                "bad substitution: unsupported modifier {c:?} in ${{{name}...}}"
            )),
            None => Err(format!("bad substitution: missing '}}' after ${{{name}")),
        }
    }
}

/// Parses a Dockerfile.
pub fn parse(text: &str) -> Result<Dockerfile, ParseError> {
    let lines: Vec<&str> = text.lines().collect();
    let (escape, first) = directives(&lines)?;
    let mut global_args = Vec::new();
    let mut instructions: Vec<Instruction> = Vec::new();
    let mut i = first;
    while i < lines.len() {
        let trimmed = lines[i].trim();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            i += 1;
            continue;
        }
        let start = i;
        let mut joined = String::new();
        loop {
            let line = lines[i];
            i += 1;
            let trimmed_end = line.trim_end();
            match trimmed_end.strip_suffix(escape) {
                Some(body) => {
                    joined.push_str(body);
                    // Comment and empty lines inside a continuation are dropped.
                    while i < lines.len() && {
                        let t = lines[i].trim();
                        t.is_empty() || t.starts_with('#')
                    } {
                        i += 1;
                    }
                    if i >= lines.len() {
                        break;
                    }
                }
                None => {
                    joined.push_str(line);
                    break;
                }
            }
        }
        let instruction = instruction(start + 1, joined.trim(), escape)?;
        let is_from = matches!(instruction.kind, Kind::From { .. });
        match (&instruction.kind, instructions.is_empty()) {
            (Kind::Arg(_), true) => global_args.push(instruction),
            (Kind::From { .. }, true) => instructions.push(instruction),
            (_, true) => {
                return Err(err(
                    instruction.line,
                    format!(
                        "{} before FROM (a Dockerfile starts with FROM, optionally after ARG)",
                        keyword(&instruction.text)
                    ),
                ))
            }
            _ if is_from => {
                return Err(err(
                    instruction.line,
                    "a second FROM: multi-stage builds are not supported",
                ))
            }
            _ => instructions.push(instruction),
        }
    }
    if instructions.is_empty() {
        return Err(ParseError {
            line: None,
            message: "no FROM instruction (the file is empty or has only comments and ARGs)".into(),
        });
    }
    Ok(Dockerfile {
        global_args,
        instructions,
    })
}

fn err(line: usize, message: impl Into<String>) -> ParseError {
    ParseError {
        line: Some(line),
        message: message.into(),
    }
}

fn keyword(text: &str) -> &str {
    text.split_whitespace().next().unwrap_or("")
}

/// Reads the parser directives at the top (`# escape=` and the ignored `# syntax=` and
/// `# check=`); returns the escape character and the first line after them.
fn directives(lines: &[&str]) -> Result<(char, usize), ParseError> {
    let mut escape = None;
    let mut seen: Vec<String> = Vec::new();
    for (n, line) in lines.iter().enumerate() {
        let Some(rest) = line.trim().strip_prefix('#') else {
            return Ok((escape.unwrap_or('\\'), n));
        };
        let Some((key, value)) = rest.split_once('=') else {
            return Ok((escape.unwrap_or('\\'), n));
        };
        let key = key.trim().to_ascii_lowercase();
        if key.is_empty() || !key.chars().all(|c| c.is_ascii_alphanumeric()) {
            return Ok((escape.unwrap_or('\\'), n));
        }
        if seen.contains(&key) {
            return Err(err(n + 1, format!("parser directive {key} given twice")));
        }
        seen.push(key.clone());
        let value = value.trim();
        if key == "escape" {
            escape = Some(match value {
                "\\" => '\\',
                "`" => '`',
                other => {
                    return Err(err(
                        n + 1,
                        format!("invalid escape directive {other:?}: it must be \\ or `"),
                    ))
                }
            });
        }
    }
    Ok((escape.unwrap_or('\\'), lines.len()))
}

/// Parses one logical line.
fn instruction(line: usize, text: &str, escape: char) -> Result<Instruction, ParseError> {
    let (word, rest) = match text.find(char::is_whitespace) {
        Some(at) => (&text[..at], text[at..].trim()),
        None => (text, ""),
    };
    if !word.chars().all(|c| c.is_ascii_alphabetic()) {
        return Err(err(
            line,
            format!("expected an instruction (FROM, RUN, COPY, ...), found {word:?}"),
        ));
    }
    let name = word.to_ascii_uppercase();
    let text = if rest.is_empty() {
        name.clone()
    } else {
        format!("{name} {rest}")
    };
    let kind = kind(&name, rest, escape).map_err(|m| err(line, m))?;
    Ok(Instruction { line, text, kind })
}

fn kind(name: &str, rest: &str, escape: char) -> Result<Kind, String> {
    let needs_args = |what: &str| {
        if rest.is_empty() {
            Err(format!("{name} needs {what}"))
        } else {
            Ok(())
        }
    };
    match name {
        "FROM" => {
            needs_args("an image")?;
            let (_, rest) = flags(name, rest, escape, &[])?;
            let words = split_words(rest, escape)?;
            let image = match words.as_slice() {
                [image] => image,
                [image, as_, _alias] if as_.eq_ignore_ascii_case("as") => image,
                _ => return Err("FROM takes one image, optionally followed by AS name".into()),
            };
            let image = checked_word(image, escape)?;
            Ok(Kind::From { image })
        }
        "ARG" => {
            needs_args("a name")?;
            let mut args = Vec::new();
            for word in split_words(rest, escape)? {
                let (name, default) = match word.split_once('=') {
                    Some((n, d)) => (n, Some(checked_word(d, escape)?)),
                    None => (word.as_str(), None),
                };
                if !is_var_name(name) {
                    return Err(format!(
                        "invalid ARG name {name:?} (letters, digits and _, not starting with a digit)"
                    ));
                }
                args.push((name.to_string(), default));
            }
            Ok(Kind::Arg(args))
        }
        "RUN" => {
            needs_args("a command")?;
            let (_, rest) = flags(name, rest, escape, &[])?;
            Ok(Kind::Run(command(name, rest)?))
        }
        "CMD" | "ENTRYPOINT" => {
            needs_args("a command")?;
            let command = command(name, rest)?;
            Ok(if name == "CMD" {
                Kind::Cmd(command)
            } else {
                Kind::Entrypoint(command)
            })
        }
        "COPY" | "ADD" => {
            needs_args("a source and a destination")?;
            let (flags, rest) = flags(name, rest, escape, &["chown", "chmod", "link"])?;
            no_heredoc(name, rest)?;
            let mut words = match json_array(rest) {
                Some(Ok(words)) => words
                    .iter()
                    .map(|w| checked_word(&escape_json_word(w, escape), escape))
                    .collect::<Result<Vec<_>, _>>()?,
                Some(Err(e)) => return Err(e),
                None => split_words(rest, escape)?
                    .iter()
                    .map(|w| checked_word(w, escape))
                    .collect::<Result<Vec<_>, _>>()?,
            };
            if words.len() < 2 {
                return Err(format!(
                    "{name} needs at least one source and a destination"
                ));
            }
            let dest = words.pop().unwrap_or_else(|| Word::new("", escape));
            let mut spec = CopySpec {
                sources: words,
                dest,
                chown: None,
                chmod: None,
            };
            for (flag, value) in flags {
                match (flag.as_str(), value) {
                    ("chown", Some(v)) => spec.chown = Some(checked_word(&v, escape)?),
                    ("chmod", Some(v)) => spec.chmod = Some(checked_word(&v, escape)?),
                    ("link", None) => {}
                    ("link", Some(v)) if v == "true" || v == "false" => {}
                    (flag, _) => return Err(format!("bad value for {name} --{flag}")),
                }
            }
            Ok(if name == "COPY" {
                Kind::Copy(spec)
            } else {
                Kind::Add(spec)
            })
        }
        "ENV" | "LABEL" => {
            needs_args("a name and a value")?;
            let pairs = pairs(name, rest, escape)?;
            Ok(if name == "ENV" {
                Kind::Env(pairs)
            } else {
                Kind::Label(pairs)
            })
        }
        "MAINTAINER" => {
            needs_args("a name")?;
            Ok(Kind::Label(vec![(
                Word::new("maintainer", escape),
                Word::new(&quote_literal(rest), escape),
            )]))
        }
        "WORKDIR" => {
            needs_args("a path")?;
            Ok(Kind::Workdir(checked_word(rest, escape)?))
        }
        "USER" => {
            needs_args("a user")?;
            let words = split_words(rest, escape)?;
            match words.as_slice() {
                [user] => Ok(Kind::User(checked_word(user, escape)?)),
                _ => Err("USER takes one user[:group]".into()),
            }
        }
        "SHELL" => match json_array(rest) {
            Some(Ok(words)) if !words.is_empty() => Ok(Kind::Shell(words)),
            Some(Ok(_)) => Err("SHELL needs at least the shell's path".into()),
            Some(Err(e)) => Err(e),
            None => Err("SHELL takes a JSON array, e.g. SHELL [\"/bin/bash\", \"-c\"]".into()),
        },
        "EXPOSE" => {
            needs_args("a port")?;
            let words = split_words(rest, escape)?
                .iter()
                .map(|w| checked_word(w, escape))
                .collect::<Result<Vec<_>, _>>()?;
            Ok(Kind::Expose(words))
        }
        "HEALTHCHECK" => {
            Err("HEALTHCHECK is not supported: sandboxes have no health checks".into())
        }
        "ONBUILD" => Err("ONBUILD is not supported".into()),
        "VOLUME" => {
            Err("VOLUME is not supported: a sandbox's files live in its own writable layer".into())
        }
        "STOPSIGNAL" => Err(
            "STOPSIGNAL is not supported: sandboxes are stopped by killing all their processes"
                .into(),
        ),
        other => Err(format!("unknown instruction {other}")),
    }
}

/// A `--name[=value]` flag.
type Flag = (String, Option<String>);

/// Leading `--flag[=value]` words; only `allowed` flags are accepted.
fn flags<'a>(
    name: &str,
    rest: &'a str,
    escape: char,
    allowed: &[&str],
) -> Result<(Vec<Flag>, &'a str), String> {
    let mut out = Vec::new();
    let mut rest = rest;
    while let Some(flag_text) = rest.strip_prefix("--") {
        let end = flag_text
            .find(char::is_whitespace)
            .unwrap_or(flag_text.len());
        let word = &flag_text[..end];
        let (flag, value) = match word.split_once('=') {
            Some((f, v)) => (f, Some(v)),
            None => (word, None),
        };
        if !allowed.contains(&flag) {
            let why = match (name, flag) {
                ("COPY" | "ADD", "from") => " (multi-stage builds are not supported)",
                ("FROM", "platform") => " (images are built for this machine only)",
                ("RUN", "network") => " (RUN steps never have a network)",
                _ => "",
            };
            return Err(format!("{name} --{flag} is not supported{why}"));
        }
        let value = match value {
            // The value may be quoted; a single word either way.
            Some(v) => {
                let words = split_words(v, escape)?;
                match words.as_slice() {
                    [one] => Some(one.clone()),
                    _ => return Err(format!("bad value for {name} --{flag}")),
                }
            }
            None => None,
        };
        out.push((flag.to_string(), value));
        rest = flag_text[end..].trim_start();
    }
    if rest.is_empty() {
        return Err(format!("{name} needs more than flags"));
    }
    Ok((out, rest))
}

/// The command of `RUN`, `CMD` or `ENTRYPOINT`: a JSON array is the exec form.
fn command(name: &str, rest: &str) -> Result<Command, String> {
    no_heredoc(name, rest)?;
    match json_array(rest) {
        Some(Ok(argv)) if argv.is_empty() => Err(format!("{name} [] has no program")),
        Some(Ok(argv)) => Ok(Command::Exec(argv)),
        Some(Err(e)) => Err(e),
        None => Ok(Command::Shell(rest.to_string())),
    }
}

/// `Some` when `rest` is written as a JSON array (starts with `[` and ends with `]`).
fn json_array(rest: &str) -> Option<Result<Vec<String>, String>> {
    let t = rest.trim();
    if !(t.starts_with('[') && t.ends_with(']')) {
        return None;
    }
    Some(serde_json::from_str::<Vec<String>>(t).map_err(|e| {
        format!("not a valid JSON array of strings ({e}); strings need double quotes, e.g. [\"sh\", \"-c\", \"echo hi\"]")
    }))
}

fn no_heredoc(name: &str, rest: &str) -> Result<(), String> {
    let heredoc = rest.split_whitespace().any(|w| {
        w.strip_prefix("<<").is_some_and(|tail| {
            let tail = tail.strip_prefix('-').unwrap_or(tail);
            let tail = tail.trim_start_matches(['"', '\'']);
            tail.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
        })
    });
    if heredoc {
        Err(format!(
            "heredocs (<<EOF) in {name} are not supported; put the script in a file and COPY it"
        ))
    } else {
        Ok(())
    }
}

/// `NAME=value` pairs, or the legacy `NAME value with spaces`.
fn pairs(name: &str, rest: &str, escape: char) -> Result<Vec<(Word, Word)>, String> {
    let words = split_words(rest, escape)?;
    let Some(first) = words.first() else {
        return Err(format!("{name} needs a name and a value"));
    };
    if !first.contains('=') {
        // Legacy form: the first word is the name, the rest of the line its value.
        let value = rest[first.len()..].trim_start();
        if value.is_empty() {
            return Err(format!(
                "{name} {first} has no value (write {name} {first}=VALUE)"
            ));
        }
        let key = checked_word(first, escape)?;
        check_key(name, &key)?;
        return Ok(vec![(key, checked_word(value, escape)?)]);
    }
    let mut out = Vec::new();
    for word in &words {
        let Some((k, v)) = word.split_once('=') else {
            return Err(format!("{name} expects NAME=VALUE pairs, found {word:?}"));
        };
        let key = checked_word(k, escape)?;
        check_key(name, &key)?;
        out.push((key, checked_word(v, escape)?));
    }
    Ok(out)
}

fn check_key(name: &str, key: &Word) -> Result<(), String> {
    if key.raw.is_empty() {
        return Err(format!("{name} has an empty name"));
    }
    Ok(())
}

/// Whether `s` is a variable name (`[A-Za-z_][A-Za-z0-9_]*`).
pub fn is_var_name(s: &str) -> bool {
    s.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
        && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// A word, checked now for what would fail whatever the variables (unterminated quotes,
/// malformed substitutions).
fn checked_word(raw: &str, escape: char) -> Result<Word, String> {
    let word = Word::new(raw, escape);
    // `${X:?msg}` depends on the variables: only the syntax is checked here.
    word.expand(&|_| Some("x".into()))?;
    Ok(word)
}

/// A JSON string as a word whose expansion is the string itself apart from `$` substitutions.
pub(crate) fn escape_json_word(s: &str, escape: char) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if c == escape || c == '\'' || c == '"' {
            out.push(escape);
        }
        out.push(c);
    }
    out
}

/// `s` in single quotes (a word that expands to exactly `s`).
pub(crate) fn quote_literal(s: &str) -> String {
    let mut out = String::from("'");
    for c in s.chars() {
        if c == '\'' {
            out.push_str("'\"'\"'");
        } else {
            out.push(c);
        }
    }
    out.push('\'');
    out
}

/// Splits on whitespace outside quotes, keeping quotes and escapes (for [`Word::expand`]).
fn split_words(s: &str, escape: char) -> Result<Vec<String>, String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut in_word = false;
    let mut quote: Option<char> = None;
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        match quote {
            Some(q) => {
                word.push(c);
                if c == q {
                    quote = None;
                } else if c == escape && q == '"' {
                    if let Some(n) = chars.next() {
                        word.push(n);
                    }
                }
            }
            None if c.is_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut word));
                    in_word = false;
                }
            }
            None => {
                in_word = true;
                word.push(c);
                if c == '\'' || c == '"' {
                    quote = Some(c);
                } else if c == escape {
                    if let Some(n) = chars.next() {
                        word.push(n);
                    }
                }
            }
        }
    }
    if let Some(q) = quote {
        return Err(format!(
            "unterminated {} quote",
            if q == '"' { "double" } else { "single" }
        ));
    }
    if in_word {
        words.push(word);
    }
    Ok(words)
}

#[cfg(test)]
mod tests;
