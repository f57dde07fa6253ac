use std::collections::HashMap;

use super::*;

fn vars(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn expand(raw: &str, v: &HashMap<String, String>) -> Result<String, String> {
    Word::new(raw, '\\').expand(&|n| v.get(n).cloned())
}

fn parse_err(text: &str) -> ParseError {
    parse(text).expect_err("should not parse")
}

#[test]
fn a_full_dockerfile() {
    let text = r#"# syntax=docker/dockerfile:1
ARG BASE=busybox
FROM ${BASE}:latest AS build
# a comment
ARG VERSION=1.0
ENV A=1 B="two words" \
    C=3
ENV LEGACY value with spaces
LABEL org.example.version="$VERSION" "quoted key"=v
WORKDIR /app
COPY --chown=1000:1000 --chmod=0644 a.txt b/ ./
ADD ["x y.tar", "/opt/"]
RUN set -e; \
    # a comment inside the continuation
    echo hello \
    && echo world
RUN ["/bin/echo", "exec", "form"]
USER app:app
SHELL ["/bin/sh", "-ec"]
EXPOSE 8080/tcp
CMD echo "$A"
ENTRYPOINT ["/bin/sh", "-c"]
maintainer someone <a@b.c>
"#;
    let df = parse(text).unwrap();
    assert_eq!(df.global_args.len(), 1);
    assert_eq!(df.global_args[0].line, 2);
    let kinds: Vec<&Kind> = df.instructions.iter().map(|i| &i.kind).collect();
    assert_eq!(df.instructions.len(), 16);
    let lines: Vec<usize> = df.instructions.iter().map(|i| i.line).collect();
    assert_eq!(
        lines,
        vec![3, 5, 6, 8, 9, 10, 11, 12, 13, 17, 18, 19, 20, 21, 22, 23]
    );
    let Kind::From { image } = kinds[0] else {
        panic!("{:?}", kinds[0])
    };
    assert_eq!(
        expand(image.raw(), &vars(&[("BASE", "alpine")])).unwrap(),
        "alpine:latest"
    );
    let Kind::Env(env) = kinds[2] else { panic!() };
    let none = vars(&[]);
    let env: Vec<(String, String)> = env
        .iter()
        .map(|(k, v)| {
            (
                k.expand(&|n| none.get(n).cloned()).unwrap(),
                v.expand(&|n| none.get(n).cloned()).unwrap(),
            )
        })
        .collect();
    assert_eq!(
        env,
        vec![
            ("A".into(), "1".into()),
            ("B".into(), "two words".into()),
            ("C".into(), "3".into())
        ]
    );
    let Kind::Env(legacy) = kinds[3] else {
        panic!()
    };
    assert_eq!(legacy[0].1.raw(), "value with spaces");
    let Kind::Copy(copy) = kinds[6] else { panic!() };
    assert_eq!(copy.sources.len(), 2);
    assert_eq!(copy.dest.raw(), "./");
    assert_eq!(copy.chown.as_ref().unwrap().raw(), "1000:1000");
    assert_eq!(copy.chmod.as_ref().unwrap().raw(), "0644");
    let Kind::Add(add) = kinds[7] else { panic!() };
    assert_eq!(
        expand(add.sources[0].raw(), &none).unwrap(),
        "x y.tar",
        "JSON form keeps spaces"
    );
    let Kind::Run(Command::Shell(script)) = kinds[8] else {
        panic!("{:?}", kinds[8])
    };
    assert_eq!(
        script, "set -e;     echo hello     && echo world",
        "continuations joined, the comment dropped"
    );
    assert_eq!(
        kinds[9],
        &Kind::Run(Command::Exec(vec![
            "/bin/echo".into(),
            "exec".into(),
            "form".into()
        ]))
    );
    assert!(matches!(kinds[11], Kind::Shell(s) if s == &["/bin/sh", "-ec"]));
    assert!(matches!(kinds[12], Kind::Expose(_)));
    let Kind::Cmd(cmd) = kinds[13] else { panic!() };
    assert_eq!(
        cmd.argv(&default_shell()),
        vec!["/bin/sh", "-c", "echo \"$A\""]
    );
    let Kind::Label(m) = kinds[15] else { panic!() };
    assert_eq!(expand(m[0].1.raw(), &none).unwrap(), "someone <a@b.c>");
    assert_eq!(
        df.instructions[8].text,
        "RUN set -e;     echo hello     && echo world"
    );
}

#[test]
fn expansion() {
    let v = vars(&[("A", "x"), ("E", ""), ("PATH", "/bin")]);
    let cases = [
        ("$A", "x"),
        ("${A}y", "xy"),
        ("$Ay", ""),
        ("${UNSET}", ""),
        ("${UNSET:-def}", "def"),
        ("${E:-def}", "def"),
        ("${E-def}", ""),
        ("${UNSET-def}", "def"),
        ("${A:+alt}", "alt"),
        ("${E:+alt}", ""),
        ("${E+alt}", "alt"),
        ("${UNSET:-$A}", "x"),
        ("'$A'", "$A"),
        ("\"$A b\"", "x b"),
        ("\\$A", "$A"),
        ("\"\\$A\"", "$A"),
        ("\"a\\\\b\"", "a\\b"),
        ("\"a\\nb\"", "a\\nb"),
        ("a\\ b", "a b"),
        ("$", "$"),
        ("cost: $5", "cost: "),
        ("100%", "100%"),
        ("${PATH}:/usr/bin", "/bin:/usr/bin"),
    ];
    for (raw, want) in cases {
        assert_eq!(expand(raw, &v).unwrap(), want, "{raw}");
    }
    assert_eq!(
        expand("${UNSET:?must be set}", &v).unwrap_err(),
        "UNSET: must be set"
    );
    assert_eq!(expand("${E?}", &v).unwrap(), "");
    for bad in ["${A", "${}", "'open", "\"open", "${A/x/y}"] {
        assert!(expand(bad, &v).is_err(), "{bad}");
    }
    // The backtick escape.
    assert_eq!(
        Word::new("C:\\dir`$A", '`')
            .expand(&|n| v.get(n).cloned())
            .unwrap(),
        "C:\\dir$A"
    );
}

#[test]
fn escape_directive() {
    let df = parse("# escape=`\nFROM scratch\nRUN echo a `\n  b\\\n").unwrap();
    assert_eq!(
        df.instructions[1].kind,
        Kind::Run(Command::Shell("echo a   b\\".into()))
    );
    let e = parse_err("# escape=x\nFROM scratch\n");
    assert_eq!(e.line, Some(1));
    assert!(e.message.contains("escape"), "{e}");
    // After the first instruction a directive is only a comment.
    let df = parse("FROM scratch\n# escape=`\nRUN a \\\n b\n").unwrap();
    assert_eq!(
        df.instructions[1].kind,
        Kind::Run(Command::Shell("a  b".into()))
    );
}

#[test]
fn errors_name_the_line() {
    let cases: &[(&str, usize, &str)] = &[
        (
            "FROM scratch\nHEALTHCHECK CMD true\n",
            2,
            "HEALTHCHECK is not supported",
        ),
        (
            "FROM scratch\n\nONBUILD RUN x\n",
            3,
            "ONBUILD is not supported",
        ),
        ("FROM scratch\nVOLUME /data\n", 2, "VOLUME is not supported"),
        (
            "FROM scratch\nSTOPSIGNAL 9\n",
            2,
            "STOPSIGNAL is not supported",
        ),
        (
            "FROM scratch\nFROBNICATE x\n",
            2,
            "unknown instruction FROBNICATE",
        ),
        ("FROM scratch\nRUN\n", 2, "RUN needs a command"),
        ("FROM scratch\nCOPY onlyone\n", 2, "at least one source"),
        (
            "FROM scratch\nENV A=\"unterminated\n",
            2,
            "unterminated double quote",
        ),
        ("FROM scratch\nENV A=${B\n", 2, "missing"),
        ("FROM scratch\nENV A\n", 2, "has no value"),
        ("FROM scratch\nENV A=1 B\n", 2, "NAME=VALUE"),
        ("FROM scratch\nCMD [\"a\", 'b']\n", 2, "JSON array"),
        (
            "FROM scratch\nSHELL /bin/bash\n",
            2,
            "SHELL takes a JSON array",
        ),
        (
            "FROM a\nFROM b\n",
            2,
            "multi-stage builds are not supported",
        ),
        (
            "FROM a\nCOPY --from=b /x /y\n",
            2,
            "COPY --from is not supported",
        ),
        (
            "FROM --platform=linux/arm64 a\n",
            1,
            "FROM --platform is not supported",
        ),
        (
            "FROM a\nRUN --mount=type=cache,target=/x true\n",
            2,
            "RUN --mount is not supported",
        ),
        ("FROM a\nRUN <<EOF\necho\nEOF\n", 2, "heredocs"),
        ("RUN true\nFROM a\n", 1, "RUN before FROM"),
        ("FROM a b\n", 1, "FROM takes one image"),
        ("FROM a\nUSER a b\n", 2, "USER takes one"),
        ("FROM a\nARG 1x=2\n", 2, "invalid ARG name"),
        ("FROM a\n[bad\n", 2, "expected an instruction"),
        ("FROM a\nCMD []\n", 2, "has no program"),
    ];
    for (text, line, message) in cases {
        let e = parse_err(text);
        assert_eq!(e.line, Some(*line), "{text:?}: {e}");
        assert!(e.message.contains(message), "{text:?}: {e}");
        assert!(
            e.to_string()
                .starts_with(&format!("Dockerfile line {line}: ")),
            "{e}"
        );
    }
    for text in ["", "# only a comment\n", "ARG A=1\n"] {
        let e = parse_err(text);
        assert_eq!(e.line, None);
        assert!(e.message.contains("no FROM"), "{e}");
    }
}

#[test]
fn case_insensitive_and_crlf() {
    let df = parse("from scratch\r\nworkdir /x\r\nCopy a b\r\n").unwrap();
    assert_eq!(df.instructions.len(), 3);
    assert_eq!(df.instructions[1].text, "WORKDIR /x");
    assert!(matches!(&df.instructions[1].kind, Kind::Workdir(w) if w.raw() == "/x"));
}

/// Found while fuzzing the parser: each nested `${A:-...}` was a recursion of the expander, and
/// a Dockerfile nesting 100 000 deep overflowed the stack (a crash, not an error).
#[test]
fn deeply_nested_substitutions_are_refused_not_a_stack_overflow() {
    let n = 100_000;
    let text = format!(
        "FROM scratch\nENV A={}x{}\n",
        "${A:-".repeat(n),
        "}".repeat(n)
    );
    let e = parse_err(&text);
    assert_eq!(e.line, Some(2), "{e}");
    assert!(e.message.contains("more than 64 nested"), "{e}");
    // As deep as allowed still works.
    let ok = format!(
        "FROM scratch\nENV A={}x{}\n",
        "${A:-".repeat(MAX_NESTING),
        "}".repeat(MAX_NESTING)
    );
    let df = parse(&ok).unwrap();
    let Kind::Env(pairs) = &df.instructions[1].kind else {
        panic!("{:?}", df.instructions[1].kind)
    };
    assert_eq!(pairs[0].1.expand(&|_| None).unwrap(), "x");
}
