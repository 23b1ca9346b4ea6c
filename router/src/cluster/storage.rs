//! Durable raft storage: the log, hard state, conf state and the last snapshot of one router, in a data directory.
//!
//! The directory holds `CLUSTER` (a small JSON marker: format version, cluster id, raft id) and `raft.redb` (a redb
//! database; every write is one transaction, fsynced on commit before the caller sends anything that depends on it).
//! The log is also mirrored in memory, so raft's reads never touch the disk: it is short, because the node compacts it
//! into a snapshot every [`COMPACT_EVERY`] applied entries.
//!
//! What the node has applied is stored too (state, index, conf state), so a restart never applies an entry twice.
//!
//! Opening checks the marker before touching the database: a directory of another cluster, another router, a newer
//! format, or a marker or database that does not parse is refused with a [`DataDirError`], and nothing is written.

use std::path::{Path, PathBuf};

use protobuf::Message as _;
use raft::prelude::{ConfState, Entry, HardState, Snapshot, SnapshotMetadata};
use raft::{GetEntriesContext, RaftState, StorageError};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

/// The data directory format this build writes (and the newest it reads).
pub const FORMAT: u32 = 1;
/// Applied entries between snapshots (the log is truncated at each).
pub const COMPACT_EVERY: u64 = 1000;

const MARKER: &str = "CLUSTER";
const DB_FILE: &str = "raft.redb";
const ENTRIES: TableDefinition<u64, &[u8]> = TableDefinition::new("entries");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
const HARD_STATE: &str = "hard_state";
const CONF_STATE: &str = "conf_state";
const SNAPSHOT: &str = "snapshot";
const APPLIED: &str = "applied";

/// Why a data directory cannot be used (or written).
#[derive(Debug, thiserror::Error)]
pub enum DataDirError {
    #[error("data directory {dir}: {what} (refusing to start; nothing was changed)")]
    Corrupt { dir: PathBuf, what: String },
    #[error("data directory {dir} belongs to cluster `{found}`, not `{expected}` (refusing to start; nothing was changed)")]
    ForeignCluster { dir: PathBuf, found: String, expected: String },
    #[error("data directory {dir} belongs to raft id {found}, not {expected} (refusing to start; nothing was changed)")]
    OtherNode { dir: PathBuf, found: u64, expected: u64 },
    #[error("data directory {dir} has format {found}, newer than this build's {FORMAT} (refusing to start; nothing was changed)")]
    NewerFormat { dir: PathBuf, found: u32 },
    #[error("data directory {dir}: {source}")]
    Io { dir: PathBuf, source: std::io::Error },
    #[error("raft storage write failed: {0}")]
    Write(String),
}

/// The marker file's contents.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Marker {
    format: u32,
    cluster_id: String,
    raft_id: u64,
}

/// One router's raft storage (see the module docs).
pub struct ClusterStorage {
    db: Database,
    hard_state: HardState,
    conf_state: ConfState,
    /// The last compaction point: its metadata gives the log's first index − 1 and its term; its data the replicated
    /// state at that index.
    snapshot: Snapshot,
    /// Entries after the snapshot, in index order.
    entries: Vec<Entry>,
    /// The state the node has applied, with its index, term and conf state: persisted after every applied batch, so a
    /// restart resumes from it (nothing is applied twice), and served as [`raft::Storage::snapshot`] to a follower
    /// that fell behind the log.
    applied: Snapshot,
}

fn write_err(e: impl std::fmt::Display) -> DataDirError {
    DataDirError::Write(e.to_string())
}

fn encode(m: &impl protobuf::Message) -> Result<Vec<u8>, DataDirError> {
    m.write_to_bytes().map_err(write_err)
}

impl ClusterStorage {
    /// Opens (or, for an empty or missing directory, creates) the storage of router `raft_id` in cluster
    /// `cluster_id`. Returns whether the directory was new.
    pub fn open(dir: &Path, cluster_id: &str, raft_id: u64) -> Result<(Self, bool), DataDirError> {
        let io = |source| DataDirError::Io { dir: dir.to_path_buf(), source };
        let corrupt = |what: String| DataDirError::Corrupt { dir: dir.to_path_buf(), what };
        let marker_path = dir.join(MARKER);
        let db_path = dir.join(DB_FILE);
        let fresh = match std::fs::read(&marker_path) {
            Ok(bytes) => {
                let m: Marker = serde_json::from_slice(&bytes).map_err(|e| corrupt(format!("{MARKER} does not parse: {e}")))?;
                if m.format > FORMAT {
                    return Err(DataDirError::NewerFormat { dir: dir.to_path_buf(), found: m.format });
                }
                if m.cluster_id != cluster_id {
                    return Err(DataDirError::ForeignCluster {
                        dir: dir.to_path_buf(),
                        found: m.cluster_id,
                        expected: cluster_id.to_string(),
                    });
                }
                if m.raft_id != raft_id {
                    return Err(DataDirError::OtherNode { dir: dir.to_path_buf(), found: m.raft_id, expected: raft_id });
                }
                if !db_path.is_file() {
                    return Err(corrupt(format!("{DB_FILE} is missing")));
                }
                false
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                // Only an empty (or missing) directory becomes a new one: anything else there is not ours to overwrite.
                if dir.exists() && std::fs::read_dir(dir).map_err(io)?.next().is_some() {
                    return Err(corrupt(format!("not empty and has no {MARKER} marker")));
                }
                true
            }
            Err(e) => return Err(io(e)),
        };
        if fresh {
            std::fs::create_dir_all(dir).map_err(io)?;
            let db = Database::create(&db_path).map_err(|e| corrupt(e.to_string()))?;
            let tx = db.begin_write().map_err(write_err)?;
            tx.open_table(ENTRIES).map_err(write_err)?;
            tx.open_table(META).map_err(write_err)?;
            tx.commit().map_err(write_err)?;
            // The marker goes last, so a crash before it leaves a directory that is refused rather than half-made.
            let m = Marker { format: FORMAT, cluster_id: cluster_id.to_string(), raft_id };
            let tmp = dir.join(format!("{MARKER}.tmp"));
            std::fs::write(&tmp, serde_json::to_vec_pretty(&m).map_err(write_err)?).map_err(io)?;
            std::fs::File::open(&tmp).and_then(|f| f.sync_all()).map_err(io)?;
            std::fs::rename(&tmp, &marker_path).map_err(io)?;
            std::fs::File::open(dir).and_then(|f| f.sync_all()).map_err(io)?;
            let s = Self::empty(db);
            return Ok((s, true));
        }
        // redb checks the file's header before anything else: a corrupted one is refused unwritten. A file left by a
        // crash (SIGKILL) has a valid header and is repaired here, which is what recovery needs.
        let db = Database::open(&db_path).map_err(|e| corrupt(format!("{DB_FILE}: {e}")))?;
        let s = Self::load(db).map_err(corrupt)?;
        Ok((s, fresh))
    }

    fn empty(db: Database) -> Self {
        Self {
            db,
            hard_state: HardState::default(),
            conf_state: ConfState::default(),
            snapshot: Snapshot::default(),
            entries: Vec::new(),
            applied: Snapshot::default(),
        }
    }

    fn load(db: Database) -> Result<Self, String> {
        let mut s = Self::empty(db);
        let tx = s.db.begin_read().map_err(|e| e.to_string())?;
        let meta = tx.open_table(META).map_err(|e| e.to_string())?;
        let parse_err = |what: &str, e: protobuf::ProtobufError| format!("{what} does not parse: {e}");
        if let Some(v) = meta.get(HARD_STATE).map_err(|e| e.to_string())? {
            s.hard_state.merge_from_bytes(v.value()).map_err(|e| parse_err(HARD_STATE, e))?;
        }
        if let Some(v) = meta.get(CONF_STATE).map_err(|e| e.to_string())? {
            s.conf_state.merge_from_bytes(v.value()).map_err(|e| parse_err(CONF_STATE, e))?;
        }
        if let Some(v) = meta.get(SNAPSHOT).map_err(|e| e.to_string())? {
            s.snapshot.merge_from_bytes(v.value()).map_err(|e| parse_err(SNAPSHOT, e))?;
        }
        s.applied = s.snapshot.clone();
        if let Some(v) = meta.get(APPLIED).map_err(|e| e.to_string())? {
            s.applied = Snapshot::default();
            s.applied.merge_from_bytes(v.value()).map_err(|e| parse_err(APPLIED, e))?;
        }
        let table = tx.open_table(ENTRIES).map_err(|e| e.to_string())?;
        let mut expect = s.snapshot.get_metadata().index + 1;
        for row in table.range(expect..).map_err(|e| e.to_string())? {
            let (k, v) = row.map_err(|e| e.to_string())?;
            let mut e = Entry::default();
            e.merge_from_bytes(v.value()).map_err(|e| parse_err("a log entry", e))?;
            if k.value() != expect || e.index != expect {
                return Err(format!("the log has a gap or a misplaced entry at index {}", k.value()));
            }
            expect += 1;
            s.entries.push(e);
        }
        let last = expect - 1;
        let first = s.snapshot.get_metadata().index;
        if s.hard_state.commit > last || (s.hard_state.commit < first && s.hard_state.commit != 0) {
            return Err(format!("the commit index {} lies outside the log [{first}, {last}]", s.hard_state.commit));
        }
        let applied = s.applied.get_metadata().index;
        if applied < first || applied > s.hard_state.commit.max(first) {
            return Err(format!("the applied index {applied} lies outside [{first}, commit {}]", s.hard_state.commit));
        }
        drop(table);
        drop(meta);
        drop(tx);
        Ok(s)
    }

    /// Whether this router belongs to a raft group yet (bootstrapped, or joined and sent a snapshot).
    pub fn initialized(&self) -> bool {
        self.conf_state != ConfState::default()
    }

    /// The last compaction snapshot.
    pub fn snapshot_ref(&self) -> &Snapshot {
        &self.snapshot
    }

    pub fn conf_state(&self) -> &ConfState {
        &self.conf_state
    }

    fn last(&self) -> u64 {
        self.entries.last().map_or(self.snapshot.get_metadata().index, |e| e.index)
    }

    /// Appends `entries` (replacing any conflicting tail) and stores `hs` if given, in one fsynced transaction.
    pub fn persist(&mut self, entries: &[Entry], hs: Option<&HardState>) -> Result<(), DataDirError> {
        if entries.is_empty() && hs.is_none() {
            return Ok(());
        }
        let snap_index = self.snapshot.get_metadata().index;
        let entries: Vec<&Entry> = entries.iter().filter(|e| e.index > snap_index).collect();
        let tx = self.db.begin_write().map_err(write_err)?;
        {
            let mut table = tx.open_table(ENTRIES).map_err(write_err)?;
            if let Some(first) = entries.first() {
                if first.index > self.last() + 1 {
                    return Err(DataDirError::Write(format!("append at {} leaves a gap after {}", first.index, self.last())));
                }
                table.retain_in(first.index.., |_, _| false).map_err(write_err)?;
                for e in &entries {
                    table.insert(e.index, encode(*e)?.as_slice()).map_err(write_err)?;
                }
            }
            if let Some(hs) = hs {
                tx.open_table(META).map_err(write_err)?.insert(HARD_STATE, encode(hs)?.as_slice()).map_err(write_err)?;
            }
        }
        tx.commit().map_err(write_err)?;
        if let Some(first) = entries.first() {
            let keep = (first.index - snap_index - 1) as usize;
            self.entries.truncate(keep);
            self.entries.extend(entries.iter().map(|e| (*e).clone()));
        }
        if let Some(hs) = hs {
            self.hard_state = hs.clone();
        }
        Ok(())
    }

    /// Records a new commit index (from a light ready).
    pub fn set_commit(&mut self, commit: u64) -> Result<(), DataDirError> {
        let mut hs = self.hard_state.clone();
        hs.commit = commit;
        self.persist(&[], Some(&hs))
    }

    /// Records the conf state after a conf change was applied (persisted with the next [`Self::set_applied`]).
    pub fn set_conf_state(&mut self, cs: ConfState) {
        self.conf_state = cs;
    }

    /// Replaces the log with a snapshot received from the leader (or made at bootstrap).
    pub fn apply_snapshot(&mut self, snap: Snapshot) -> Result<(), DataDirError> {
        let meta = snap.get_metadata();
        let mut hs = self.hard_state.clone();
        hs.term = hs.term.max(meta.term);
        hs.commit = hs.commit.max(meta.index);
        let cs = meta.get_conf_state().clone();
        let tx = self.db.begin_write().map_err(write_err)?;
        {
            tx.open_table(ENTRIES).map_err(write_err)?.retain(|_, _| false).map_err(write_err)?;
            let mut m = tx.open_table(META).map_err(write_err)?;
            m.insert(SNAPSHOT, encode(&snap)?.as_slice()).map_err(write_err)?;
            m.insert(HARD_STATE, encode(&hs)?.as_slice()).map_err(write_err)?;
            m.insert(CONF_STATE, encode(&cs)?.as_slice()).map_err(write_err)?;
        }
        tx.commit().map_err(write_err)?;
        self.entries.clear();
        self.hard_state = hs;
        self.conf_state = cs;
        self.applied = snap.clone();
        self.snapshot = snap;
        Ok(())
    }

    /// Records (fsynced) what the node has applied up to `index`: the serialized state and the current conf state.
    pub fn set_applied(&mut self, index: u64, state: Vec<u8>) -> Result<(), DataDirError> {
        let term = raft::Storage::term(self, index).map_err(write_err)?;
        let mut snap = Snapshot::default();
        snap.set_data(state.into());
        let m = snap.mut_metadata();
        m.index = index;
        m.term = term;
        m.set_conf_state(self.conf_state.clone());
        let tx = self.db.begin_write().map_err(write_err)?;
        {
            let mut t = tx.open_table(META).map_err(write_err)?;
            t.insert(APPLIED, encode(&snap)?.as_slice()).map_err(write_err)?;
            t.insert(CONF_STATE, encode(&self.conf_state)?.as_slice()).map_err(write_err)?;
        }
        tx.commit().map_err(write_err)?;
        self.applied = snap;
        Ok(())
    }

    /// The applied index the last [`Self::set_applied`] (or snapshot) recorded.
    pub fn applied_index(&self) -> u64 {
        self.applied.get_metadata().index
    }

    /// The state the last [`Self::set_applied`] (or snapshot) recorded.
    pub fn applied_state(&self) -> &[u8] {
        self.applied.get_data()
    }

    /// Whether enough entries were applied since the last snapshot to compact.
    pub fn should_compact(&self) -> bool {
        self.applied_index() >= self.snapshot.get_metadata().index + COMPACT_EVERY
    }

    /// Makes the applied state the snapshot and drops the log up to it.
    pub fn compact(&mut self) -> Result<(), DataDirError> {
        let index = self.applied_index();
        if index <= self.snapshot.get_metadata().index {
            return Ok(());
        }
        let snap = self.applied.clone();
        let tx = self.db.begin_write().map_err(write_err)?;
        {
            tx.open_table(ENTRIES).map_err(write_err)?.retain_in(..=index, |_, _| false).map_err(write_err)?;
            tx.open_table(META).map_err(write_err)?.insert(SNAPSHOT, encode(&snap)?.as_slice()).map_err(write_err)?;
        }
        tx.commit().map_err(write_err)?;
        let drop_n = (index - self.snapshot.get_metadata().index) as usize;
        self.entries.drain(..drop_n.min(self.entries.len()));
        self.snapshot = snap;
        Ok(())
    }
}

impl raft::Storage for ClusterStorage {
    fn initial_state(&self) -> raft::Result<RaftState> {
        Ok(RaftState { hard_state: self.hard_state.clone(), conf_state: self.conf_state.clone() })
    }

    fn entries(&self, low: u64, high: u64, max_size: impl Into<Option<u64>>, _: GetEntriesContext) -> raft::Result<Vec<Entry>> {
        let first = self.snapshot.get_metadata().index + 1;
        if low < first {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if high > self.last() + 1 {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        let mut out = self.entries[(low - first) as usize..(high - first) as usize].to_vec();
        raft::util::limit_size(&mut out, max_size.into());
        Ok(out)
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        let meta: &SnapshotMetadata = self.snapshot.get_metadata();
        if idx == meta.index {
            return Ok(meta.term);
        }
        if idx < meta.index {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        match self.entries.get((idx - meta.index - 1) as usize) {
            Some(e) => Ok(e.term),
            None => Err(raft::Error::Store(StorageError::Unavailable)),
        }
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(self.snapshot.get_metadata().index + 1)
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(self.last())
    }

    fn snapshot(&self, request_index: u64, _to: u64) -> raft::Result<Snapshot> {
        if self.applied_index() < request_index {
            return Err(raft::Error::Store(StorageError::SnapshotTemporarilyUnavailable));
        }
        Ok(self.applied.clone())
    }
}

#[cfg(test)]
#[path = "storage_tests.rs"]
mod tests;
