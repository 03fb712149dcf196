//! The .deb and .rpm that `cargo xtask package` (and `cargo xtask test`) build: what they
//! install, and that their scripts are sane: the service is enabled on install, restarted in
//! place on upgrade, and enforcement turned off on removal only.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

/// The packages in target/packages, or `None` (a failure under CI) when they were not built.
fn packages() -> Option<(PathBuf, PathBuf)> {
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe
        .ancestors()
        .map(|dir| dir.join("packages"))
        .find(|dir| dir.is_dir());
    let find = |extension: &str| {
        std::fs::read_dir(dir.as_ref()?)
            .ok()?
            .flatten()
            .map(|entry| entry.path())
            .find(|path| path.extension().is_some_and(|ext| ext == extension))
    };
    match (find("deb"), find("rpm")) {
        (Some(deb), Some(rpm)) => Some((deb, rpm)),
        _ if std::env::var("CI").is_ok_and(|ci| ci == "true") => {
            panic!("no packages in target/packages: `cargo xtask test` builds them")
        }
        _ => {
            eprintln!("skipped: no packages in target/packages (run `cargo xtask package`)");
            None
        }
    }
}

fn output(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|err| panic!("{program}: {err} (cargo xtask test installs it)"));
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `sh -n`: the script parses.
fn assert_shell_syntax(name: &str, script: &str) {
    let dir = std::env::temp_dir().join(imds_guard_tests::unique_name("script"));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join(name);
    std::fs::write(&path, script).expect("write script");
    let out = Command::new("sh")
        .arg("-n")
        .arg(&path)
        .output()
        .expect("sh");
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        out.status.success(),
        "{name} does not parse: {}\n{script}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn path_arg(path: &Path) -> String {
    path.to_string_lossy().into_owned()
}

#[test]
fn the_deb_installs_the_agent_unit_config_and_docs_with_sane_scripts() {
    let Some((deb, _)) = packages() else {
        return;
    };
    let deb = path_arg(&deb);
    let contents = output("dpkg-deb", &["--contents", &deb]);
    for (mode, path) in [
        ("-rwxr-xr-x", "./usr/bin/imds-guard"),
        ("-rw-r--r--", "./etc/imds-guard/imds-guard.toml"),
        ("-rw-r--r--", "/systemd/system/imds-guard.service"),
        ("-rw-r--r--", "./usr/share/doc/imds-guard/README.md"),
        ("-rw-r--r--", "./usr/share/doc/imds-guard/copyright"),
    ] {
        assert!(
            contents
                .lines()
                .any(|line| line.starts_with(mode) && line.contains(path)),
            "{mode} {path} missing from the .deb:\n{contents}"
        );
    }
    let conffiles = output("dpkg-deb", &["--info", &deb, "conffiles"]);
    assert!(
        conffiles.contains("/etc/imds-guard/imds-guard.toml"),
        "{conffiles}"
    );
    let control = output(
        "dpkg-deb",
        &["--field", &deb, "Package", "Version", "Depends"],
    );
    assert!(control.contains("Package: imds-guard"), "{control}");

    let postinst = output("dpkg-deb", &["--info", &deb, "postinst"]);
    let prerm = output("dpkg-deb", &["--info", &deb, "prerm"]);
    let postrm = output("dpkg-deb", &["--info", &deb, "postrm"]);
    for (name, script) in [
        ("postinst", &postinst),
        ("prerm", &prerm),
        ("postrm", &postrm),
    ] {
        assert_shell_syntax(name, script);
        assert!(
            !script.contains("#DEBHELPER#"),
            "{name} still has the token:\n{script}"
        );
    }
    // Installed and started on install; restarted (not stopped first) on upgrade.
    assert!(
        postinst.contains("deb-systemd-helper") && postinst.contains("enable"),
        "{postinst}"
    );
    assert!(postinst.contains("imds-guard.service"), "{postinst}");
    let lines: Vec<&str> = prerm.lines().collect();
    for (i, line) in lines.iter().enumerate() {
        if line.contains("deb-systemd-invoke stop") {
            let guard = lines[..i]
                .iter()
                .rev()
                .find(|l| l.trim_start().starts_with("if "));
            assert!(
                guard.is_some_and(|g| g.contains("\"$1\" = remove")),
                "the service may stop only on removal, never before an upgrade:\n{prerm}"
            );
        }
    }
    // Removal turns enforcement off, after the service stopped; an upgrade never does.
    let stop = prerm
        .find("stop")
        .expect("prerm stops the service on removal");
    let detach = prerm
        .find("imds-guard detach")
        .expect("prerm detaches on removal");
    assert!(stop < detach, "detach must follow the stop:\n{prerm}");
    assert!(prerm.contains("if [ \"$1\" = \"remove\" ]"), "{prerm}");

    // The packaged binary runs and is this version.
    let dir = std::env::temp_dir().join(imds_guard_tests::unique_name("deb"));
    output("dpkg-deb", &["--extract", &deb, &path_arg(&dir)]);
    let version = output(&path_arg(&dir.join("usr/bin/imds-guard")), &["--version"]);
    let config = dir.join("etc/imds-guard/imds-guard.toml");
    let checked = Command::new(dir.join("usr/bin/imds-guard"))
        .args(["check-config", &path_arg(&config)])
        .output()
        .expect("check-config");
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(
        version.trim(),
        format!("imds-guard {}", env!("CARGO_PKG_VERSION"))
    );
    assert!(
        checked.status.success(),
        "the packaged config does not check: {}",
        String::from_utf8_lossy(&checked.stderr)
    );
}

#[test]
fn the_rpm_installs_the_agent_unit_config_and_docs_with_sane_scripts() {
    let Some((_, rpm)) = packages() else {
        return;
    };
    let rpm = path_arg(&rpm);
    let listing = output("rpm", &["-qlpv", &rpm]);
    for (mode, path) in [
        ("-rwxr-xr-x", "/usr/bin/imds-guard"),
        ("-rw-r--r--", "/etc/imds-guard/imds-guard.toml"),
        ("-rw-r--r--", "/usr/lib/systemd/system/imds-guard.service"),
        ("-rw-r--r--", "/usr/share/doc/imds-guard/README.md"),
    ] {
        assert!(
            listing
                .lines()
                .any(|line| line.starts_with(mode) && line.ends_with(path)),
            "{mode} {path} missing from the .rpm:\n{listing}"
        );
    }
    let configs = output("rpm", &["-qcp", &rpm]);
    assert!(
        configs.contains("/etc/imds-guard/imds-guard.toml"),
        "{configs}"
    );
    let info = output("rpm", &["-qip", &rpm]);
    assert!(info.contains("imds-guard"), "{info}");
    assert!(info.contains(env!("CARGO_PKG_VERSION")), "{info}");

    let scripts = output("rpm", &["-qp", "--scripts", &rpm]);
    // `rpm --scripts` prints each scriptlet after a "<name> scriptlet:" line (with
    // "(using PROGRAM)" before the colon when one is set).
    let mut sections: Vec<(String, String)> = Vec::new();
    for line in scripts.lines() {
        if line.ends_with("scriptlet:") || line.contains("scriptlet (using") {
            sections.push((line.to_owned(), String::new()));
        } else if let Some((_, body)) = sections.last_mut() {
            body.push_str(line);
            body.push('\n');
        }
    }
    let section = |name: &str| {
        sections
            .iter()
            .find(|(header, _)| header.starts_with(name))
            .map_or_else(
                || panic!("no {name} scriptlet:\n{scripts}"),
                |(_, body)| body.clone(),
            )
    };
    let (post, preun, postun) = (
        section("postinstall"),
        section("preuninstall"),
        section("postuninstall"),
    );
    for (name, body) in [("post", &post), ("preun", &preun), ("postun", &postun)] {
        assert_shell_syntax(name, body);
    }
    assert!(
        post.contains("enable --now imds-guard.service") && post.contains("\"$1\" -eq 1"),
        "{post}"
    );
    // Erase (not upgrade): stop, then detach.
    assert!(preun.contains("\"$1\" -eq 0"), "{preun}");
    let stop = preun
        .find("disable --now")
        .expect("preun stops the service");
    let detach = preun.find("imds-guard detach").expect("preun detaches");
    assert!(stop < detach, "{preun}");
    // Upgrade: restart in place, the new agent adopts the enforcement.
    assert!(
        postun.contains("try-restart imds-guard.service") && postun.contains("\"$1\" -ge 1"),
        "{postun}"
    );
}
