//! QEMU guests (TCG) booting Debian's cloud kernel, for what this development kernel cannot
//! do (it has no ipip module). The kernel and its modules are the ones
//! `scripts/install-deps.sh` unpacks into [`VM_ROOT`]; the root file system is a small
//! initramfs built per test: busybox, the modules asked for (with what they depend on), and
//! the binaries the guest runs with their shared libraries. Guests' NICs are taps inside a
//! namespace of the caller's; nothing touches the root namespace.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::Context;

use crate::{Child, Netns};

/// Debian's cloud kernel package, unpacked.
pub const VM_ROOT: &str = "/var/cache/tessera/vm/root";

/// A newer Debian cloud kernel (6.12 from bookworm-backports, or the release's own where it
/// is that new) for what needs one: netkit devices (`CONFIG_NETKIT=y`, Linux 6.7+), which
/// neither this development kernel nor bookworm's 6.1 has. Its modules are xz-compressed.
pub const VM_ROOT_NETKIT: &str = "/var/cache/tessera/vm-netkit/root";

/// The modules every guest needs for its virtio NIC.
pub const VIRTIO_NET: [&str; 2] = ["virtio_pci", "virtio_net"];

/// The port `guest-shell` listens on inside guests.
pub const SHELL_PORT: u16 = 7000;

/// An initramfs under construction in a work directory.
pub struct Initramfs {
    root: PathBuf,
    out: PathBuf,
    kernel: PathBuf,
    /// Module name -> its file, for every module of the kernel.
    module_files: BTreeMap<String, PathBuf>,
    /// Modules built into the kernel (`modules.builtin`): nothing to load.
    builtin: BTreeSet<String>,
    /// Modules in load order (dependencies first).
    load_order: Vec<String>,
}

/// A module's name as the kernel spells it (`-` and `_` are the same).
fn module_name(stem: &str) -> String {
    stem.replace('-', "_")
}

fn index_modules(dir: &Path, into: &mut BTreeMap<String, PathBuf>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            index_modules(&path, into)?;
        } else if let Some(stem) = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .and_then(|n| {
                n.strip_suffix(".ko")
                    .or_else(|| n.strip_suffix(".ko.xz"))
                    .map(str::to_string)
            })
        {
            into.insert(module_name(&stem), path);
        }
    }
    Ok(())
}

/// The modules `ko` depends on: the `depends=` entry of its `.modinfo` section (what
/// depmod reads; Debian's package ships no modules.dep and kmod is not needed here).
fn module_depends(ko: &Path) -> anyhow::Result<Vec<String>> {
    let bytes = std::fs::read(ko).with_context(|| format!("reading {}", ko.display()))?;
    let key = b"\0depends=";
    let Some(at) = bytes.windows(key.len()).position(|w| w == key) else {
        return Ok(Vec::new());
    };
    let rest = &bytes[at + key.len()..];
    let end = rest.iter().position(|b| *b == 0).unwrap_or(rest.len());
    Ok(String::from_utf8_lossy(&rest[..end])
        .split(',')
        .filter(|s| !s.is_empty())
        .map(module_name)
        .collect())
}

impl Initramfs {
    /// Starts an initramfs in `work` for the unpacked cloud kernel, with busybox.
    pub fn new(work: &Path) -> anyhow::Result<Self> {
        Self::for_kernel(work, Path::new(VM_ROOT))
    }

    /// [`Initramfs::new`] for the kernel unpacked under `kernel_root` (`boot/vmlinuz-*`,
    /// `lib/modules/<version>`).
    pub fn for_kernel(work: &Path, kernel_root: &Path) -> anyhow::Result<Self> {
        let boot = kernel_root.join("boot");
        let kernel = std::fs::read_dir(&boot)
            .ok()
            .and_then(|d| {
                d.flatten().map(|e| e.path()).find(|p| {
                    p.file_name()
                        .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))
                })
            })
            .with_context(|| {
                format!(
                    "Debian's cloud kernel is not unpacked in {} (run scripts/install-deps.sh)",
                    kernel_root.display()
                )
            })?;
        let kver = kernel
            .file_name()
            .map(|n| {
                n.to_string_lossy()
                    .trim_start_matches("vmlinuz-")
                    .to_string()
            })
            .unwrap_or_default();
        let modules = kernel_root.join("lib/modules").join(&kver);
        let mut module_files = BTreeMap::new();
        index_modules(&modules, &mut module_files).context("the kernel's modules")?;
        let builtin = std::fs::read_to_string(modules.join("modules.builtin"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| Path::new(l).file_stem())
            .map(|stem| module_name(&stem.to_string_lossy()))
            .collect();
        let root = work.join("initramfs");
        for d in [
            "bin",
            "sbin",
            "usr/bin",
            "proc",
            "sys",
            "dev",
            "run",
            "tmp",
            "etc",
            "lib/modules",
            "var/log",
            "var/lib/tessera",
        ] {
            std::fs::create_dir_all(root.join(d))?;
        }
        std::fs::copy("/bin/busybox", root.join("bin/busybox"))
            .context("/bin/busybox (busybox-static)")?;
        Ok(Initramfs {
            root,
            out: work.join("initrd.gz"),
            kernel,
            module_files,
            builtin,
            load_order: Vec::new(),
        })
    }

    /// Adds modules and everything they depend on; the guest's init loads them in order
    /// from `/etc/modules` (see [`LOAD_MODULES`]).
    pub fn modules(&mut self, names: &[&str]) -> anyhow::Result<&mut Self> {
        fn visit(
            me: &mut Initramfs,
            name: &str,
            seen: &mut BTreeSet<String>,
        ) -> anyhow::Result<()> {
            if !seen.insert(name.to_string())
                || me.builtin.contains(name)
                || me.load_order.iter().any(|m| m == name)
            {
                return Ok(());
            }
            let file = me
                .module_files
                .get(name)
                .cloned()
                .with_context(|| format!("module {name} is not in the guest's kernel"))?;
            // Busybox's insmod takes only plain modules: a compressed one is unpacked here.
            let target = me.root.join("lib/modules").join(format!("{name}.ko"));
            if file.extension().is_some_and(|e| e == "xz") {
                let out = std::fs::File::create(&target)?;
                let status = Command::new("xz")
                    .arg("-dc")
                    .arg(&file)
                    .stdout(out)
                    .status()
                    .context("xz (xz-utils)")?;
                anyhow::ensure!(status.success(), "xz -dc {}: {status}", file.display());
            } else {
                std::fs::copy(&file, &target)?;
            }
            for dep in module_depends(&target)? {
                visit(me, &dep, seen)?;
            }
            me.load_order.push(name.to_string());
            Ok(())
        }
        let mut seen = BTreeSet::new();
        for n in names {
            visit(self, &module_name(n), &mut seen)?;
        }
        Ok(self)
    }

    /// Copies the program `src` to `dest` (a path inside the guest) with the shared
    /// libraries it loads; debug information is stripped (it is most of a debug build).
    pub fn binary(&mut self, src: &Path, dest: &str) -> anyhow::Result<&mut Self> {
        let target = self.root.join(dest.trim_start_matches('/'));
        if let Some(dir) = target.parent() {
            std::fs::create_dir_all(dir)?;
        }
        crate::run(
            "strip",
            &[
                "--strip-debug",
                "-o",
                &target.to_string_lossy(),
                &src.to_string_lossy(),
            ],
        )
        .with_context(|| format!("copying {}", src.display()))?;
        let ldd = Command::new("ldd").arg(src).output().context("ldd")?;
        for lib in String::from_utf8_lossy(&ldd.stdout)
            .split_whitespace()
            .filter(|w| w.starts_with('/'))
        {
            let to = self.root.join(lib.trim_start_matches('/'));
            if let Some(dir) = to.parent() {
                std::fs::create_dir_all(dir)?;
            }
            std::fs::copy(lib, &to).with_context(|| format!("copying {lib}"))?;
        }
        Ok(self)
    }

    /// Writes a file inside the guest (`executable`: mode 0755).
    pub fn file(&mut self, dest: &str, text: &str, executable: bool) -> anyhow::Result<&mut Self> {
        use std::os::unix::fs::PermissionsExt;
        let target = self.root.join(dest.trim_start_matches('/'));
        if let Some(dir) = target.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(&target, text)?;
        if executable {
            std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o755))?;
        }
        Ok(self)
    }

    /// Writes `/init` and packs the archive; returns (kernel, initrd).
    pub fn build(&mut self, init: &str) -> anyhow::Result<(PathBuf, PathBuf)> {
        let order = self.load_order.join("\n");
        self.file("/etc/modules", &order, false)?;
        self.file("/init", init, true)?;
        let out = std::fs::File::create(&self.out)?;
        // find | cpio | gzip, as one pipeline of waited-for children.
        let mut find = Command::new("find")
            .arg(".")
            .current_dir(&self.root)
            .stdout(Stdio::piped())
            .spawn()
            .context("find")?;
        let mut cpio = Command::new("cpio")
            .args(["-o", "-H", "newc", "--quiet"])
            .current_dir(&self.root)
            .stdin(find.stdout.take().context("find's output")?)
            .stdout(Stdio::piped())
            .spawn()
            .context("cpio")?;
        let gzip = Command::new("gzip")
            .arg("-1")
            .stdin(cpio.stdout.take().context("cpio's output")?)
            .stdout(out)
            .status()
            .context("gzip")?;
        let (find, cpio) = (find.wait()?, cpio.wait()?);
        anyhow::ensure!(
            find.success() && cpio.success() && gzip.success(),
            "packing the initramfs: find {find}, cpio {cpio}, gzip {gzip}"
        );
        Ok((self.kernel.clone(), self.out.clone()))
    }
}

/// Shell lines for a guest's init: load the modules of `/etc/modules` in order.
pub const LOAD_MODULES: &str = r#"for m in $(cat /etc/modules); do insmod /lib/modules/$m.ko || echo "TB: insmod $m FAILED"; done"#;

/// How a guest is booted.
pub struct Boot<'a> {
    pub kernel: &'a Path,
    pub initrd: &'a Path,
    /// The tap (inside the namespace the VM is started in) and the NIC's MAC address.
    pub tap: &'a str,
    pub mac: &'a str,
    /// Kernel command line after `console=ttyS0 panic=-1`.
    pub append: &'a str,
    pub memory_mib: u32,
    /// The serial console goes here.
    pub log: &'a Path,
}

/// Boots a guest inside `ns` (QEMU's tap device is there); killed when the child drops.
pub fn boot(ns: &Netns, b: &Boot<'_>) -> anyhow::Result<Child> {
    let mut c = ns.command("qemu-system-x86_64");
    c.args(["-accel", "tcg", "-cpu", "max", "-smp", "1"])
        .args(["-m", &b.memory_mib.to_string()])
        .args([
            "-display",
            "none",
            "-monitor",
            "none",
            "-no-reboot",
            "-nodefaults",
        ])
        .args(["-kernel", &b.kernel.to_string_lossy()])
        .args(["-initrd", &b.initrd.to_string_lossy()])
        .args(["-serial", &format!("file:{}", b.log.display())])
        .args([
            "-netdev",
            &format!("tap,id=n0,ifname={},script=no,downscript=no", b.tap),
        ])
        .args([
            "-device",
            &format!("virtio-net-pci,netdev=n0,mac={}", b.mac),
        ])
        .args(["-append", &format!("console=ttyS0 panic=-1 {}", b.append)])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    Child::spawn(c, "qemu")
}

/// What a command run in a guest by `guest-shell` returned.
#[derive(Debug, Clone)]
pub struct Output {
    pub code: i32,
    /// stdout, then stderr.
    pub text: String,
}

impl Output {
    pub fn success(&self) -> bool {
        self.code == 0
    }
}

/// Runs `cmd` with `sh -c` in the guest whose `guest-shell` listens at `addr`, from a
/// thread inside `ns` (where the guests' underlay is).
pub fn guest_sh(
    ns: &Netns,
    addr: SocketAddr,
    cmd: &str,
    timeout: Duration,
) -> anyhow::Result<Output> {
    let path = ns.path();
    let cmd = cmd.replace('\n', " ");
    std::thread::spawn(move || -> anyhow::Result<Output> {
        crate::netns::enter_on_this_thread(&path)?;
        let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))
            .with_context(|| format!("guest-shell at {addr}"))?;
        s.set_read_timeout(Some(timeout))?;
        writeln!(s, "{cmd}")?;
        let mut text = String::new();
        BufReader::new(s)
            .read_to_string(&mut text)
            .with_context(|| format!("{addr}: {cmd}"))?;
        let (body, code) = text
            .rsplit_once("\n__exit=")
            .with_context(|| format!("{addr}: the shell went away during {cmd:?}: {text}"))?;
        Ok(Output {
            code: code.trim().parse().unwrap_or(-1),
            text: body.to_string(),
        })
    })
    .join()
    .map_err(|_| anyhow::anyhow!("guest-shell client thread panicked"))?
}

/// Mbit/s received, from the summary of `iperf3 -c ... -f m` run in a guest.
pub fn iperf3_mbits(out: &str) -> Option<f64> {
    out.lines().find(|l| l.contains("receiver")).and_then(|l| {
        let w: Vec<&str> = l.split_whitespace().collect();
        let i = w.iter().position(|x| *x == "Mbits/sec")?;
        w.get(i.checked_sub(1)?)?.parse().ok()
    })
}

/// Lines of a guest's serial log that start with `TB:` (what the init script reports).
pub fn console_reports(log: &Path) -> Vec<String> {
    std::fs::File::open(log)
        .map(|f| {
            BufReader::new(f)
                .lines()
                .map_while(Result::ok)
                .filter(|l| l.starts_with("TB:"))
                .collect()
        })
        .unwrap_or_default()
}
