//! The lab's Debian image (`image.sh`): built once into `target/lab/image/`, and rebuilt only
//! when its recipe changes (the script, the lab's units and mock IMDS, the kernels). Each run
//! boots a copy-on-write overlay of it, so the image itself stays as built.

use std::{
    hash::{Hash as _, Hasher as _},
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};

use super::interrupt::run;
use super::kernels::{Kernel, Line, MIRROR};

/// The size of the image's file system.
const IMAGE_SIZE: &str = "6G";

/// A built image.
pub struct Image {
    /// The raw ext4 root file system.
    pub disk: PathBuf,
    dir: PathBuf,
}

impl Image {
    /// The kernel and initramfs of `line`, as copied out of the image's `/boot`.
    pub fn boot_files(&self, line: Line) -> (PathBuf, PathBuf) {
        let dir = self.dir.join("boot").join(line.label());
        (dir.join("vmlinuz"), dir.join("initrd.img"))
    }
}

/// The image for `kernels`, built if its recipe changed.
pub fn ensure(dir: &Path, recipe_dir: &Path, kernels: &[Kernel]) -> Result<Image> {
    let image = Image {
        disk: dir.join("root.ext4"),
        dir: dir.to_owned(),
    };
    let key = recipe_key(recipe_dir, kernels)?;
    let key_file = dir.join("recipe");
    let built = std::fs::read_to_string(&key_file).ok();
    if built.as_deref() == Some(key.as_str()) && image.disk.exists() {
        return Ok(image);
    }
    eprintln!("lab: building the image (debootstrap, Docker, kernels: a few minutes)");
    let started = std::time::Instant::now();
    clear(dir)?;
    if let Err(err) = build(&image, recipe_dir, kernels) {
        // Half an image is no image: the next run starts over.
        let _ = clear(dir);
        return Err(err);
    }
    std::fs::write(&key_file, key)?;
    eprintln!("lab: image built in {} s", started.elapsed().as_secs());
    Ok(image)
}

/// Removes `dir`, unless something is mounted below it (the build's chroot mounts live and die
/// in its own mount namespace; one seen here would be the machine's `/dev` or `/proc`).
fn clear(dir: &Path) -> Result<()> {
    if !dir.exists() {
        return Ok(());
    }
    let dir = dir.canonicalize()?;
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")?;
    if let Some(mount) = mountinfo
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .find(|point| Path::new(point).starts_with(&dir))
    {
        bail!(
            "{mount} is mounted inside {}: unmount it first",
            dir.display()
        );
    }
    std::fs::remove_dir_all(&dir).with_context(|| format!("clearing {}", dir.display()))
}

/// Builds the image's root file system and the boot files of `kernels` into `image.dir`.
fn build(image: &Image, recipe_dir: &Path, kernels: &[Kernel]) -> Result<()> {
    let dir = &image.dir;
    let root = dir.join("root");
    let debs = dir.join("kernel-debs");
    std::fs::create_dir_all(&root)?;
    std::fs::create_dir_all(&debs)?;
    for kernel in kernels {
        std::fs::copy(
            &kernel.deb,
            debs.join(kernel.deb.file_name().context("a .deb")?),
        )?;
    }
    // Its own mount and pid namespaces: the chroot's proc, sys and dev mounts vanish with it,
    // and killing it (Ctrl-C) kills everything it started.
    run(Command::new("unshare")
        .args([
            "--mount",
            "--pid",
            "--fork",
            "--kill-child",
            "--mount-proc",
            "bash",
        ])
        .arg(recipe_dir.join("image.sh"))
        .arg(&root)
        .arg(&debs)
        .arg(MIRROR))
    .context("building the image (xtask/src/lab/image.sh)")?;
    for kernel in kernels {
        let boot = dir.join("boot").join(kernel.line.label());
        std::fs::create_dir_all(&boot)?;
        for name in ["vmlinuz", "initrd.img"] {
            let source = root.join("boot").join(format!("{name}-{}", kernel.release));
            std::fs::copy(&source, boot.join(name))
                .with_context(|| format!("copying {} out of the image", source.display()))?;
        }
    }
    run(Command::new("mkfs.ext4")
        .args(["-q", "-F", "-L", "root", "-d"])
        .arg(&root)
        .arg(&image.disk)
        .arg(IMAGE_SIZE))?;
    std::fs::remove_dir_all(&root)?;
    std::fs::remove_dir_all(&debs)?;
    Ok(())
}

/// What the image is made of: its recipe files' contents and the kernels' versions.
fn recipe_key(recipe_dir: &Path, kernels: &[Kernel]) -> Result<String> {
    let mut files: Vec<PathBuf> = ["image.sh", "mock-imds.py"]
        .iter()
        .map(|name| recipe_dir.join(name))
        .collect();
    let mut units: Vec<PathBuf> = std::fs::read_dir(recipe_dir.join("units"))?
        .flatten()
        .map(|entry| entry.path())
        .collect();
    units.sort();
    files.extend(units);
    let mut hasher = std::hash::DefaultHasher::new();
    for file in &files {
        file.file_name().hash(&mut hasher);
        std::fs::read(file)
            .with_context(|| format!("reading {}", file.display()))?
            .hash(&mut hasher);
    }
    let kernels: Vec<String> = kernels
        .iter()
        .map(|kernel| format!("{} {}", kernel.package, kernel.version))
        .collect();
    Ok(format!("{:016x} {}\n", hasher.finish(), kernels.join(", ")))
}
