//! `imds-guard migrate`: the iptables rules translated into a config (see [`crate::migrate`]);
//! `--check`, whether a config already covers them; `--apply`, their deletion once it does and
//! the agent enforces it.

use std::{
    fmt::Write as _,
    io::Write as _,
    process::{Command, Stdio},
};

use serde::Serialize;

use crate::{
    cli::{MigrateArgs, MigrateFormat},
    config::{Config, Mode, Overrides},
    error::Result,
    host::cgroups::Hierarchy,
    migrate::{
        self, MigrateError, delete,
        logic::{self, IdSet, Term, is_within},
        render,
        save::{self, Family},
        translate::{self, Translation, describe_term},
    },
    policy::{Pattern, Policy, PolicyRule},
};

/// `imds-guard migrate`. `Ok(false)`: `--check` found the policy short (and said how).
///
/// # Errors
/// Input that is not iptables-save output (with its line), a name this host does not know, a
/// config that does not load; for `--apply`, an agent not enforcing a policy that covers the
/// rules, or a deletion that failed.
pub fn run(args: &MigrateArgs) -> Result<bool> {
    let (text, source) = migrate::read_input(args.input.as_deref())?;
    if text.trim().is_empty() {
        return Err(MigrateError::Translate {
            source_name: source,
            line: 0,
            message: "no iptables rules at all: nothing to translate".into(),
        }
        .into());
    }
    let ruleset = save::parse(&text, &source).map_err(MigrateError::from)?;
    let translation =
        translate::translate(&ruleset, &translate::HostNames).map_err(|(line, message)| {
            MigrateError::Translate {
                source_name: source.clone(),
                line,
                message,
            }
        })?;
    if args.check || args.apply {
        let config = Config::load(args.config.as_deref(), &Overrides::default())?;
        let hierarchy = Hierarchy::discover()?;
        let policy = Policy::resolve(&config, &hierarchy)?;
        let missing = missing(&translation, &policy);
        let config_name = config.file.as_ref().map_or_else(
            || "the built-in default policy".to_owned(),
            |f| f.display().to_string(),
        );
        if args.check {
            print_check(args.format, &config_name, &policy, &missing);
            return Ok(missing.is_empty());
        }
        // First: does imds-guard enforce this config at all?
        in_force(args, &config, &policy, &hierarchy, &translation)?;
        if !missing.is_empty() {
            return Err(MigrateError::NotApplied(format!(
                "{config_name} does not cover what they let through: {}",
                missing.join("; ")
            ))
            .into());
        }
        let wider = wider(&translation, &policy);
        if !wider.is_empty() {
            return Err(MigrateError::NotApplied(format!(
                "{config_name} lets through more than they did, so deleting them would let it \
                 through: {} (delete them by hand with the commands `imds-guard migrate` prints \
                 if that is what you want)",
                wider.join("; ")
            ))
            .into());
        }
        // The deletions again, for what this policy lets through (it may let through more than
        // the printed config: what the rules let through only on some ports, say).
        let allowed: Vec<Term> = (policy.rules.iter())
            .flat_map(|rule| rule_terms(&policy, rule).0)
            .collect();
        let plan = delete::replan(&ruleset, &translate::HostNames, &translation, &allowed)
            .map_err(|(line, message)| MigrateError::Translate {
                source_name: source.clone(),
                line,
                message,
            })?;
        for (rule, why) in plan
            .kept
            .iter()
            .filter(|(r, _)| !translation.kept.iter().any(|(k, _)| k.line == r.line))
        {
            eprintln!(
                "imds-guard: keeping line {} ({} {} {}): {why}",
                rule.line,
                rule.family.tool(),
                rule.table,
                rule.chain
            );
        }
        apply(&plan)?;
        return Ok(true);
    }
    match args.format {
        MigrateFormat::Config => {
            for warning in render::warnings(&translation) {
                eprintln!("imds-guard: warning: {warning}");
            }
            print!("{}", render::config(&translation, &source));
        }
        MigrateFormat::Json => super::print_json(&render::json(&translation, &source)),
    }
    Ok(true)
}

/// What the rules let through or protected that `policy` does not, one line each.
#[must_use]
pub fn missing(translation: &Translation, policy: &Policy) -> Vec<String> {
    let mut missing = Vec::new();
    for address in &translation.covered {
        if !policy.protect.contains(address) {
            missing.push(format!(
                "{address}: the rules kept workloads from it; the policy does not protect it"
            ));
        }
    }
    if policy.mode == Mode::Audit {
        // Everything gets through (and is reported): nothing the rules let through is lost.
        return missing;
    }
    let needed = translation
        .allowed
        .iter()
        .chain(translation.lost.iter().map(|(term, _)| term));
    for term in needed {
        if !policy.rules.iter().any(|rule| covers(policy, rule, term)) {
            missing.push(format!(
                "{}: the rules let it through; no rule of the policy does",
                describe_term(term)
            ));
        }
    }
    missing
}

/// The rules of `policy` that let through workloads the rules stopped (or may have: rules
/// with unit or pattern conditions cannot be compared), one line each.
#[must_use]
pub fn wider(translation: &Translation, policy: &Policy) -> Vec<String> {
    if policy.mode == Mode::Audit {
        return vec!["audit mode lets every workload through".into()];
    }
    let mut wider = Vec::new();
    for rule in &policy.rules {
        let (terms, widened) = rule_terms(policy, rule);
        for term in terms {
            if !logic::within(std::slice::from_ref(&term), &translation.possible).unwrap_or(false) {
                wider.push(format!(
                    "rule {} ({}) lets through {}{}, which the rules stopped",
                    rule.name,
                    rule.origin,
                    describe_term(&term),
                    if widened {
                        " (or part of it: its unit or pattern conditions read as wide as they \
                         may be)"
                    } else {
                        ""
                    }
                ));
            }
        }
    }
    wider
}

/// The workloads on the host `rule` lets through, as terms, and whether they may hold more:
/// a unit condition is left out and a pattern read as the directory its matches are in (a rule
/// for `/system.slice/docker-*.scope` as one for `/system.slice`), and so are exclusions that
/// are patterns. The terms never hold less than the rule lets through.
#[must_use]
pub fn rule_terms(policy: &Policy, rule: &PolicyRule) -> (Vec<Term>, bool) {
    let mut widened = !rule.unit.is_empty();
    let mut base = Term::any();
    if let Some(uid) = rule.uid {
        base.uid = IdSet::range(uid, uid);
    }
    if let Some(gid) = rule.gid {
        base.gid = IdSet::range(gid, gid);
    }
    for &index in &rule.not_cgroup {
        match &policy.patterns[index] {
            Pattern::Path(path) if pattern_dir(path) == *path => {
                base.not_cgroup.insert(path.clone());
            }
            _ => widened = true,
        }
    }
    if rule.cgroup.is_empty() {
        return (vec![base], widened);
    }
    let terms = (rule.cgroup.iter())
        .map(|&index| {
            let mut term = base.clone();
            if let Pattern::Path(path) = &policy.patterns[index] {
                let dir = pattern_dir(path);
                widened |= dir != *path;
                term.cgroup = (dir != "/").then_some(dir);
            }
            term
        })
        .collect();
    (terms, widened)
}

/// The literal directory a path pattern's matches are in or below: the pattern itself when it
/// has no wildcard, else its part before the first one, up to a `/`.
fn pattern_dir(pattern: &str) -> String {
    match pattern.find(|c: char| "*?[]{}\\".contains(c)) {
        None => pattern.to_owned(),
        Some(wild) => match pattern[..wild].rsplit_once('/') {
            Some((head, _)) if !head.is_empty() => head.to_owned(),
            _ => "/".to_owned(),
        },
    }
}

/// Whether `rule` lets through every host workload of `term`.
fn covers(policy: &Policy, rule: &PolicyRule, term: &Term) -> bool {
    let only = |id: Option<u32>, set: &IdSet| id.is_none_or(|id| set.within(&IdSet::range(id, id)));
    if !only(rule.uid, &term.uid) || !only(rule.gid, &term.gid) {
        return false;
    }
    let at = term.cgroup.as_deref().unwrap_or("/");
    let Some(id) = (1u32..)
        .zip(&policy.rules)
        .find(|(_, r)| std::ptr::eq(*r, rule))
        .map(|(id, _)| id)
    else {
        return false;
    };
    // Its cgroup and unit conditions hold in the term's cgroup (so below it too), for host
    // tasks (or, in a container's cgroup, for the containers in it).
    if !policy.rules_at(at).host.contains(&id) {
        return false;
    }
    // And none of its exclusions reaches into the term's cgroups.
    rule.not_cgroup.iter().all(|&index| {
        let Pattern::Path(pattern) = &policy.patterns[index] else {
            return false;
        };
        // The part before any wildcard, up to its last `/`: where the pattern's matches live.
        let literal = match pattern.find(|c: char| "*?[{".contains(c)) {
            None => pattern.as_str(),
            Some(wild) => pattern[..wild]
                .rsplit_once('/')
                .map_or("/", |(head, _)| if head.is_empty() { "/" } else { head }),
        };
        let outside = !is_within(literal, at) && !is_within(at, literal);
        outside
            || term
                .not_cgroup
                .iter()
                .any(|excluded| is_within(literal, excluded))
    })
}

#[derive(Serialize)]
struct CheckJson<'a> {
    covered: bool,
    config: &'a str,
    missing: &'a [String],
}

fn print_check(format: MigrateFormat, config_name: &str, policy: &Policy, missing: &[String]) {
    match format {
        MigrateFormat::Json => super::print_json(&CheckJson {
            covered: missing.is_empty(),
            config: config_name,
            missing,
        }),
        MigrateFormat::Config if missing.is_empty() => {
            println!(
                "covered: {config_name} lets through every workload the iptables rules let \
                 through, and protects every address they kept workloads from{}",
                if policy.mode == Mode::Audit {
                    " (in audit mode: it lets everything through)"
                } else {
                    ""
                }
            );
        }
        MigrateFormat::Config => {
            println!("not covered by {config_name}:");
            for line in missing {
                println!("  {line}");
            }
        }
    }
}

/// Whether the agent enforces `config` (resolved: `resolved`) on the cgroup it names, in
/// enforce mode, protecting what the rules covered: else why not.
fn in_force(
    args: &MigrateArgs,
    config: &Config,
    resolved: &Policy,
    hierarchy: &Hierarchy,
    translation: &Translation,
) -> Result<()> {
    let status = super::status::read(&args.pin_dir, &args.pid_file, Some(hierarchy));
    let refuse = |why: String| -> Result<()> { Err(MigrateError::NotApplied(why).into()) };
    if !status.enforcing {
        return refuse(format!(
            "imds-guard is not enforcing (no attached programs pinned in {}): start the agent \
             with the new config first",
            args.pin_dir.display()
        ));
    }
    let Some(policy) = &status.policy else {
        return refuse("the policy in force cannot be read from the pins".into());
    };
    let mut in_force = policy.protected.clone();
    let mut in_config = resolved.protect.clone();
    in_force.sort_unstable();
    in_config.sort_unstable();
    if usize::try_from(policy.rules).ok() != Some(resolved.rules.len()) || in_force != in_config {
        return refuse(format!(
            "the policy in force ({} rules, protecting {}) is not the one in the config ({} \
             rules): reload the agent",
            policy.rules,
            in_force.len(),
            resolved.rules.len()
        ));
    }
    if policy.mode != "enforce" {
        return refuse(format!(
            "the policy in force is in {} mode: set mode = \"enforce\" and reload",
            policy.mode
        ));
    }
    if let Some(address) = translation
        .covered
        .iter()
        .find(|a| !policy.protected.contains(a))
    {
        return refuse(format!(
            "the policy in force does not protect {address}: reload the agent with the new \
             config"
        ));
    }
    let attach = hierarchy.resolve(&config.attach.origin, &config.attach.value)?;
    if let Some(hook) = status
        .programs
        .iter()
        .find(|hook| hook.cgroup.as_deref() != Some(attach.path.as_str()))
    {
        return refuse(format!(
            "the {} program is attached to {}, not to {} as the config says: the workloads \
             outside it would lose the rules' protection",
            hook.hook,
            hook.cgroup.as_deref().unwrap_or("an unknown cgroup"),
            attach.path
        ));
    }
    Ok(())
}

/// Deletes the rules `translation` plans to (the checks made).
fn apply(translation: &Translation) -> Result<()> {
    if translation.deletions.is_empty() {
        println!("nothing to delete: no translated rule can go (see `imds-guard migrate`)");
        return Ok(());
    }
    let mut done: Vec<String> = Vec::new();
    for (family, input) in restore_inputs(&translation.deletions) {
        let tool = format!("{}-restore", family.tool());
        if let Err(err) = restore(&tool, &input) {
            if !done.is_empty() {
                eprintln!(
                    "imds-guard: the {} rules were deleted before this failed:\n  {}",
                    Family::V4.tool(),
                    done.join("\n  ")
                );
            }
            return Err(err);
        }
        for deletion in translation.deletions.iter().filter(|d| d.family == family) {
            println!("deleted: {}", deletion.command());
            done.push(deletion.command());
        }
    }
    Ok(())
}

/// What `iptables-restore --noflush` (and `ip6tables-restore`) read to make `deletions`: per
/// family, one block per table (committed atomically), its rules' deletions before its chains'.
#[must_use]
pub fn restore_inputs(deletions: &[delete::Deletion]) -> Vec<(Family, String)> {
    let mut inputs = Vec::new();
    for family in [Family::V4, Family::V6] {
        let of_family: Vec<_> = deletions.iter().filter(|d| d.family == family).collect();
        if of_family.is_empty() {
            continue;
        }
        let mut tables: Vec<&str> = Vec::new();
        for deletion in &of_family {
            if !tables.contains(&deletion.table.as_str()) {
                tables.push(&deletion.table);
            }
        }
        let mut input = String::new();
        for table in tables {
            let _ = writeln!(input, "*{table}");
            let (rules, chains): (Vec<&&delete::Deletion>, Vec<_>) = (of_family.iter())
                .filter(|d| d.table == table)
                .partition(|d| d.words[0] == "-D");
            for deletion in rules.into_iter().chain(chains) {
                let words: Vec<String> = (deletion.words.iter())
                    .map(|w| save::restore_quote(w))
                    .collect();
                let _ = writeln!(input, "{}", words.join(" "));
            }
            input.push_str("COMMIT\n");
        }
        inputs.push((family, input));
    }
    inputs
}

/// Runs `tool --noflush` on `input`.
fn restore(tool: &str, input: &str) -> Result<()> {
    let failed = |status: String, stderr: String| MigrateError::Apply {
        tool: tool.to_owned(),
        status,
        stderr,
    };
    let mut child = Command::new(tool)
        .arg("--noflush")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|err| failed("not started".into(), err.to_string()))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(input.as_bytes())
            .map_err(|err| failed("input not written".into(), err.to_string()))?;
    }
    let output = child
        .wait_with_output()
        .map_err(|err| failed("not waited for".into(), err.to_string()))?;
    if !output.status.success() {
        return Err(failed(
            output.status.to_string(),
            String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        )
        .into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::migrate::translate::Names;

    struct NoNames;

    impl Names for NoNames {
        fn uid(&self, _: &str) -> Option<u32> {
            None
        }
        fn gid(&self, _: &str) -> Option<u32> {
            None
        }
    }

    fn translation(rules: &str) -> Translation {
        let text = format!(
            "# Generated by iptables-save v1.8.9 (nf_tables)\n*filter\n:INPUT ACCEPT [0:0]\n\
             :FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n{rules}COMMIT\n"
        );
        translate::translate(&save::parse(&text, "t").unwrap(), &NoNames).unwrap()
    }

    fn policy(config: &str) -> Policy {
        let config = Config::from_toml(None, config, &Overrides::default()).unwrap();
        Policy::resolve(&config, &Hierarchy::at("/nonexistent-cgroup-mount".into())).unwrap()
    }

    const ROOT_AND_A_SERVICE: &str = "\
        -A OUTPUT -d 169.254.169.254/32 -m owner --uid-owner 0 -j ACCEPT\n\
        -A OUTPUT -d 169.254.169.254/32 -m cgroup --path /system.slice/ssm.service -j ACCEPT\n\
        -A OUTPUT -d 169.254.169.254/32 -j DROP\n";

    #[test]
    fn a_policy_that_lets_through_the_same_workloads_covers_the_rules() {
        let t = translation(ROOT_AND_A_SERVICE);
        // The config migrate prints covers them.
        let printed = crate::migrate::render::config(&t, "t");
        assert_eq!(missing(&t, &policy(&printed)), Vec::<String>::new());
        // So do wider rules: a unit matching the cgroup, a pattern above it.
        let wider = "[[allow]]\nuid = 0\n[[allow]]\nunit = \"ssm.service\"\n";
        assert_eq!(missing(&t, &policy(wider)), Vec::<String>::new());
        let wider = "[[allow]]\nuid = 0\n[[allow]]\ncgroup = \"/system.slice/**\"\n";
        assert_eq!(missing(&t, &policy(wider)), Vec::<String>::new());
    }

    #[test]
    fn what_a_policy_would_stop_is_named() {
        let t = translation(ROOT_AND_A_SERVICE);
        // The built-in default: uid 0 alone.
        assert_eq!(
            missing(&t, &policy("")),
            [
                "cgroup /system.slice/ssm.service: the rules let it through; no rule of the policy does"
            ]
        );
        // A rule for the service that excludes part of it.
        let excluding = "[[allow]]\nuid = 0\n[[allow]]\ncgroup = \"/system.slice/ssm.service\"\n\
                         not_cgroup = \"/system.slice/ssm.service/worker\"\n";
        assert_eq!(missing(&t, &policy(excluding)).len(), 1);
        // Root only in a unit is not root anywhere.
        let narrower = "[[allow]]\nuid = 0\nunit = \"sshd.service\"\n\
                        [[allow]]\ncgroup = \"/system.slice/ssm.service\"\n";
        assert_eq!(
            missing(&t, &policy(narrower)),
            ["uid 0: the rules let it through; no rule of the policy does"]
        );
        // A policy that does not protect an address the rules covered.
        let elsewhere = "protect = [\"ecs-credentials\"]\n[[allow]]\nuid = 0\n\
                         [[allow]]\ncgroup = \"/system.slice\"\n";
        assert_eq!(
            missing(&t, &policy(elsewhere)),
            ["169.254.169.254: the rules kept workloads from it; the policy does not protect it"]
        );
        // Audit mode lets everything through: only what it protects matters.
        assert!(missing(&t, &policy("mode = \"audit\"\n")).is_empty());
    }

    #[test]
    fn workloads_the_config_cannot_name_must_be_let_through_too() {
        // Everyone but uid 33: the printed config lets no one through; a policy that has
        // no rule for every uid does not cover it.
        let t = translation("-A OUTPUT -d 169.254.169.254/32 -m owner --uid-owner 33 -j DROP\n");
        assert_eq!(t.lost.len(), 1);
        assert_eq!(
            missing(&t, &policy("[[allow]]\nuid = 0\n")),
            ["uid not 33: the rules let it through; no rule of the policy does"]
        );
        assert!(missing(&t, &policy("[[allow]]\ncgroup = \"/\"\n")).is_empty());
    }

    #[test]
    fn apply_needs_a_policy_no_wider_than_the_rules() {
        let t = translation(ROOT_AND_A_SERVICE);
        let printed = crate::migrate::render::config(&t, "t");
        assert_eq!(wider(&t, &policy(&printed)), Vec::<String>::new());
        // Every host workload: uid 1000 was stopped by the rules.
        let all = wider(&t, &policy("[[allow]]\ncgroup = \"/\"\n"));
        assert_eq!(all.len(), 1, "{all:?}");
        assert!(all[0].contains("which the rules stopped"), "{all:?}");
        // A unit is read as every cgroup: refused, not guessed.
        let unit = wider(&t, &policy("[[allow]]\nunit = \"ssm.service\"\n"));
        assert!(unit[0].contains("or part of it"), "{unit:?}");
        // Root in a unit is within root anywhere; a pattern below the service's cgroup is
        // within it.
        let narrow = "[[allow]]\nuid = 0\nunit = \"sshd.service\"\n\
                      [[allow]]\ncgroup = \"/system.slice/ssm.service/*\"\n";
        assert_eq!(wider(&t, &policy(narrow)), Vec::<String>::new());
        assert!(!wider(&t, &policy("mode = \"audit\"\n")).is_empty());
        // What the rules let through on some ports only is not "stopped".
        let t = translation(
            "-A OUTPUT -d 169.254.169.254/32 -p tcp -m tcp --dport 80 -m owner --uid-owner 1000 \
             -j ACCEPT\n-A OUTPUT -d 169.254.169.254/32 -j DROP\n",
        );
        assert_eq!(
            wider(&t, &policy("[[allow]]\nuid = 1000\n")),
            Vec::<String>::new()
        );
        assert_eq!(wider(&t, &policy("[[allow]]\nuid = 1001\n")).len(), 1);
    }

    #[test]
    fn deletions_are_one_block_per_table_rules_before_chains() {
        let text = "# Generated by iptables-save v1.8.9\n*mangle\n:OUTPUT ACCEPT [0:0]\n\
                    -A OUTPUT -d 169.254.169.254/32 -m owner --uid-owner 7 -j DROP\nCOMMIT\n\
                    *filter\n:OUTPUT ACCEPT [0:0]\n:IMDS - [0:0]\n\
                    -A OUTPUT -d 169.254.169.254/32 -j IMDS\n\
                    -A IMDS -m owner ! --uid-owner 0 -j DROP\nCOMMIT\n\
                    # Generated by ip6tables-save v1.8.9\n*filter\n:OUTPUT ACCEPT [0:0]\n\
                    -A OUTPUT -d fd00:ec2::254/128 -m owner ! --uid-owner 0 -m comment \
                    --comment \"no root, no IMDS\" -j DROP\nCOMMIT\n";
        let t = translate::translate(&save::parse(text, "t").unwrap(), &NoNames).unwrap();
        let inputs = restore_inputs(&t.deletions);
        assert_eq!(
            inputs,
            [
                (
                    Family::V4,
                    "*filter\n-D OUTPUT -d 169.254.169.254/32 -j IMDS\n\
                     -D IMDS -m owner ! --uid-owner 0 -j DROP\n-X IMDS\nCOMMIT\n\
                     *mangle\n-D OUTPUT -d 169.254.169.254/32 -m owner --uid-owner 7 -j DROP\n\
                     COMMIT\n"
                        .to_owned()
                ),
                (
                    Family::V6,
                    "*filter\n-D OUTPUT -d fd00:ec2::254/128 -m owner ! --uid-owner 0 -m comment \
                     --comment \"no root, no IMDS\" -j DROP\nCOMMIT\n"
                        .to_owned()
                ),
            ]
        );
    }

    #[test]
    fn apply_plans_its_deletions_for_the_policy_in_force() {
        // The printed config cannot say "uid 1000 and gid 1000", so lets no one through, and
        // the ACCEPT could go; a policy that lets uid 1000 through needs it to stay, or the
        // untranslated TCP DROP would stop uid 1000.
        let text = "# Generated by iptables-save v1.8.9\n*filter\n:OUTPUT ACCEPT [0:0]\n\
                    -A OUTPUT -d 169.254.169.254/32 -m owner --uid-owner 1000 --gid-owner 1000 \
                    -j ACCEPT\n-A OUTPUT -d 169.254.169.254/32 -p tcp -j DROP\nCOMMIT\n";
        let ruleset = save::parse(text, "t").unwrap();
        let t = translate::translate(&ruleset, &NoNames).unwrap();
        assert!(t.allowed.is_empty());
        assert_eq!(t.deletions.len(), 1, "{:?}", t.deletions);
        let p = policy("[[allow]]\nuid = 1000\n");
        let allowed: Vec<Term> = p.rules.iter().flat_map(|r| rule_terms(&p, r).0).collect();
        let plan = delete::replan(&ruleset, &NoNames, &t, &allowed).unwrap();
        assert!(plan.deletions.is_empty(), "{:?}", plan.deletions);
    }
}
