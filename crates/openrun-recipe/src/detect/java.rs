//! Java (and Kotlin) on the JVM: Maven (`pom.xml`) or Gradle (`build.gradle`,
//! `build.gradle.kts`, `settings.gradle(.kts)`, the `gradlew` wrapper).

use super::{Found, Repo};
use crate::error::PlanError;

pub(super) fn detect(repo: &Repo) -> Result<Option<Found>, PlanError> {
    if repo.file("pom.xml") {
        return Ok(Some(maven(repo)));
    }
    let gradle = repo.first(&[
        "build.gradle",
        "build.gradle.kts",
        "settings.gradle",
        "settings.gradle.kts",
    ]);
    match gradle {
        Some(file) => Ok(Some(gradle_plan(repo, file))),
        None => Ok(None),
    }
}

/// Maven: Debian's Maven 3.8, dependencies from the network, or from Debian's
/// `/usr/share/maven-repo` when the pom declares it as a `file://` repository. The offline
/// alternative is for the latter when the online run trips over an unreachable Central:
/// offline mode blocks every remote repository, `file://` ones included, unless
/// `aether.offline.protocols` lets `file` through.
fn maven(repo: &Repo) -> Found {
    let mut f = Found::new("java");
    f.inputs(
        repo,
        &["pom.xml", ".mvn/maven.config", ".mvn/extensions.xml"],
    );
    f.step(
        "install",
        "pom.xml",
        &[
            "mvn -B -ntp test-compile".into(),
            "mvn -B -ntp -o -Daether.offline.protocols=file test-compile".into(),
        ],
    );
    f.test("mvn -B -ntp test", true);
    if repo.file("mvnw") {
        f.notes.push(
            "mvnw is not used: the plan uses Debian's Maven 3.8 (the wrapper downloads Maven)"
                .into(),
        );
    }
    f
}

/// Gradle: the repository's wrapper when it has one, else Debian's (old) Gradle.
fn gradle_plan(repo: &Repo, file: &str) -> Found {
    let mut f = Found::new("java");
    f.packages.retain(|p| p != "maven");
    f.inputs(
        repo,
        &[
            "build.gradle",
            "build.gradle.kts",
            "settings.gradle",
            "settings.gradle.kts",
            "gradle.properties",
            "gradle/wrapper/gradle-wrapper.properties",
            "gradle/libs.versions.toml",
        ],
    );
    for host in [
        "downloads.gradle.org",
        "plugins-artifacts.gradle.org",
        "plugins.gradle.org",
        "services.gradle.org",
    ] {
        f.host(host);
    }
    let gradle = if repo.file("gradlew") {
        let props = "gradle/wrapper/gradle-wrapper.properties";
        f.step(
            "install",
            if repo.file(props) { props } else { file },
            &["chmod +x gradlew && ./gradlew --no-daemon testClasses".into()],
        );
        "./gradlew"
    } else {
        f.package("gradle");
        f.notes.push(
            "no gradlew: the plan uses Debian's Gradle 4.4, too old for most current builds".into(),
        );
        f.step("install", file, &["gradle --no-daemon testClasses".into()]);
        "gradle"
    };
    f.test(&format!("{gradle} --no-daemon test"), true);
    f
}
