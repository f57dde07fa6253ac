//! Deciding what exactly to run for an `Exec` request: environment, working directory, the
//! paths to try for `argv[0]`, and the ids to run as. Pure logic, tested without forking.

use std::collections::BTreeMap;
use std::ffi::CString;

use openrun_protocol::{AgentError, ErrorCode, ExecRequest};

use crate::spawn::ExecPlan;
use crate::users::ResolvedUser;

/// `PATH` for processes whose environment does not set one (Debian's default).
pub(crate) const DEFAULT_PATH: &str =
    "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The environment of a new process: the sandbox's base environment, then defaults for what
/// it lacks, then the request's own variables (which win).
pub(crate) fn build_env(
    base: &BTreeMap<String, String>,
    user: &ResolvedUser,
    sandbox_id: &str,
    pty: bool,
    request: &BTreeMap<String, String>,
) -> Result<BTreeMap<String, String>, AgentError> {
    let mut env = base.clone();
    let mut default = |key: &str, value: String| {
        env.entry(key.to_string()).or_insert(value);
    };
    default("PATH", DEFAULT_PATH.to_string());
    default("HOME", user.home.clone());
    default("HOSTNAME", sandbox_id.to_string());
    if let Some(name) = &user.name {
        default("USER", name.clone());
        default("LOGNAME", name.clone());
    }
    if pty {
        default("TERM", "xterm-256color".to_string());
    }
    for (k, v) in request {
        env.insert(k.clone(), v.clone());
    }
    for (k, v) in &env {
        if k.is_empty() || k.contains('=') || k.contains('\0') {
            return Err(AgentError::new(
                ErrorCode::InvalidArgument,
                format!("invalid environment variable name: {k:?}"),
            ));
        }
        if v.contains('\0') {
            return Err(AgentError::new(
                ErrorCode::InvalidArgument,
                format!("environment variable {k} contains a nul byte"),
            ));
        }
    }
    Ok(env)
}

/// The paths `execve` tries for `program`: itself when it contains a slash, else each `PATH`
/// entry in order (an empty entry means the working directory, as in `execvp`).
pub(crate) fn path_candidates(program: &str, path: &str) -> Vec<String> {
    if program.contains('/') {
        return vec![program.to_string()];
    }
    path.split(':')
        .map(|dir| {
            let dir = if dir.is_empty() { "." } else { dir };
            format!("{}/{program}", dir.trim_end_matches('/'))
        })
        .collect()
}

/// The working directory: the request's, else the sandbox default (the image's
/// `WorkingDir`), else the user's home if it exists, else `/`.
pub(crate) fn choose_cwd(
    requested: Option<&str>,
    home: &str,
    config_cwd: Option<&str>,
    is_dir: impl Fn(&str) -> bool,
) -> Result<String, AgentError> {
    if let Some(cwd) = requested {
        if !cwd.starts_with('/') {
            return Err(AgentError::new(
                ErrorCode::InvalidArgument,
                format!("cwd must be an absolute path: {cwd}"),
            ));
        }
        return Ok(cwd.to_string());
    }
    if let Some(cwd) = config_cwd {
        return Ok(cwd.to_string());
    }
    if !home.is_empty() && is_dir(home) {
        return Ok(home.to_string());
    }
    Ok("/".to_string())
}

fn cstring(s: &str, what: &str) -> Result<CString, AgentError> {
    CString::new(s).map_err(|_| {
        AgentError::new(
            ErrorCode::InvalidArgument,
            format!("{what} contains a nul byte"),
        )
    })
}

/// Everything needed to fork and exec `req` as `user` in `cwd` with `env`.
pub(crate) fn plan(
    req: &ExecRequest,
    user: &ResolvedUser,
    env: &BTreeMap<String, String>,
    cwd: String,
    oom_score_adj: i32,
) -> Result<ExecPlan, AgentError> {
    let Some(program) = req.argv.first() else {
        return Err(AgentError::new(ErrorCode::InvalidArgument, "argv is empty"));
    };
    if program.is_empty() {
        return Err(AgentError::new(
            ErrorCode::InvalidArgument,
            "argv[0] is empty",
        ));
    }
    let path = env.get("PATH").map_or(DEFAULT_PATH, String::as_str);
    let candidates = path_candidates(program, path)
        .iter()
        .map(|c| cstring(c, "command path"))
        .collect::<Result<Vec<_>, _>>()?;
    let argv = req
        .argv
        .iter()
        .map(|a| cstring(a, "an argument"))
        .collect::<Result<Vec<_>, _>>()?;
    let envp = env
        .iter()
        .map(|(k, v)| cstring(&format!("{k}={v}"), "the environment"))
        .collect::<Result<Vec<_>, _>>()?;
    cstring(&cwd, "cwd")?;
    Ok(ExecPlan {
        program: program.clone(),
        candidates,
        argv,
        envp,
        cwd,
        uid: user.uid,
        gid: user.gid,
        groups: user.groups.clone(),
        oom_score_adj,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alice() -> ResolvedUser {
        ResolvedUser {
            name: Some("alice".into()),
            uid: 1000,
            gid: 1000,
            groups: vec![1000],
            home: "/home/alice".into(),
        }
    }

    #[test]
    fn env_layers_base_defaults_then_request() {
        let base = BTreeMap::from([
            ("LANG".to_string(), "C.UTF-8".to_string()),
            ("HOME".to_string(), "/image-home".to_string()),
        ]);
        let request = BTreeMap::from([("LANG".to_string(), "de_DE.UTF-8".to_string())]);
        let env = build_env(&base, &alice(), "sb-1", true, &request).unwrap();
        assert_eq!(env["PATH"], DEFAULT_PATH);
        assert_eq!(env["HOME"], "/image-home");
        assert_eq!(env["HOSTNAME"], "sb-1");
        assert_eq!(env["USER"], "alice");
        assert_eq!(env["LOGNAME"], "alice");
        assert_eq!(env["TERM"], "xterm-256color");
        assert_eq!(env["LANG"], "de_DE.UTF-8");
        let plain = build_env(&BTreeMap::new(), &alice(), "sb-1", false, &BTreeMap::new()).unwrap();
        assert!(!plain.contains_key("TERM"));
        assert_eq!(plain["HOME"], "/home/alice");
    }

    #[test]
    fn bad_env_names_are_rejected() {
        let request = BTreeMap::from([("A=B".to_string(), "x".to_string())]);
        let err = build_env(&BTreeMap::new(), &alice(), "s", false, &request).unwrap_err();
        assert_eq!(err.code, ErrorCode::InvalidArgument);
    }

    #[test]
    fn path_search_order() {
        assert_eq!(
            path_candidates("ls", "/a:/b/::/c"),
            ["/a/ls", "/b/ls", "./ls", "/c/ls"]
        );
        assert_eq!(path_candidates("./run.sh", "/a"), ["./run.sh"]);
        assert_eq!(path_candidates("/bin/ls", "/a"), ["/bin/ls"]);
    }

    #[test]
    fn cwd_falls_back_from_request_to_home_to_config_to_root() {
        let yes = |_: &str| true;
        let no = |_: &str| false;
        assert_eq!(choose_cwd(Some("/w"), "/h", Some("/c"), no).unwrap(), "/w");
        assert_eq!(choose_cwd(None, "/h", Some("/c"), yes).unwrap(), "/c");
        assert_eq!(choose_cwd(None, "/h", None, yes).unwrap(), "/h");
        assert_eq!(choose_cwd(None, "/h", Some("/c"), no).unwrap(), "/c");
        assert_eq!(choose_cwd(None, "/h", None, no).unwrap(), "/");
        let err = choose_cwd(Some("rel"), "/h", None, yes).unwrap_err();
        assert_eq!(err.code, ErrorCode::InvalidArgument);
    }

    #[test]
    fn empty_argv_is_invalid() {
        let req = ExecRequest::default();
        let err = plan(&req, &alice(), &BTreeMap::new(), "/".into(), 0).unwrap_err();
        assert_eq!(err.code, ErrorCode::InvalidArgument);
        assert_eq!(err.message, "argv is empty");
    }
}
