//! One boot of the lab image under qemu (TCG: no KVM here), with no network device: the root
//! disk is a copy-on-write overlay of the image, the second disk holds the scenario and, once
//! the VM has powered off, its results. The qemu process is killed on every path out.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use super::image::Image;
use super::interrupt::{self, run};
use super::kernels::Line;

/// The scenario disk's size.
const LAB_DISK_SIZE: &str = "512M";

/// A VM's files, all under one run directory.
pub struct Vm {
    line: Line,
    dir: PathBuf,
    overlay: PathBuf,
    lab_disk: PathBuf,
    console: PathBuf,
}

impl Vm {
    /// Prepares a VM of `image` booting `line`'s kernel, with the scenario directory
    /// `scenario` (copied to its second disk), in `dir` (cleared first).
    pub fn new(image: &Image, line: Line, dir: &Path, scenario: &Path) -> Result<Self> {
        crate::fresh_dir(dir)?;
        let overlay = dir.join("root.qcow2");
        run(Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
            .arg(&image.disk)
            .arg(&overlay))?;
        let lab_disk = dir.join("lab.ext4");
        run(Command::new("mkfs.ext4")
            .args(["-q", "-F", "-L", "lab", "-d"])
            .arg(scenario)
            .arg(&lab_disk)
            .arg(LAB_DISK_SIZE))?;
        Ok(Self {
            line,
            dir: dir.to_owned(),
            overlay,
            lab_disk,
            console: dir.join("console.log"),
        })
    }

    fn qemu(&self, image: &Image, shell: bool) -> Command {
        let (kernel, initrd) = image.boot_files(self.line);
        let mut append = "root=/dev/vda rw console=ttyS0 panic=-1".to_owned();
        if shell {
            append.push_str(" lab.shell");
        }
        let mut qemu = Command::new("qemu-system-x86_64");
        qemu.args([
            "-accel",
            "tcg,thread=multi",
            "-m",
            "3G",
            "-smp",
            "2",
            "-kernel",
        ])
        .arg(kernel)
        .arg("-initrd")
        .arg(initrd)
        .args(["-append", &append])
        .arg("-drive")
        .arg(format!(
            "file={},if=virtio,format=qcow2",
            self.overlay.display()
        ))
        .arg("-drive")
        .arg(format!(
            "file={},if=virtio,format=raw",
            self.lab_disk.display()
        ))
        .args(["-nic", "none", "-display", "none", "-vga", "none"]);
        if shell {
            qemu.args(["-serial", "mon:stdio"]);
        } else {
            qemu.arg("-serial")
                .arg(format!("file:{}", self.console.display()))
                .args(["-monitor", "none"])
                .stdin(Stdio::null());
        }
        qemu
    }

    /// Boots, runs the scenario (which reboots once and powers off) and returns when the VM is
    /// off, or fails after `limit`.
    pub fn run(&self, image: &Image, limit: Duration) -> Result<()> {
        let mut guard = Running(
            self.qemu(image, false)
                .spawn()
                .context("starting qemu-system-x86_64")?,
        );
        let status =
            interrupt::wait(&mut guard.0, Some(Instant::now() + limit)).with_context(|| {
                format!(
                    "the VM, given {} s (its console: {})",
                    limit.as_secs(),
                    self.console.display()
                )
            })?;
        if !status.success() {
            bail!("qemu exited with {status}; see {}", self.console.display());
        }
        Ok(())
    }

    /// Boots to a root shell on this terminal (`lab.shell` skips the scenario); the scenario
    /// disk is `/dev/vdb` (`mount /dev/vdb /lab && bash /lab/scenario.sh` runs it by hand).
    pub fn shell(&self, image: &Image) -> Result<()> {
        eprintln!("lab: booting {} (Ctrl-A X quits qemu)", self.line.label());
        let mut guard = Running(self.qemu(image, true).spawn().context("starting qemu")?);
        guard.0.wait()?;
        Ok(())
    }

    /// Copies the scenario's `out/` from the powered-off VM's disk into the run directory.
    pub fn results(&self) -> Result<PathBuf> {
        let out = self.dir.join("out");
        // rdump will not write into a directory that exists.
        if out.exists() {
            std::fs::remove_dir_all(&out)?;
        }
        run(Command::new("debugfs")
            .arg("-R")
            .arg(format!("rdump /out {}", self.dir.display()))
            .arg(&self.lab_disk)
            .stderr(Stdio::null()))?;
        if !out.is_dir() {
            bail!(
                "{} holds no results (the scenario never started; see {})",
                self.lab_disk.display(),
                self.console.display()
            );
        }
        Ok(out)
    }

    /// Removes the disks (the console, journal and results stay).
    pub fn remove_disks(&self) {
        let _ = std::fs::remove_file(&self.overlay);
        let _ = std::fs::remove_file(&self.lab_disk);
    }
}

/// A qemu process, killed (by its pid) and reaped when dropped.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}
