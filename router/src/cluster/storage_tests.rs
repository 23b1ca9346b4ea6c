//! Storage tests: what is written survives a reopen, compaction keeps the log consistent, and a bad directory is
//! refused without a byte changing.

use super::*;
use raft::Storage as _;

fn entry(index: u64, term: u64) -> Entry {
    let mut e = Entry { index, term, ..Default::default() };
    e.set_data(format!("e{index}").into_bytes().into());
    e
}

fn hs(term: u64, commit: u64) -> HardState {
    HardState { term, commit, ..Default::default() }
}

fn bootstrap(s: &mut ClusterStorage) {
    let mut snap = Snapshot::default();
    snap.mut_metadata().index = 1;
    snap.mut_metadata().term = 1;
    snap.mut_metadata().mut_conf_state().voters = vec![1];
    snap.set_data(b"state@1".to_vec().into());
    s.apply_snapshot(snap).unwrap();
}

/// Every file in `dir` with its bytes, to show a refusal changed nothing.
fn contents(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut v: Vec<_> =
        std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).map(|p| (p.clone(), std::fs::read(p).unwrap())).collect();
    v.sort();
    v
}

#[test]
fn written_state_survives_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("data");
    {
        let (mut s, fresh) = ClusterStorage::open(&path, "c1", 1).unwrap();
        assert!(fresh);
        assert!(!s.initialized());
        bootstrap(&mut s);
        s.persist(&[entry(2, 1), entry(3, 1), entry(4, 2)], Some(&hs(2, 3))).unwrap();
        // A conflicting tail replaces what was there.
        s.persist(&[entry(4, 3), entry(5, 3)], Some(&hs(3, 4))).unwrap();
        s.set_commit(5).unwrap();
        s.set_conf_state(ConfState { voters: vec![1, 2], ..Default::default() });
        s.set_applied(4, b"state@4".to_vec()).unwrap();
    }
    let (s, fresh) = ClusterStorage::open(&path, "c1", 1).unwrap();
    assert!(!fresh);
    assert!(s.initialized());
    assert_eq!(s.conf_state().voters, vec![1, 2]);
    assert_eq!((s.applied_index(), s.applied_state()), (4, &b"state@4"[..]));
    let st = s.initial_state().unwrap();
    assert_eq!((st.hard_state.term, st.hard_state.commit), (3, 5));
    assert_eq!((s.first_index().unwrap(), s.last_index().unwrap()), (2, 5));
    let got = s.entries(2, 6, None, GetEntriesContext::empty(false)).unwrap();
    assert_eq!(got.iter().map(|e| (e.index, e.term)).collect::<Vec<_>>(), vec![(2, 1), (3, 1), (4, 3), (5, 3)]);
    assert_eq!(s.term(1).unwrap(), 1);
    assert_eq!(s.snapshot_ref().get_data(), b"state@1");
}

#[test]
fn compaction_drops_the_log_and_keeps_the_state() {
    let dir = tempfile::tempdir().unwrap();
    let (mut s, _) = ClusterStorage::open(dir.path(), "c1", 1).unwrap();
    bootstrap(&mut s);
    let n = COMPACT_EVERY + 5;
    let entries: Vec<Entry> = (2..=n + 1).map(|i| entry(i, 2)).collect();
    s.persist(&entries, Some(&hs(2, n + 1))).unwrap();
    s.set_applied(n, b"state@n".to_vec()).unwrap();
    assert!(s.should_compact());
    s.compact().unwrap();
    assert!(!s.should_compact());
    assert_eq!(s.first_index().unwrap(), n + 1);
    assert!(matches!(s.entries(2, 3, None, GetEntriesContext::empty(false)), Err(raft::Error::Store(StorageError::Compacted))));
    assert_eq!(s.term(n).unwrap(), 2);
    drop(s);
    let (s, _) = ClusterStorage::open(dir.path(), "c1", 1).unwrap();
    assert_eq!((s.first_index().unwrap(), s.last_index().unwrap()), (n + 1, n + 1));
    assert_eq!(s.snapshot_ref().get_data(), b"state@n");
    assert_eq!(s.snapshot_ref().get_metadata().index, n);
    // A follower that needs a snapshot gets the applied state.
    let snap = s.snapshot(n, 2).unwrap();
    assert_eq!((snap.get_metadata().index, snap.get_data()), (n, &b"state@n"[..]));
}

#[test]
fn a_snapshot_not_yet_applied_is_temporarily_unavailable() {
    let dir = tempfile::tempdir().unwrap();
    let (mut s, _) = ClusterStorage::open(dir.path(), "c1", 1).unwrap();
    bootstrap(&mut s);
    assert!(matches!(s.snapshot(5, 2), Err(raft::Error::Store(StorageError::SnapshotTemporarilyUnavailable))));
}

fn made(dir: &Path) {
    let (mut s, _) = ClusterStorage::open(dir, "c1", 1).unwrap();
    bootstrap(&mut s);
    s.persist(&[entry(2, 1)], Some(&hs(1, 2))).unwrap();
}

#[test]
fn another_cluster_or_router_or_newer_format_is_refused_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    made(dir.path());
    let before = contents(dir.path());
    assert!(matches!(ClusterStorage::open(dir.path(), "c2", 1), Err(DataDirError::ForeignCluster { .. })));
    assert!(matches!(ClusterStorage::open(dir.path(), "c1", 2), Err(DataDirError::OtherNode { .. })));
    let marker = dir.path().join(MARKER);
    let newer = String::from_utf8(std::fs::read(&marker).unwrap()).unwrap().replace("\"format\": 1", "\"format\": 2");
    std::fs::write(&marker, newer).unwrap();
    let before_newer = contents(dir.path());
    let err = ClusterStorage::open(dir.path(), "c1", 1).err().unwrap();
    assert!(matches!(err, DataDirError::NewerFormat { found: 2, .. }), "{err}");
    assert_eq!(contents(dir.path()), before_newer);
    assert_ne!(before, before_newer);
}

#[test]
fn a_corrupted_directory_is_refused_unchanged() {
    // A marker that does not parse.
    let dir = tempfile::tempdir().unwrap();
    made(dir.path());
    std::fs::write(dir.path().join(MARKER), b"{not json").unwrap();
    let before = contents(dir.path());
    assert!(matches!(ClusterStorage::open(dir.path(), "c1", 1), Err(DataDirError::Corrupt { .. })));
    assert_eq!(contents(dir.path()), before);

    // A database whose header was overwritten.
    let dir = tempfile::tempdir().unwrap();
    made(dir.path());
    let db = dir.path().join(DB_FILE);
    let mut bytes = std::fs::read(&db).unwrap();
    bytes[..64].fill(0xAB);
    std::fs::write(&db, bytes).unwrap();
    let before = contents(dir.path());
    let err = ClusterStorage::open(dir.path(), "c1", 1).err().unwrap();
    assert!(matches!(err, DataDirError::Corrupt { .. }), "{err}");
    assert_eq!(contents(dir.path()), before);

    // Files that are not ours, and no marker.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("notes.txt"), b"hello").unwrap();
    assert!(matches!(ClusterStorage::open(dir.path(), "c1", 1), Err(DataDirError::Corrupt { .. })));
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
}
