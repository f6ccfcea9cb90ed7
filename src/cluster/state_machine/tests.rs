//! Tests of the state machine: applying entries, fuzzy snapshots built beside applies,
//! installing, and the snapshot that survives a restart.

use openraft::storage::{RaftSnapshotBuilder, RaftStateMachine};

use super::*;
use crate::cluster::testing::{
    blank, create, end, entry, membership, session, sessions, store, update,
};
use crate::store::Effect;

async fn apply(sm: &mut StateMachine, entries: Vec<pb::Entry>) {
    let items = entries.into_iter().map(|e| Ok((e, None)));
    sm.apply(futures_util::stream::iter(items)).await.unwrap();
}

fn open(dir: &Path) -> StateMachine {
    StateMachine::open(dir, store()).unwrap()
}

#[tokio::test]
async fn committed_effects_reach_the_store_in_order_and_membership_is_kept() {
    let dir = tempfile::tempdir().unwrap();
    let mut sm = open(dir.path());
    apply(
        &mut sm,
        vec![
            membership(1, 1, &[1, 2, 3]),
            blank(1, 2),
            entry(1, 3, vec![create(1), create(2), update(1, 2, "a")]),
            entry(1, 4, vec![end(2)]),
        ],
    )
    .await;
    let (last, m) = sm.applied_state().await.unwrap();
    assert_eq!(last, Some(LogId::new(1, 4)));
    assert_eq!(m.log_id(), &Some(LogId::new(1, 1)));
    assert_eq!(m.voter_ids().collect::<Vec<_>>(), vec![1, 2, 3]);
    let all = sessions(sm.store());
    assert_eq!(all.len(), 1);
    assert_eq!(all[0].key, session(1).key);
    assert_eq!(all[0].version, 2);
    assert!(all[0].attributes.contains_key("a"));
}

/// The snapshot is fuzzy: taken at log ID 5, it also holds what entries 6 to 8 did, since they
/// were applied while it was being built. Installed elsewhere and followed by a replay of 6 to
/// 8, it must still give exactly the leader's state.
#[tokio::test]
async fn a_snapshot_built_beside_applies_converges_after_replay() {
    let dir = tempfile::tempdir().unwrap();
    let mut leader = open(dir.path());
    let head: Vec<pb::Entry> = std::iter::once(membership(1, 1, &[1]))
        .chain((2..=5).map(|i| entry(1, i, vec![create(i as u32)])))
        .collect();
    apply(&mut leader, head).await;
    let mut builder = leader.try_create_snapshot_builder(false).await.unwrap();
    let tail = vec![
        entry(1, 6, vec![update(2, 2, "x"), update(2, 3, "y")]),
        entry(1, 7, vec![end(3), create(60)]),
        entry(
            1,
            8,
            vec![Effect::Regenerate {
                old: session(4).key,
                session: Session {
                    key: session(40).key,
                    ..session(4)
                },
                idempotency: None,
            }],
        ),
    ];
    apply(&mut leader, tail.clone()).await;
    let snap = builder.build_snapshot().await.unwrap();
    assert_eq!(snap.meta.last_log_id, Some(LogId::new(1, 5)));

    let other = tempfile::tempdir().unwrap();
    let mut follower = open(other.path());
    follower
        .install_snapshot(&snap.meta, snap.snapshot)
        .await
        .unwrap();
    // The fuzz is real: the snapshot already holds entry 7's create.
    assert!(sessions(follower.store())
        .iter()
        .any(|s| s.key == session(60).key));
    assert_eq!(
        follower.applied_state().await.unwrap().0,
        Some(LogId::new(1, 5))
    );
    apply(&mut follower, tail).await;
    assert_eq!(sessions(follower.store()), sessions(leader.store()));
    assert_eq!(sessions(follower.store()).len(), 4);
}

#[tokio::test]
async fn installing_replaces_what_the_store_held() {
    let dir = tempfile::tempdir().unwrap();
    let mut leader = open(dir.path());
    apply(&mut leader, vec![entry(1, 1, vec![create(1), create(2)])]).await;
    let snap = leader
        .try_create_snapshot_builder(true)
        .await
        .unwrap()
        .build_snapshot()
        .await
        .unwrap();
    let other = tempfile::tempdir().unwrap();
    let mut follower = open(other.path());
    // A diverged follower: sessions the cluster never committed.
    apply(&mut follower, vec![entry(1, 1, vec![create(7), create(8)])]).await;
    follower
        .install_snapshot(&snap.meta, snap.snapshot)
        .await
        .unwrap();
    assert_eq!(sessions(follower.store()), sessions(leader.store()));
    assert_eq!(follower.store().stats().sessions, 2);
}

#[tokio::test]
async fn the_current_snapshot_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut sm = open(dir.path());
    apply(
        &mut sm,
        vec![
            membership(2, 1, &[5, 6, 7]),
            entry(2, 2, vec![create(1), create(2), create(3)]),
        ],
    )
    .await;
    let built = sm
        .try_create_snapshot_builder(true)
        .await
        .unwrap()
        .build_snapshot()
        .await
        .unwrap();
    let want = sessions(sm.store());
    drop(sm);

    let mut again = open(dir.path());
    let current = again.get_current_snapshot().await.unwrap().expect("kept");
    assert_eq!(current.meta, built.meta);
    // What openraft does at start-up: install the current snapshot into the empty store.
    let meta = current.meta.clone();
    again
        .install_snapshot(&meta, current.snapshot)
        .await
        .unwrap();
    assert_eq!(sessions(again.store()), want);
    let (last, m) = again.applied_state().await.unwrap();
    assert_eq!(last, Some(LogId::new(2, 2)));
    assert_eq!(m.voter_ids().collect::<Vec<_>>(), vec![5, 6, 7]);
    assert!(dir.path().join(SNAPSHOT_FILE).exists());
}

#[tokio::test]
async fn a_snapshot_cut_short_or_damaged_is_refused_before_install() {
    let dir = tempfile::tempdir().unwrap();
    let mut sm = open(dir.path());
    apply(&mut sm, vec![entry(1, 1, (1..=20).map(create).collect())]).await;
    let snap = sm
        .try_create_snapshot_builder(true)
        .await
        .unwrap()
        .build_snapshot()
        .await
        .unwrap();
    let good = std::fs::read(&snap.snapshot.path).unwrap();
    let path = dir.path().join("incoming-test.tmp");
    std::fs::write(&path, &good).unwrap();
    assert_eq!(verify_snapshot(&path).unwrap(), snap.meta);
    std::fs::write(&path, &good[..good.len() - 10]).unwrap();
    assert!(verify_snapshot(&path).is_err(), "cut short");
    let mut bad = good.clone();
    let at = good.len() / 2;
    bad[at] ^= 0x01;
    std::fs::write(&path, &bad).unwrap();
    assert!(verify_snapshot(&path).is_err(), "damaged");
}
