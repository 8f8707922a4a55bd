use super::*;
use herd_storage::model::FenceAction;

const GOOD: &str = r#"
name = "hv1"
role = "coordinator"
data_dir = "/tmp/x"
admin_socket = "/tmp/x/admin.sock"
[cluster]
listen = "127.0.0.11:7400"
"#;

#[test]
fn admin_group_access_needs_a_group() {
    let top = |extra: &str| GOOD.replacen("name = \"hv1\"", &format!("name = \"hv1\"\n{extra}"), 1);
    let c = Config::parse(&top("admin_group_access = \"full\"")).expect("parses");
    assert_eq!(c.validate().expect_err("refused").0, "admin_group_access");
    let c = Config::parse(&top("admin_socket_group = \"herd\"\nadmin_group_access = \"full\"")).expect("parses");
    assert!(c.validate().is_ok());
    assert!(Config::parse(&top("admin_socket_group = \"herd\"\nadmin_group_access = \"root\"")).is_err());
}

#[test]
fn fencing_section_password_file_and_self_fence_rules() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("tempdir");
    let pw = dir.path().join("bmc.pass");
    std::fs::write(&pw, "pw1\n").expect("write");
    std::fs::set_permissions(&pw, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let with = |extra: &str| {
        format!(
            "{GOOD}[fencing]\nbmc = \"127.0.0.1:9631\"\nuser = \"admin\"\npassword_file = \"{}\"\n{extra}",
            pw.display()
        )
    };
    let c = Config::parse(&with("")).expect("parses");
    c.validate().expect("valid");
    let p = c.fencing.as_ref().expect("section").policy().expect("policy");
    assert_eq!((p.password.as_str(), p.fence_after_ms, p.fence_action), ("pw1", 1500, FenceAction::Reboot));
    assert_eq!(p.watchdog_timeout_ms, 0, "no watchdog armed");
    // Self-fence without a watchdog is refused.
    let c = Config::parse(&with("failed_fence = \"recover-after-self-fence\"\n")).expect("parses");
    assert_eq!(c.validate().expect_err("refused").0, "fencing.failed_fence");
    let c = Config::parse(&with("failed_fence = \"recover-after-self-fence\"\nwatchdog = \"/dev/watchdog\"\n"))
        .expect("parses");
    c.validate().expect("valid with a watchdog");
    // A password file others can read is refused, naming the file.
    std::fs::set_permissions(&pw, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let (key, msg) = Config::parse(&with("")).expect("parses").validate().expect_err("refused");
    assert_eq!(key, "fencing.password_file");
    assert!(msg.contains("bmc.pass") && msg.contains("chmod 600") && !msg.contains("pw1"), "{msg}");
    assert!(Config::parse(&with("fence_action = \"explode\"\n")).is_err());
    // A line break in the user would inject a line into an external agent's stdin.
    std::fs::set_permissions(&pw, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let c = Config::parse(&with("")).expect("parses");
    let mut f = c.fencing.clone().expect("section");
    f.user = "admin\naction=on".into();
    assert!(f.validate().is_err());
}

#[test]
fn the_example_config_documents_valid_keys() {
    let c = Config::parse(include_str!("../../deploy/herd.example.toml")).expect("example parses");
    c.validate().expect("example is valid");
    assert_eq!(c.limits.max_frame_bytes, LimitsSection::default().max_frame_bytes);
    assert_eq!(c.raft.election_timeout_ms, RaftSection::default().election_timeout_ms);
}

#[test]
fn a_minimal_config_gets_defaults() {
    let c = Config::parse(GOOD).expect("parses");
    c.validate().expect("valid");
    assert_eq!(c.raft.heartbeat_ms, 50);
    assert_eq!(c.raft.election_timeout_ms, [150, 300]);
    assert_eq!(c.keepalive.interval_ms, 5000);
    assert_eq!(c.advertise(), "127.0.0.11:7400");
}

#[test]
fn unknown_keys_are_refused_with_their_path() {
    let text = GOOD.replace("listen =", "lisen = \"x\"\nlisten =");
    let e = Config::parse(&text).expect_err("refused");
    assert!(e.contains("cluster") && e.contains("lisen"), "{e}");
    assert!(!e.contains('\n'));
    let e = Config::parse(&format!("colour = 1\n{GOOD}")).expect_err("refused");
    assert!(e.contains("colour"), "{e}");
}

#[test]
fn bad_values_name_the_key() {
    for (from, to, key) in
        [("127.0.0.11:7400", "not-an-address", "cluster.listen"), ("\"hv1\"", "\"bad name\"", "name")]
    {
        let c = Config::parse(&GOOD.replace(from, to)).expect("parses");
        let (k, _) = c.validate().expect_err("invalid");
        assert_eq!(k, key);
    }
    let c = Config::parse(&format!("{GOOD}[raft]\nelection_timeout_ms = [300, 150]\n")).expect("parses");
    assert_eq!(c.validate().expect_err("invalid").0, "raft.election_timeout_ms");
    let e = Config::parse(&GOOD.replace("\"coordinator\"", "\"king\"")).expect_err("refused");
    assert!(e.contains("role"), "{e}");
}

#[test]
fn client_membership_is_for_hypervisors() {
    let listen = "listen = \"127.0.0.11:7400\"";
    let client = GOOD.replace(listen, &format!("{listen}\nmembership = \"client\""));
    assert_ne!(client, GOOD, "the example has the listen line");
    let c = Config::parse(&client).expect("parses");
    assert_eq!(c.validate().expect_err("a coordinator cannot be a client").0, "cluster.membership");
    let c = Config::parse(&client.replace("\"coordinator\"", "\"hypervisor\"")).expect("parses");
    assert_eq!(c.cluster.membership, Some(Membership::Client));
    assert!(c.validate().is_ok());
    assert!(c.is_client(None) && c.is_client(Some(false)), "an explicit client is one");
    let learner =
        Config::parse(&client.replace("\"client\"", "\"learner\"").replace("\"coordinator\"", "\"hypervisor\""))
            .expect("parses");
    assert!(!learner.is_client(None) && !learner.is_client(Some(true)), "an explicit learner is one");
    // Unset: a coordinator is never a client; a hypervisor joins as one, and stays what its
    // data_dir joined as (a learner of an older cluster keeps running after an upgrade).
    let coordinator = Config::parse(GOOD).expect("parses");
    assert_eq!(coordinator.cluster.membership, None);
    assert!(!coordinator.is_client(None));
    let hypervisor = Config::parse(&GOOD.replace("\"coordinator\"", "\"hypervisor\"")).expect("parses");
    assert!(hypervisor.is_client(None) && hypervisor.is_client(Some(true)) && !hypervisor.is_client(Some(false)));
    assert!(Config::parse(&GOOD.replace(listen, &format!("{listen}\nmembership = \"voter\""))).is_err());
}
