//! The simulated xenstore: a tree with per-node permissions, transactions that fail with
//! `EAGAIN` on conflict, and watches (including `@introduceDomain` / `@releaseDomain`),
//! following the C xenstored's behaviour.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use parking_lot::Mutex;

use crate::error::{Error, Result};
use crate::types::DomId;
use crate::xenstore::{access_of, validate_path, Access, Perm, Tx, Watch, WatchEvent, XenStore};

#[derive(Debug, Clone)]
struct Node {
    value: Vec<u8>,
    perms: Vec<Perm>,
    /// Generation of the last change to this node or its list of children.
    gen: u64,
}

#[derive(Debug, Clone, Default)]
struct Tree {
    nodes: BTreeMap<String, Node>,
}

fn parent_of(path: &str) -> Option<&str> {
    if path == "/" {
        return None;
    }
    match path.rfind('/') {
        Some(0) => Some("/"),
        Some(i) => Some(&path[..i]),
        None => None,
    }
}

fn child_prefix(path: &str) -> String {
    if path == "/" {
        "/".to_string()
    } else {
        format!("{path}/")
    }
}

/// Who is asking.
#[derive(Debug, Clone, Copy)]
struct Caller {
    dom: DomId,
    privileged: bool,
}

/// One change, kept so a transaction can be replayed onto the live tree at commit.
#[derive(Debug, Clone)]
enum Op {
    Write(String, Vec<u8>),
    Mkdir(String),
    Rm(String),
    SetPerms(String, Vec<Perm>),
}

impl Op {
    fn path(&self) -> &str {
        match self {
            Op::Write(p, _) | Op::Mkdir(p) | Op::Rm(p) | Op::SetPerms(p, _) => p,
        }
    }
}

impl Tree {
    fn new() -> Self {
        let mut t = Tree::default();
        t.nodes.insert(
            "/".into(),
            Node {
                value: Vec::new(),
                perms: vec![Perm::new(0, Access::None)],
                gen: 0,
            },
        );
        t
    }

    fn node(&self, path: &str, what: &str) -> Result<&Node> {
        self.nodes
            .get(path)
            .ok_or_else(|| Error::os(format!("xenstore {what} {path}"), libc::ENOENT))
    }

    fn check(&self, node: &Node, c: Caller, write: bool, what: &str, path: &str) -> Result<()> {
        let a = access_of(&node.perms, c.dom, c.privileged);
        let ok = if write { a.can_write() } else { a.can_read() };
        if ok {
            Ok(())
        } else {
            Err(Error::os(
                format!("xenstore {what} {path} as domain {}", c.dom),
                libc::EACCES,
            ))
        }
    }

    fn children(&self, path: &str) -> Vec<String> {
        let prefix = child_prefix(path);
        self.nodes
            .range(prefix.clone()..)
            .take_while(|(k, _)| k.starts_with(&prefix))
            .filter(|(k, _)| k.len() > prefix.len() && !k[prefix.len()..].contains('/'))
            .map(|(k, _)| k[prefix.len()..].to_string())
            .collect()
    }

    /// Create `path` and missing ancestors; returns the created paths (outermost first).
    fn create(&mut self, path: &str, c: Caller, gen: u64, what: &str) -> Result<Vec<String>> {
        let mut missing = Vec::new();
        let mut cur = path;
        while !self.nodes.contains_key(cur) {
            missing.push(cur.to_string());
            cur = parent_of(cur).unwrap_or("/");
        }
        let ancestor = self.nodes.get(cur).expect("ancestor exists");
        self.check(ancestor, c, true, what, path)?;
        let mut perms = ancestor.perms.clone();
        if !c.privileged {
            perms[0].domid = c.dom;
        }
        missing.reverse();
        for p in &missing {
            if let Some(parent) = parent_of(p).and_then(|pp| self.nodes.get_mut(pp)) {
                parent.gen = gen;
            }
            self.nodes.insert(
                p.clone(),
                Node {
                    value: Vec::new(),
                    perms: perms.clone(),
                    gen,
                },
            );
        }
        Ok(missing)
    }

    fn apply(&mut self, op: &Op, c: Caller, gen: u64) -> Result<Vec<String>> {
        match op {
            Op::Write(path, value) => {
                let mut changed = self.create(path, c, gen, "write")?;
                let node = self.nodes.get(path.as_str()).expect("created");
                self.check(node, c, true, "write", path)?;
                let node = self.nodes.get_mut(path.as_str()).expect("created");
                node.value = value.clone();
                node.gen = gen;
                if changed.is_empty() {
                    changed.push(path.clone());
                }
                Ok(changed)
            }
            Op::Mkdir(path) => self.create(path, c, gen, "mkdir"),
            Op::Rm(path) => {
                if path == "/" {
                    return Err(Error::os("xenstore rm /", libc::EINVAL));
                }
                let node = self.node(path, "rm")?;
                self.check(node, c, true, "rm", path)?;
                let prefix = child_prefix(path);
                let doomed: Vec<String> = self
                    .nodes
                    .range(path.clone()..)
                    .take_while(|(k, _)| *k == path || k.starts_with(&prefix))
                    .map(|(k, _)| k.clone())
                    .collect();
                for k in &doomed {
                    self.nodes.remove(k);
                }
                if let Some(parent) = parent_of(path).and_then(|pp| self.nodes.get_mut(pp)) {
                    parent.gen = gen;
                }
                Ok(doomed)
            }
            Op::SetPerms(path, perms) => {
                if perms.is_empty() {
                    return Err(Error::os(
                        format!("xenstore set-perms {path}: empty list"),
                        libc::EINVAL,
                    ));
                }
                let node = self.node(path, "set-perms")?;
                let owner = node.perms.first().map(|p| p.domid);
                if !c.privileged && owner != Some(c.dom) {
                    return Err(Error::os(
                        format!("xenstore set-perms {path} as domain {}", c.dom),
                        libc::EACCES,
                    ));
                }
                let node = self.nodes.get_mut(path.as_str()).expect("exists");
                node.perms = perms.clone();
                node.gen = gen;
                Ok(vec![path.clone()])
            }
        }
    }
}

#[derive(Debug)]
struct Txn {
    snapshot: Tree,
    /// Generation (or absence) of every node the transaction looked at, when it first did.
    seen: HashMap<String, Option<u64>>,
    ops: Vec<Op>,
    owner: DomId,
}

impl Txn {
    fn note(&mut self, path: &str) {
        let gen = self.snapshot.nodes.get(path).map(|n| n.gen);
        self.seen.entry(path.to_string()).or_insert(gen);
        if let Some(parent) = parent_of(path) {
            let pg = self.snapshot.nodes.get(parent).map(|n| n.gen);
            self.seen.entry(parent.to_string()).or_insert(pg);
        }
    }
}

struct WatchReg {
    id: u64,
    path: String,
    token: String,
    tx: crossbeam_channel::Sender<WatchEvent>,
}

#[derive(Default)]
struct State {
    tree: Tree,
    gen: u64,
    txns: HashMap<u32, Txn>,
    next_tx: u32,
    watches: Vec<WatchReg>,
    next_watch: u64,
}

impl State {
    fn fire(&mut self, changed: &[String]) {
        self.watches.retain(|w| {
            let mut alive = true;
            for p in changed {
                let hit = if w.path.starts_with('@') {
                    *p == w.path
                } else {
                    p == &w.path
                        || p.starts_with(&child_prefix(&w.path))
                        || w.path.starts_with(&child_prefix(p))
                };
                if hit {
                    alive &=
                        w.tx.send(WatchEvent {
                            path: p.clone(),
                            token: w.token.clone(),
                        })
                        .is_ok();
                }
            }
            alive
        });
    }
}

/// The simulated xenstore daemon, shared by every connection.
#[derive(Clone)]
pub struct SimXenstore {
    state: Arc<Mutex<State>>,
}

impl std::fmt::Debug for SimXenstore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimXenstore").finish_non_exhaustive()
    }
}

impl Default for SimXenstore {
    fn default() -> Self {
        Self::new()
    }
}

impl SimXenstore {
    pub fn new() -> Self {
        SimXenstore {
            state: Arc::new(Mutex::new(State {
                tree: Tree::new(),
                next_tx: 1,
                ..State::default()
            })),
        }
    }

    /// A connection acting as `dom`; dom0 is privileged.
    pub fn connect(&self, dom: DomId) -> SimStoreConn {
        SimStoreConn {
            store: self.clone(),
            caller: Caller {
                dom,
                privileged: dom == 0,
            },
        }
    }

    /// Fire a special watch (`@introduceDomain`, `@releaseDomain`).
    pub fn fire_special(&self, name: &str) {
        self.state.lock().fire(&[name.to_string()]);
    }
}

/// A xenstore connection of one domain.
#[derive(Debug, Clone)]
pub struct SimStoreConn {
    store: SimXenstore,
    caller: Caller,
}

impl SimStoreConn {
    fn resolve(&self, path: &str) -> Result<String> {
        validate_path(path)?;
        Ok(if path.starts_with('/') || path.starts_with('@') {
            path.to_string()
        } else {
            format!("/local/domain/{}/{path}", self.caller.dom)
        })
    }

    fn mutate(&self, tx: Tx, op: Op) -> Result<()> {
        let mut st = self.store.state.lock();
        if tx == Tx::NONE {
            st.gen += 1;
            let gen = st.gen;
            let changed = st.tree.apply(&op, self.caller, gen)?;
            st.fire(&changed);
            return Ok(());
        }
        let txn = st
            .txns
            .get_mut(&tx.0)
            .filter(|t| t.owner == self.caller.dom)
            .ok_or_else(|| Error::os(format!("xenstore transaction {}", tx.0), libc::ENOENT))?;
        txn.note(op.path());
        txn.snapshot.apply(&op, self.caller, u64::MAX)?;
        txn.ops.push(op);
        Ok(())
    }

    fn look<T>(&self, tx: Tx, path: &str, f: impl FnOnce(&Tree, &str) -> Result<T>) -> Result<T> {
        let mut st = self.store.state.lock();
        if tx == Tx::NONE {
            return f(&st.tree, path);
        }
        let txn = st
            .txns
            .get_mut(&tx.0)
            .filter(|t| t.owner == self.caller.dom)
            .ok_or_else(|| Error::os(format!("xenstore transaction {}", tx.0), libc::ENOENT))?;
        txn.note(path);
        f(&txn.snapshot, path)
    }
}

impl XenStore for SimStoreConn {
    fn read(&self, tx: Tx, path: &str) -> Result<Vec<u8>> {
        let path = self.resolve(path)?;
        let c = self.caller;
        self.look(tx, &path, |t, p| {
            let n = t.node(p, "read")?;
            t.check(n, c, false, "read", p)?;
            Ok(n.value.clone())
        })
    }

    fn write(&self, tx: Tx, path: &str, value: &[u8]) -> Result<()> {
        if value.len() > crate::xenstore::wire::PAYLOAD_MAX {
            return Err(Error::os(format!("xenstore write {path}"), libc::E2BIG));
        }
        let path = self.resolve(path)?;
        self.mutate(tx, Op::Write(path, value.to_vec()))
    }

    fn mkdir(&self, tx: Tx, path: &str) -> Result<()> {
        let path = self.resolve(path)?;
        self.mutate(tx, Op::Mkdir(path))
    }

    fn rm(&self, tx: Tx, path: &str) -> Result<()> {
        let path = self.resolve(path)?;
        self.mutate(tx, Op::Rm(path))
    }

    fn directory(&self, tx: Tx, path: &str) -> Result<Vec<String>> {
        let path = self.resolve(path)?;
        let c = self.caller;
        self.look(tx, &path, |t, p| {
            let n = t.node(p, "directory")?;
            t.check(n, c, false, "directory", p)?;
            Ok(t.children(p))
        })
    }

    fn get_perms(&self, tx: Tx, path: &str) -> Result<Vec<Perm>> {
        let path = self.resolve(path)?;
        let c = self.caller;
        self.look(tx, &path, |t, p| {
            let n = t.node(p, "get-perms")?;
            t.check(n, c, false, "get-perms", p)?;
            Ok(n.perms.clone())
        })
    }

    fn set_perms(&self, tx: Tx, path: &str, perms: &[Perm]) -> Result<()> {
        let path = self.resolve(path)?;
        self.mutate(tx, Op::SetPerms(path, perms.to_vec()))
    }

    fn transaction_start(&self) -> Result<Tx> {
        let mut st = self.store.state.lock();
        let id = st.next_tx;
        st.next_tx = st.next_tx.wrapping_add(1).max(1);
        let snapshot = st.tree.clone();
        st.txns.insert(
            id,
            Txn {
                snapshot,
                seen: HashMap::new(),
                ops: Vec::new(),
                owner: self.caller.dom,
            },
        );
        Ok(Tx(id))
    }

    fn transaction_end(&self, tx: Tx, commit: bool) -> Result<()> {
        let mut st = self.store.state.lock();
        let txn = st
            .txns
            .remove(&tx.0)
            .filter(|t| t.owner == self.caller.dom)
            .ok_or_else(|| Error::os(format!("xenstore transaction {}", tx.0), libc::ENOENT))?;
        if !commit {
            return Ok(());
        }
        let conflict = txn
            .seen
            .iter()
            .any(|(p, gen)| st.tree.nodes.get(p).map(|n| n.gen) != *gen);
        if conflict {
            return Err(Error::os(
                format!("xenstore commit of transaction {}", tx.0),
                libc::EAGAIN,
            ));
        }
        st.gen += 1;
        let gen = st.gen;
        let mut changed = Vec::new();
        for op in &txn.ops {
            changed.extend(st.tree.apply(op, self.caller, gen)?);
        }
        st.fire(&changed);
        Ok(())
    }

    fn watch(&self, path: &str, token: &str) -> Result<Watch> {
        let path = self.resolve(path)?;
        let (tx, rx) = crossbeam_channel::unbounded();
        let mut st = self.store.state.lock();
        let id = st.next_watch;
        st.next_watch += 1;
        // Like xenstored, a new watch fires once straight away.
        let _ = tx.send(WatchEvent {
            path: path.clone(),
            token: token.to_string(),
        });
        st.watches.push(WatchReg {
            id,
            path,
            token: token.to_string(),
            tx,
        });
        let state = Arc::downgrade(&self.store.state);
        Ok(Watch::new(
            rx,
            Box::new(move || {
                if let Some(state) = state.upgrade() {
                    state.lock().watches.retain(|w| w.id != id);
                }
            }),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn write_creates_parents_and_rm_removes_subtree() {
        let xs = SimXenstore::new().connect(0);
        xs.write(Tx::NONE, "/a/b/c", b"1").unwrap();
        assert_eq!(xs.directory(Tx::NONE, "/a").unwrap(), vec!["b"]);
        assert_eq!(xs.read(Tx::NONE, "/a/b").unwrap(), b"");
        xs.rm(Tx::NONE, "/a").unwrap();
        assert!(xs
            .read(Tx::NONE, "/a/b/c")
            .unwrap_err()
            .is_errno(libc::ENOENT));
        assert!(xs.rm(Tx::NONE, "/a").unwrap_err().is_errno(libc::ENOENT));
    }

    #[test]
    fn guests_see_only_what_perms_allow() {
        let store = SimXenstore::new();
        let dom0 = store.connect(0);
        let guest = store.connect(5);
        dom0.write(Tx::NONE, "/secret", b"x").unwrap();
        assert!(guest
            .read(Tx::NONE, "/secret")
            .unwrap_err()
            .is_errno(libc::EACCES));
        dom0.set_perms(
            Tx::NONE,
            "/secret",
            &[Perm::new(0, Access::None), Perm::new(5, Access::Read)],
        )
        .unwrap();
        assert_eq!(guest.read(Tx::NONE, "/secret").unwrap(), b"x");
        assert!(guest
            .write(Tx::NONE, "/secret", b"y")
            .unwrap_err()
            .is_errno(libc::EACCES));
        assert!(guest
            .set_perms(Tx::NONE, "/secret", &[Perm::new(5, Access::Both)])
            .unwrap_err()
            .is_errno(libc::EACCES));
    }

    #[test]
    fn conflicting_transaction_gets_eagain_and_changes_nothing() {
        let xs = SimXenstore::new().connect(0);
        xs.write(Tx::NONE, "/k", b"0").unwrap();
        let t = xs.transaction_start().unwrap();
        assert_eq!(xs.read(t, "/k").unwrap(), b"0");
        xs.write(t, "/other", b"t").unwrap();
        xs.write(Tx::NONE, "/k", b"outside").unwrap();
        assert!(xs
            .transaction_end(t, true)
            .unwrap_err()
            .is_errno(libc::EAGAIN));
        assert!(xs
            .read(Tx::NONE, "/other")
            .unwrap_err()
            .is_errno(libc::ENOENT));
    }

    #[test]
    fn watch_fires_initially_and_on_descendants_until_dropped() {
        let xs = SimXenstore::new().connect(0);
        let w = xs.watch("/backend", "tok").unwrap();
        let first = w.next_timeout(Duration::from_secs(1)).unwrap();
        assert_eq!(
            (first.path.as_str(), first.token.as_str()),
            ("/backend", "tok")
        );
        xs.write(Tx::NONE, "/backend/vbd/1/state", b"2").unwrap();
        let paths: Vec<String> = std::iter::from_fn(|| w.try_next())
            .map(|e| e.path)
            .collect();
        assert!(
            paths.contains(&"/backend/vbd/1/state".to_string()),
            "{paths:?}"
        );
        xs.write(Tx::NONE, "/elsewhere", b"1").unwrap();
        assert!(w.try_next().is_none());
        drop(w);
        xs.write(Tx::NONE, "/backend/x", b"1").unwrap();
    }
}
