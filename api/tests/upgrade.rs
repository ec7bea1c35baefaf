//! Upgrading `vmmd` without stopping VMs: a vmmd killed and started again from another
//! place (a new install, `--vmm-binary` elsewhere) re-attaches to the VM processes the
//! old one started, whichever binary they run.

use serde_json::json;

mod support;

use support::Service;

#[test]
fn a_vmmd_from_a_new_install_re_attaches_the_running_vms() {
    let mut s = Service::start(&["--fake"]);
    std::fs::write(s.path("vmlinuz"), b"kernel").unwrap();
    let img = s.image("u.raw", 1);
    let config = json!({
        "id": "u",
        "payload": {"kernel": s.path("vmlinuz")},
        "disks": [{"id": "d0", "path": img}],
    });
    s.ok("PUT", "vm.create", Some(&config));
    s.ok("PUT", "vm.boot?id=u", None);
    assert_eq!(s.state("u"), "Running");
    let pid = s.vm_pid("u").expect("the VM's pid file");

    // The old vmmd dies (an upgrade's restart); the new one runs `vmm` from elsewhere.
    if let Some(mut old) = s.child.take() {
        old.kill().unwrap();
        old.wait().unwrap();
    }
    let new_install = s.path("new/bin");
    std::fs::create_dir_all(&new_install).unwrap();
    let vmm = new_install.join("vmm");
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_vmm"), &vmm).unwrap();
    s.spawn(&["--fake", "--vmm-binary", vmm.to_str().unwrap()], |_| {});

    assert_eq!(
        s.state("u"),
        "Running",
        "the VM is re-attached, not Crashed"
    );
    assert_eq!(s.vm_pid("u"), Some(pid), "the same process");
    // It is driven through the new vmmd, and a boot is refused as for any running VM.
    s.ok("PUT", "vm.pause?id=u", None);
    assert_eq!(s.state("u"), "Paused");
    s.ok("PUT", "vm.resume?id=u", None);
    let again = s.req("PUT", "vm.boot?id=u", None);
    assert_eq!(
        again.status,
        409,
        "{}",
        String::from_utf8_lossy(&again.body)
    );
    assert!(support::process_alive(pid));
}

/// A process of an earlier VM of the same id still running in the state directory (one
/// this vmmd could not re-attach, its config unreadable) is left alone: a create of that
/// id is refused, and its socket stays.
#[test]
fn a_create_never_starts_a_second_process_beside_a_live_one() {
    let s = Service::start(&["--fake"]);
    std::fs::write(s.path("vmlinuz"), b"kernel").unwrap();
    let dir = s.state_dir().join("w");
    std::fs::create_dir_all(&dir).unwrap();
    let socket = dir.join("api.sock");
    let earlier = Earlier(
        std::process::Command::new(env!("CARGO_BIN_EXE_vmm"))
            .args(["--fake", "--api-socket"])
            .arg(&socket)
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    std::fs::write(dir.join("pid"), earlier.0.id().to_string()).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !socket.exists() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert!(socket.exists(), "the earlier vmm did not start serving");
    let config = json!({"id": "w", "payload": {"kernel": s.path("vmlinuz")}});
    let r = s.req("PUT", "vm.create", Some(&config));
    assert_eq!(r.status, 409, "{}", String::from_utf8_lossy(&r.body));
    assert!(socket.exists(), "its socket was removed");
    drop(earlier);
}

/// A process this test started, stopped when the test ends (also on a failed assert).
struct Earlier(std::process::Child);

impl Drop for Earlier {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
