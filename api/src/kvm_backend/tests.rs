use std::sync::mpsc;

use super::*;

fn config(id: &str) -> VmConfig {
    serde_json::from_value(serde_json::json!({"id": id, "payload": {"kernel": "/nonexistent"}}))
        .unwrap()
}

/// Puts a VM `id` into `b` as `create` publishes it (not built yet, or built once).
fn insert(b: &KvmBackend, id: &str, built: bool) -> Arc<Slot> {
    let mut entry = Entry::new(config(id), None);
    entry.built = built;
    let slot = Arc::new(Slot {
        entry: Mutex::new(entry),
        view: Mutex::new(View {
            state: None,
            config: config(id),
            counters: VmCounters::default(),
            removed: false,
        }),
    });
    slot.publish(&lock(&slot.entry));
    lock(&b.vms).insert(id.to_string(), slot.clone());
    slot
}

/// Holds `slot`'s lock on another thread (a build stuck in open() on a hung mount) until
/// the returned sender is dropped.
fn hold(slot: &Arc<Slot>) -> (mpsc::Sender<()>, std::thread::JoinHandle<()>) {
    let (ready_tx, ready_rx) = mpsc::channel();
    let (release_tx, release_rx) = mpsc::channel::<()>();
    let slot = slot.clone();
    let t = std::thread::spawn(move || {
        let _g = lock(&slot.entry);
        ready_tx.send(()).unwrap();
        let _ = release_rx.recv_timeout(Duration::from_secs(30));
    });
    ready_rx.recv().unwrap();
    (release_tx, t)
}

#[test]
fn listing_metrics_and_shutdown_do_not_wait_for_a_busy_vm() {
    let b = KvmBackend::new();
    let building = insert(&b, "building", false);
    let idle = insert(&b, "idle", true);
    let draining = insert(&b, "draining", true);
    let (release1, t1) = hold(&building);
    let (release2, t2) = hold(&draining);

    let t = Instant::now();
    let ids: Vec<String> = b.list().into_iter().map(|v| v.id).collect();
    // The VM being built is not listed until its create has answered; the busy one is
    // listed as last published.
    assert_eq!(ids, ["draining", "idle"]);
    assert_eq!(b.all_counters().len(), 2);
    assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());

    let t = Instant::now();
    b.shutdown_vmm().unwrap();
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    // Once shutting down, nothing new is built.
    let err = b.create(config("late")).unwrap_err();
    assert_eq!(err.kind.status(), 503, "{err:?}");
    drop((release1, release2));
    t1.join().unwrap();
    t2.join().unwrap();
    drop(idle);
}

#[test]
fn a_vm_being_created_blocks_only_calls_naming_it() {
    let b = Arc::new(KvmBackend::new());
    let slot = insert(&b, "slow", false);
    insert(&b, "other", true);
    let (release, t) = hold(&slot);
    // A call on another VM answers at once.
    let t0 = Instant::now();
    assert_eq!(b.info("other").unwrap().state, VmState::Shutdown);
    assert!(t0.elapsed() < Duration::from_millis(500));
    // A call naming the slow VM waits for it.
    let b2 = b.clone();
    let waiting = std::thread::spawn(move || b2.info("slow").map(|i| i.state));
    std::thread::sleep(Duration::from_millis(100));
    assert!(!waiting.is_finished());
    drop(release);
    t.join().unwrap();
    assert_eq!(waiting.join().unwrap().unwrap(), VmState::Shutdown);
}
