//! Tests of the Raft log store: reopening after every kind of record, torn tails, damage,
//! compaction, and openraft's own storage suite.

use std::io::Write;

use openraft::entry::RaftEntry;
use openraft::storage::{IOFlushed, RaftLogReader, RaftLogStorage};
use openraft::testing::log::{StoreBuilder, Suite};
use openraft::type_config::TypeConfigExt;
use openraft::vote::{RaftLeaderId, RaftVote};
use openraft::StorageError;

use super::*;
use crate::cluster::state_machine::StateMachine;
use crate::cluster::testing::{blank, create, entry, membership, store};

fn open(dir: &Path) -> LogStore {
    LogStore::open(dir, LogOptions::new(FsyncPolicy::Always)).unwrap()
}

/// Appends `entries` and waits for their callback: durable.
async fn append(log: &mut LogStore, entries: Vec<pb::Entry>) {
    let (tx, rx) = TypeConfig::oneshot();
    log.append(entries, IOFlushed::signal(tx)).await.unwrap();
    rx.await.unwrap().unwrap();
}

fn vote(term: u64, node: u64) -> pb::Vote {
    pb::Vote::from_leader_id(pb::LeaderId::new(term, node), true)
}

async fn indexes(log: &mut LogStore) -> Vec<u64> {
    log.try_get_log_entries(..)
        .await
        .unwrap()
        .iter()
        .map(|e| e.index)
        .collect()
}

/// The encoded size of `entries`, as the log counts them.
fn size(entries: &[pb::Entry]) -> u64 {
    entries.iter().map(|e| e.encoded_len() as u64).sum()
}

#[tokio::test]
async fn the_log_size_after_an_index_follows_appends_truncations_purges_and_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = open(dir.path());
    let size_of = log.size();
    let first: Vec<pb::Entry> = (1..=10)
        .map(|i| entry(1, i, vec![create(i as u32)]))
        .collect();
    append(&mut log, first.clone()).await;
    assert_eq!(size_of.bytes_after(None), size(&first));
    assert_eq!(size_of.bytes_after(Some(4)), size(&first[4..]));
    assert_eq!(size_of.bytes_after(Some(10)), 0);
    // A new leader's longer entries replace 9 and 10: the size follows the new tail.
    log.truncate_after(Some(LogId::new(1, 8))).await.unwrap();
    assert_eq!(size_of.bytes_after(Some(4)), size(&first[4..8]));
    let tail = vec![
        entry(2, 9, vec![create(900), create(901)]),
        entry(2, 10, vec![create(1000), create(1001), create(1002)]),
    ];
    append(&mut log, tail.clone()).await;
    assert_eq!(
        size_of.bytes_after(Some(4)),
        size(&first[4..8]) + size(&tail)
    );
    // A purge leaves the size after a later index alone.
    log.purge(LogId::new(1, 6)).await.unwrap();
    assert_eq!(
        size_of.bytes_after(Some(6)),
        size(&first[6..8]) + size(&tail)
    );
    assert_eq!(size_of.bytes_after(None), size_of.bytes_after(Some(6)));
    log.closer().close();
    drop(log);

    let log = open(dir.path());
    assert_eq!(
        log.size().bytes_after(Some(8)),
        size(&tail),
        "the size is rebuilt at replay"
    );
}

#[tokio::test]
async fn a_reopened_log_has_every_append_vote_truncate_purge_and_commit() {
    // Under `always` every write goes through the writer thread; under the others an append
    // is written in place whenever nothing is queued for the writer, between the votes,
    // truncations and purges that are.
    for policy in [FsyncPolicy::Always, FsyncPolicy::Everysec, FsyncPolicy::No] {
        reopened_log_has_everything(policy).await;
    }
}

async fn reopened_log_has_everything(policy: FsyncPolicy) {
    let dir = tempfile::tempdir().unwrap();
    let open = |dir: &Path| LogStore::open(dir, LogOptions::new(policy)).unwrap();
    let mut log = open(dir.path());
    append(&mut log, vec![membership(1, 1, &[1, 2, 3])]).await;
    append(
        &mut log,
        (2..=10)
            .map(|i| entry(1, i, vec![create(i as u32)]))
            .collect(),
    )
    .await;
    log.save_vote(&vote(2, 3)).await.unwrap();
    // A new leader's entries replace the tail from 9 on.
    log.truncate_after(Some(LogId::new(1, 8))).await.unwrap();
    append(&mut log, vec![blank(2, 9), entry(2, 10, vec![create(99)])]).await;
    log.purge(LogId::new(1, 3)).await.unwrap();
    log.save_committed(Some(LogId::new(2, 9))).await.unwrap();
    log.closer().close();
    drop(log);

    let mut log = open(dir.path());
    let state = log.get_log_state().await.unwrap();
    assert_eq!(state.last_purged_log_id, Some(LogId::new(1, 3)));
    assert_eq!(state.last_log_id, Some(LogId::new(2, 10)));
    assert_eq!(indexes(&mut log).await, (4..=10).collect::<Vec<_>>());
    assert_eq!(log.read_vote().await.unwrap(), Some(vote(2, 3)));
    assert_eq!(log.read_committed().await.unwrap(), Some(LogId::new(2, 9)));
    let tail = log.try_get_log_entries(9..=10).await.unwrap();
    assert_eq!(tail[0], blank(2, 9));
    assert_eq!(tail[1], entry(2, 10, vec![create(99)]));
    // The log goes on from where it was.
    append(&mut log, vec![blank(2, 11)]).await;
    assert_eq!(
        log.get_log_state().await.unwrap().last_log_id,
        Some(LogId::new(2, 11))
    );
}

#[tokio::test]
async fn a_torn_last_record_is_cut_off_and_the_log_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = open(dir.path());
    append(&mut log, (1..=5).map(|i| blank(1, i)).collect()).await;
    log.closer().close();
    drop(log);
    let path = dir.path().join(LOG_FILE);
    let full = std::fs::metadata(&path).unwrap().len();
    // kill -9 in the middle of writing entry 5: its frame is cut short.
    let f = OpenOptions::new().write(true).open(&path).unwrap();
    f.set_len(full - 3).unwrap();
    drop(f);

    let mut log = open(dir.path());
    assert_eq!(indexes(&mut log).await, vec![1, 2, 3, 4]);
    let cut = std::fs::metadata(&path).unwrap().len();
    assert!(cut < full - 3, "the torn frame is truncated away");
    append(&mut log, vec![blank(1, 5), blank(1, 6)]).await;
    log.closer().close();
    drop(log);
    let mut log = open(dir.path());
    assert_eq!(indexes(&mut log).await, vec![1, 2, 3, 4, 5, 6]);
}

#[tokio::test]
async fn damage_before_the_end_stops_the_open_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = open(dir.path());
    append(&mut log, (1..=5).map(|i| blank(1, i)).collect()).await;
    log.closer().close();
    drop(log);
    let path = dir.path().join(LOG_FILE);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[format::HEADER_BYTES as usize + 9] ^= 0x40;
    std::fs::write(&path, &bytes).unwrap();
    let err = LogStore::open(dir.path(), LogOptions::new(FsyncPolicy::Always))
        .err()
        .expect("a damaged log must not open");
    let msg = err.to_string();
    assert!(msg.contains("log.sdl") && msg.contains("corrupt"), "{msg}");
}

#[tokio::test]
async fn a_second_open_of_one_directory_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let log = open(dir.path());
    let err = LogStore::open(dir.path(), LogOptions::new(FsyncPolicy::Always))
        .err()
        .expect("locked");
    assert!(matches!(err, OpenError::Locked { .. }), "{err}");
    log.closer().close();
    drop(LogStore::open(dir.path(), LogOptions::new(FsyncPolicy::Always)).unwrap());
}

#[tokio::test]
async fn a_purge_rewrites_a_big_file_down_to_what_it_still_needs() {
    let dir = tempfile::tempdir().unwrap();
    let options = LogOptions {
        fsync: FsyncPolicy::Everysec,
        compact_at_bytes: 4096,
    };
    let mut log = LogStore::open(dir.path(), options).unwrap();
    log.save_vote(&vote(1, 1)).await.unwrap();
    for i in 1..=200u64 {
        append(&mut log, vec![entry(1, i, vec![create(i as u32)])]).await;
    }
    log.save_committed(Some(LogId::new(1, 200))).await.unwrap();
    let path = dir.path().join(LOG_FILE);
    let before = std::fs::metadata(&path).unwrap().len();
    log.purge(LogId::new(1, 190)).await.unwrap();
    let after = std::fs::metadata(&path).unwrap().len();
    assert!(after * 5 < before, "rewritten: {before} -> {after} bytes");
    // Records after the rewrite land in the new file.
    append(&mut log, vec![blank(2, 201)]).await;
    log.closer().close();
    drop(log);

    let mut log = LogStore::open(dir.path(), options).unwrap();
    assert_eq!(indexes(&mut log).await, (191..=201).collect::<Vec<_>>());
    let state = log.get_log_state().await.unwrap();
    assert_eq!(state.last_purged_log_id, Some(LogId::new(1, 190)));
    assert_eq!(log.read_vote().await.unwrap(), Some(vote(1, 1)));
    assert_eq!(
        log.read_committed().await.unwrap(),
        Some(LogId::new(1, 200))
    );
    assert!(!dir.path().join(LOG_TMP).exists());
}

#[tokio::test]
async fn a_purge_past_the_last_entry_leaves_an_empty_log_at_the_purge_point() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = open(dir.path());
    append(&mut log, (1..=3).map(|i| blank(1, i)).collect()).await;
    // A snapshot installed from the leader covers more than this log holds.
    log.purge(LogId::new(4, 50)).await.unwrap();
    log.closer().close();
    drop(log);
    let mut log = open(dir.path());
    let state = log.get_log_state().await.unwrap();
    assert_eq!(state.last_purged_log_id, Some(LogId::new(4, 50)));
    assert_eq!(state.last_log_id, Some(LogId::new(4, 50)));
    assert!(indexes(&mut log).await.is_empty());
}

#[tokio::test]
async fn concurrent_appends_share_fsyncs_and_all_complete() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = open(dir.path());
    // Queue many appends before awaiting any: the writer takes them as one batch or a few.
    let mut waits = Vec::new();
    for i in 1..=100u64 {
        let (tx, rx) = TypeConfig::oneshot();
        log.append(vec![blank(1, i)], IOFlushed::signal(tx))
            .await
            .unwrap();
        waits.push(rx);
    }
    for rx in waits {
        rx.await.unwrap().unwrap();
    }
    log.closer().close();
    drop(log);
    let mut log = open(dir.path());
    assert_eq!(indexes(&mut log).await, (1..=100).collect::<Vec<_>>());
}

#[tokio::test]
async fn a_closed_log_refuses_writes() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = open(dir.path());
    log.closer().close();
    let err = log.save_vote(&vote(1, 1)).await.unwrap_err();
    assert!(err.to_string().contains("closed"), "{err}");
    // The file is a valid, empty log.
    let mut f = OpenOptions::new()
        .append(true)
        .open(dir.path().join(LOG_FILE))
        .unwrap();
    f.flush().unwrap();
}

/// Builds a fresh log store and state machine in a temporary directory, for openraft's suite.
struct Builder;

impl StoreBuilder<TypeConfig, LogStore, StateMachine, tempfile::TempDir> for Builder {
    async fn build(
        &self,
    ) -> Result<(tempfile::TempDir, LogStore, StateMachine), StorageError<TypeConfig>> {
        let dir = tempfile::tempdir().unwrap();
        let log = LogStore::open(dir.path(), LogOptions::new(FsyncPolicy::No)).unwrap();
        let sm = StateMachine::open(dir.path(), store()).unwrap();
        Ok((dir, log, sm))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openraft_storage_suite_passes() {
    Suite::test_all(Builder).await.unwrap();
}

#[test]
fn entries_keep_their_log_ids() {
    let e = entry(3, 7, vec![create(1)]);
    assert_eq!(e.log_id(), LogId::new(3, 7));
}

#[tokio::test]
async fn a_committed_id_rides_with_the_next_append_instead_of_waking_the_writer() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(LOG_FILE);
    let mut log = open(dir.path());
    append(&mut log, vec![entry(1, 1, vec![create(1)])]).await;
    let before = std::fs::metadata(&path).unwrap().len();
    log.save_committed(Some(LogId::new(1, 1))).await.unwrap();
    assert_eq!(log.read_committed().await.unwrap(), Some(LogId::new(1, 1)));
    assert_eq!(
        std::fs::metadata(&path).unwrap().len(),
        before,
        "nothing written yet"
    );

    append(&mut log, vec![entry(1, 2, vec![create(2)])]).await;
    // What the file holds now, replayed as a start-up would: the ID, then the entry.
    let mut replayed = Mem::default();
    replay(&path, &mut replayed).unwrap();
    assert_eq!(replayed.committed, Some(LogId::new(1, 1)));
    assert_eq!(replayed.last_log_id(), Some(LogId::new(1, 2)));
    log.closer().close();
}

#[tokio::test]
async fn under_everysec_an_append_is_written_in_place_while_the_writer_is_idle() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(LOG_FILE);
    let mut log = LogStore::open(dir.path(), LogOptions::new(FsyncPolicy::Everysec)).unwrap();
    log.save_vote(&vote(1, 1)).await.unwrap();
    let before = std::fs::metadata(&path).unwrap().len();
    let (tx, mut rx) = TypeConfig::oneshot();
    log.append(vec![entry(1, 1, vec![create(1)])], IOFlushed::signal(tx))
        .await
        .unwrap();
    // As `append` returns, the entry is in the file and openraft has been told: no hand-off
    // to the writer thread.
    assert!(std::fs::metadata(&path).unwrap().len() > before);
    assert!(matches!(rx.try_recv(), Ok(Ok(()))), "answered in place");
    log.closer().close();
    let mut log = LogStore::open(dir.path(), LogOptions::new(FsyncPolicy::Everysec)).unwrap();
    assert_eq!(indexes(&mut log).await, vec![1]);
    assert_eq!(log.read_vote().await.unwrap(), Some(vote(1, 1)));
}
