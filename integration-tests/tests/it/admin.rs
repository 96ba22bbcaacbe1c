//! Admin requests through a real coordinator: a create retried with its idempotency key, and
//! migration names.

use ferry_agent::control::Control;
use ferry_common::pki::Identity;
use ferry_common::tls::TlsMaterial;

use crate::harness::{migration_spec, TestEnv};

/// Issue 9, item 12: a `migration create` whose answer was lost (it was committed later) and
/// was retried made a second migration. The retry carries the first attempt's key and is
/// answered with the first attempt's migration; names are unique.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_create_answers_the_same_migration_and_names_are_unique() {
    let env = TestEnv::new();
    let node = env.coordinator().await;
    let coord = node.addr.to_string();
    // The two agents only register: no migration work runs.
    for name in ["source", "target"] {
        let tls = TlsMaterial::load(&env.issue(Identity::Agent(name.into()))).unwrap();
        let addr = if name == "target" { "127.0.0.1:9" } else { "" };
        Control::new(name, &coord, &tls)
            .unwrap()
            .register(addr, false, &Default::default(), "")
            .await
            .unwrap();
    }
    let ctl = env.ctl(&coord).await;
    let spec = migration_spec(&env.path("src"), "");
    let first = ctl
        .create_with_key("nightly", spec.clone(), "key-1")
        .await
        .unwrap();
    let again = ctl
        .create_with_key("nightly", spec.clone(), "key-1")
        .await
        .unwrap();
    assert_eq!(first, again, "the retry made another migration");
    assert_eq!(ctl.migrations().await.unwrap().len(), 1);

    // Running the command again (a new key) is refused by the name, naming the migration.
    let err = ctl
        .create_named("nightly", spec.clone())
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("a migration named nightly already exists (id 1)"),
        "{err}"
    );
    // Names are checked at the edge; an all-digit name would be read as an id.
    let err = ctl
        .create_named("42", spec.clone())
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("not all digits"), "{err}");

    // Without a name given, the name comes from source and target, so running the same
    // create twice is refused instead of copying twice.
    let id = ctl
        .create(migration_spec(&env.path("other"), "x"))
        .await
        .unwrap();
    let err = ctl
        .create(migration_spec(&env.path("other"), "x"))
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("already exists"), "{err}");
    // Status by name or id.
    assert_eq!(ctl.resolve("nightly").await.unwrap(), first);
    let by_name = ctl
        .status_of(&ferryctl::ctl::default_name(&migration_spec(
            &env.path("other"),
            "x",
        )))
        .await
        .unwrap();
    assert_eq!(by_name.migration_id, id);
    let err = ctl.resolve("no-such").await.unwrap_err().to_string();
    assert!(err.contains("no migration is named no-such"), "{err}");
    // A throttle given at create is in force from the migration's first entry, canonical.
    let spec = migration_spec(&env.path("third"), "y");
    let id = ctl
        .create_throttled(
            "paced",
            spec.clone(),
            "key-3",
            "else off, 09:00-18:00 100 Mbit",
        )
        .await
        .unwrap();
    assert_eq!(
        ctl.status(id).await.unwrap().throttle,
        "09:00-18:00 100mbit, else off"
    );
    let err = ctl
        .create_throttled("paced-2", spec, "key-4", "fast")
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("bad rate"), "{err}");
    node.shutdown().await;
}

/// A source learns of a new migration from a heartbeat the coordinator held (a long poll),
/// as soon as the migration is committed, not at its next poll.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_heartbeat_is_answered_by_the_new_migration() {
    use ferry_agent::control::Coordinator;
    use ferry_agent::schedule::HEARTBEAT_WAIT;
    let env = TestEnv::new();
    let node = env.coordinator().await;
    let coord = node.addr.to_string();
    let mut controls = Vec::new();
    for name in ["source", "target"] {
        let tls = TlsMaterial::load(&env.issue(Identity::Agent(name.into()))).unwrap();
        let addr = if name == "target" { "127.0.0.1:9" } else { "" };
        let c = Control::new(name, &coord, &tls).unwrap();
        c.register(addr, false, &Default::default(), "")
            .await
            .unwrap();
        controls.push(c);
    }
    let source = controls.remove(0);
    // The first heartbeat is answered at once (the agent holds no answer yet).
    assert!(source.heartbeat().await.unwrap().work.is_empty());
    let held = {
        let source = source.clone();
        tokio::spawn(async move {
            let t = std::time::Instant::now();
            (source.heartbeat().await.unwrap(), t.elapsed())
        })
    };
    let ctl = env.ctl(&coord).await;
    let id = ctl
        .create(migration_spec(&env.path("src"), ""))
        .await
        .unwrap();
    let (answer, took) = held.await.unwrap();
    assert_eq!(answer.work.len(), 1);
    assert_eq!(answer.work[0].migration_id, id);
    assert!(
        took < HEARTBEAT_WAIT,
        "the held heartbeat was answered by its deadline ({took:?}), not by the change"
    );
    node.shutdown().await;
}
