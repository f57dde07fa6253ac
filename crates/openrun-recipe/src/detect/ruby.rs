//! Ruby: `Gemfile` and `Gemfile.lock`, through Debian's Bundler.

use super::{version_numbers, Found, Repo};
use crate::error::PlanError;

/// The Ruby of Debian bookworm.
const DEBIAN_RUBY: [u64; 2] = [3, 1];

/// The Bundler of Debian bookworm.
const DEBIAN_BUNDLER: [u64; 2] = [2, 3];

pub(super) fn detect(repo: &Repo) -> Result<Option<Found>, PlanError> {
    let Some(gemfile) = repo.text("Gemfile")? else {
        return Ok(None);
    };
    let mut f = Found::new("ruby");
    f.inputs(repo, &["Gemfile", "Gemfile.lock", ".ruby-version"]);
    let lock = repo.text("Gemfile.lock")?;
    let file = if lock.is_some() {
        "Gemfile.lock"
    } else {
        "Gemfile"
    };
    // Gems Debian already has (minitest, rake...) resolve offline; the rest from rubygems.
    f.step(
        "install",
        file,
        &["bundle install --local".into(), "bundle install".into()],
    );
    let gems = format!("{gemfile}\n{}", lock.as_deref().unwrap_or(""));
    let uses = |gem: &str| {
        gems.lines().any(|l| {
            let l = l.trim();
            l.starts_with(&format!("gem \"{gem}\""))
                || l.starts_with(&format!("gem '{gem}'"))
                || l.starts_with(&format!("{gem} ("))
        })
    };
    let rakefile = repo.text_or_empty("Rakefile")?;
    let rails = repo.file("bin/rails") && uses("rails");
    if repo.dir("spec") || uses("rspec") || uses("rspec-core") {
        f.test("bundle exec rspec", true);
    } else if rails {
        f.test("bin/rails test", true);
    } else if rakefile.contains("TestTask") || rakefile.contains("task :test") {
        f.test("bundle exec rake test", true);
    } else if repo.dir("test") {
        f.test(
            concat!(
                "bundle exec ruby -Itest -Ilib -e 'Dir[\"test/**/*_test.rb\", ",
                "\"test/**/test_*.rb\"].each { |f| require File.expand_path(f) }'"
            ),
            true,
        );
    }
    if rails {
        f.start("bin/rails server -b 0.0.0.0 -p 3000", Some(3000));
    } else if repo.file("config.ru") {
        f.start("bundle exec rackup -o 0.0.0.0 -p 9292", Some(9292));
    }
    if let Some(text) = repo.text(".ruby-version")? {
        let wanted = text.lines().next().unwrap_or("").trim().to_string();
        let v = version_numbers(&wanted);
        if v.len() >= 2 && v[..2] > DEBIAN_RUBY[..] {
            f.notes.push(format!(
                ".ruby-version asks for Ruby {wanted}; Debian bookworm has {}.{}",
                DEBIAN_RUBY[0], DEBIAN_RUBY[1]
            ));
        }
    }
    if let Some(lock) = &lock {
        let mut lines = lock.lines();
        if lines.any(|l| l.trim() == "BUNDLED WITH") {
            if let Some(version) = lines.next().map(str::trim) {
                let v = version_numbers(version);
                if v.len() >= 2 && v[..2] > DEBIAN_BUNDLER[..] {
                    f.notes.push(format!(
                        "Gemfile.lock was made by Bundler {version}; Debian bookworm has {}.{}, \
                         which tries to install that version from rubygems.org",
                        DEBIAN_BUNDLER[0], DEBIAN_BUNDLER[1]
                    ));
                }
            }
        }
    }
    Ok(Some(f))
}
