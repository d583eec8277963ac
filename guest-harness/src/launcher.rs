//! Starting the programs of an unpacked root (a stack's QEMU, `lspci`) without installing
//! them: through the root's own dynamic loader with the root's libraries.
//!
//! `<root>/…/ld-linux-x86-64.so.2 --library-path <root libs> <root>/usr/bin/PROGRAM ARGS`
//! loads only the root's C library and libraries, so a QEMU built for a newer Debian
//! release runs on an older host. QEMU then finds its firmware through `-L` folders and
//! its loadable modules (Debian builds TCG and display back ends as modules) through
//! `QEMU_MODULE_DIR`: it would otherwise look beside the loader, not beside itself.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::arch::Arch;

/// How to start the programs of one root (or of the host, see [`Launcher::system`]).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[non_exhaustive]
pub struct Launcher {
    /// The root's dynamic loader; `None` starts programs directly.
    pub loader: Option<PathBuf>,
    /// Library folders handed to the loader, in search order.
    pub library_path: Vec<PathBuf>,
    /// Folder of the programs; `None` looks them up on `PATH`.
    pub bin_dir: Option<PathBuf>,
    /// QEMU's firmware folders (`-L`, searched in order).
    pub qemu_data_dirs: Vec<PathBuf>,
    /// QEMU's module folder (`QEMU_MODULE_DIR`).
    pub qemu_module_dir: Option<PathBuf>,
}

impl Launcher {
    /// Programs as installed on this machine, found on `PATH`.
    pub fn system() -> Self {
        Launcher::default()
    }

    /// The program's path (or bare name, looked up on `PATH`).
    pub fn program(&self, name: &str) -> PathBuf {
        match &self.bin_dir {
            Some(dir) => dir.join(name),
            None => PathBuf::from(name),
        }
    }

    fn library_path_arg(&self) -> String {
        let parts: Vec<String> = self.library_path.iter().map(|p| p.display().to_string()).collect();
        parts.join(":")
    }

    /// A command that runs `name` (any program of the root).
    pub fn command(&self, name: &str) -> Command {
        match &self.loader {
            Some(loader) => {
                let mut cmd = Command::new(loader);
                cmd.arg("--library-path").arg(self.library_path_arg()).arg(self.program(name));
                cmd
            }
            None => Command::new(self.program(name)),
        }
    }

    /// A command that runs `arch`'s QEMU system emulator with the root's firmware folders
    /// and modules; the caller appends the emulator's arguments.
    pub fn qemu(&self, arch: Arch) -> Command {
        let mut cmd = self.command(arch.qemu_binary());
        for dir in &self.qemu_data_dirs {
            cmd.arg("-L").arg(dir);
        }
        if let Some(dir) = &self.qemu_module_dir {
            cmd.env("QEMU_MODULE_DIR", dir);
        }
        cmd
    }

    /// A `/bin/sh` script that runs `name` the way [`Launcher::command`] (for a QEMU
    /// emulator, [`Launcher::qemu`]) does, passing its own arguments on: placed first on
    /// `PATH`, it stands in for an installed program.
    pub fn wrapper_script(&self, name: &str, qemu: bool) -> String {
        self.wrapper_script_with(name, qemu, &[])
    }

    /// Like [`Launcher::wrapper_script`], with `extra` arguments before the caller's.
    pub fn wrapper_script_with(&self, name: &str, qemu: bool, extra: &[String]) -> String {
        let q = |p: &Path| shell_quote(&p.display().to_string());
        let mut line = String::new();
        if qemu {
            if let Some(dir) = &self.qemu_module_dir {
                line.push_str(&format!("QEMU_MODULE_DIR={} ", q(dir)));
            }
        }
        line.push_str("exec ");
        if let Some(loader) = &self.loader {
            line.push_str(&format!(
                "{} --library-path {} ",
                q(loader),
                shell_quote(&self.library_path_arg())
            ));
        }
        line.push_str(&q(&self.program(name)));
        if qemu {
            for dir in &self.qemu_data_dirs {
                line.push_str(&format!(" -L {}", q(dir)));
            }
        }
        for arg in extra {
            line.push(' ');
            line.push_str(&shell_quote(arg));
        }
        line.push_str(" \"$@\"");
        format!("#!/bin/sh\n# {name} from an unpacked root, through its own dynamic loader.\n{line}\n")
    }

    /// The shared libraries the root's loader resolves for `elf` (a program or a shared
    /// object of the root), from `ld.so --list`. Every one must be inside `root`: the
    /// loader would otherwise quietly take a missing library from the host.
    pub fn libraries(&self, elf: &Path, root: &Path) -> Result<Vec<PathBuf>, String> {
        let loader = self.loader.as_ref().ok_or("a system launcher has no loader of its own")?;
        let out = crate::command::output(
            Command::new(loader).arg("--library-path").arg(self.library_path_arg()).arg("--list").arg(elf),
        )
        .map_err(|e| e.to_string())?;
        if let Some(missing) = out.lines().find(|l| l.contains("not found")) {
            return Err(format!(
                "{}: a library is missing from {}: {}",
                elf.display(),
                root.display(),
                missing.trim()
            ));
        }
        let libs = parse_ldd(&out);
        if let Some(outside) = libs.iter().find(|l| !l.starts_with(root)) {
            return Err(format!("{}: {} is not inside {}", elf.display(), outside.display(), root.display()));
        }
        Ok(libs)
    }

    /// The same launcher with every path under `from` moved under `to` (the root copied
    /// elsewhere, e.g. into a guest's initramfs). Paths outside `from` stay as they are.
    pub fn relocated(&self, from: &Path, to: &Path) -> Launcher {
        let mv = |p: &PathBuf| match p.strip_prefix(from) {
            Ok(rel) => to.join(rel),
            Err(_) => p.clone(),
        };
        Launcher {
            loader: self.loader.as_ref().map(mv),
            library_path: self.library_path.iter().map(mv).collect(),
            bin_dir: self.bin_dir.as_ref().map(mv),
            qemu_data_dirs: self.qemu_data_dirs.iter().map(mv).collect(),
            qemu_module_dir: self.qemu_module_dir.as_ref().map(mv),
        }
    }
}

/// `s` quoted for `/bin/sh` (single quotes, embedded ones escaped).
pub fn shell_quote(s: &str) -> String {
    if !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || "/._-+:=,".contains(c)) {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

/// Paths in `ldd` output: `libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x…)` and the
/// loader's own line `/lib64/ld-linux-x86-64.so.2 (0x…)`; `linux-vdso.so.1` has none.
pub fn parse_ldd(text: &str) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for line in text.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        let path = match words.iter().position(|w| *w == "=>") {
            Some(i) => words.get(i + 1).copied(),
            None => words.first().copied(),
        };
        if let Some(p) = path.filter(|p| p.starts_with('/')) {
            out.push(PathBuf::from(p));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stack() -> Launcher {
        Launcher {
            loader: Some("/r/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2".into()),
            library_path: vec!["/r/lib/x86_64-linux-gnu".into(), "/r/usr/lib/x86_64-linux-gnu".into()],
            bin_dir: Some("/r/usr/bin".into()),
            qemu_data_dirs: vec!["/r/usr/share/qemu".into(), "/r/usr/share/seabios".into()],
            qemu_module_dir: Some("/r/usr/lib/x86_64-linux-gnu/qemu".into()),
        }
    }

    fn line(cmd: &Command) -> String {
        crate::command::line(cmd)
    }

    #[test]
    fn qemu_runs_through_the_roots_loader() {
        let cmd = stack().qemu(Arch::S390x);
        assert_eq!(
            line(&cmd),
            "/r/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2 --library-path \
             /r/lib/x86_64-linux-gnu:/r/usr/lib/x86_64-linux-gnu /r/usr/bin/qemu-system-s390x \
             -L /r/usr/share/qemu -L /r/usr/share/seabios"
        );
        let env: Vec<_> = cmd.get_envs().collect();
        assert_eq!(env.len(), 1);
        assert_eq!(env[0].0, "QEMU_MODULE_DIR");
        assert_eq!(line(&stack().command("lspci")).split(' ').nth(3), Some("/r/usr/bin/lspci"));
        assert_eq!(line(&Launcher::system().qemu(Arch::X86_64)), "qemu-system-x86_64");
    }

    #[test]
    fn wrappers_pass_arguments_on() {
        let s = stack().wrapper_script("qemu-system-x86_64", true);
        assert!(s.starts_with("#!/bin/sh\n"), "{s}");
        assert!(s.contains("QEMU_MODULE_DIR=/r/usr/lib/x86_64-linux-gnu/qemu exec /r/lib/"), "{s}");
        assert!(s.trim_end().ends_with("-L /r/usr/share/qemu -L /r/usr/share/seabios \"$@\""), "{s}");
        let s = stack().wrapper_script("lspci", false);
        assert!(!s.contains("-L ") && !s.contains("QEMU_MODULE_DIR"), "{s}");
        let s = stack().wrapper_script_with("lspci", false, &["-i".into(), "/r/pci ids".into()]);
        assert!(s.trim_end().ends_with("/r/usr/bin/lspci -i '/r/pci ids' \"$@\""), "{s}");
        assert_eq!(shell_quote("/a b/it's"), "'/a b/it'\\''s'");
        assert_eq!(shell_quote("/plain/path"), "/plain/path");
    }

    /// A real script, run by `/bin/sh`: arguments with spaces arrive whole.
    #[test]
    fn wrapper_scripts_run() {
        let tmp = tempfile::tempdir().unwrap();
        let bin = tmp.path().join("bin dir");
        std::fs::create_dir_all(&bin).unwrap();
        let echo = bin.join("echo-args");
        std::fs::write(&echo, "#!/bin/sh\nfor a in \"$@\"; do echo \"[$a]\"; done\n").unwrap();
        std::os::unix::fs::PermissionsExt::set_mode(
            &mut std::fs::metadata(&echo).unwrap().permissions(),
            0o755,
        );
        std::fs::set_permissions(&echo, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        let launcher = Launcher { bin_dir: Some(bin.clone()), ..Launcher::default() };
        let wrapper = tmp.path().join("wrapper");
        std::fs::write(&wrapper, launcher.wrapper_script("echo-args", false)).unwrap();
        let out = Command::new("sh").arg(&wrapper).args(["a b", "c"]).output().unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), "[a b]\n[c]\n");
    }

    #[test]
    fn relocation_moves_root_paths_only() {
        let moved = stack().relocated(Path::new("/r"), Path::new("/stack"));
        assert_eq!(moved.loader.unwrap(), PathBuf::from("/stack/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2"));
        assert_eq!(moved.qemu_data_dirs[1], PathBuf::from("/stack/usr/share/seabios"));
        let other = Launcher { bin_dir: Some("/elsewhere".into()), ..Launcher::default() };
        assert_eq!(
            other.relocated(Path::new("/r"), Path::new("/s")).bin_dir.unwrap(),
            PathBuf::from("/elsewhere")
        );
    }

    #[test]
    fn ldd_lines() {
        let text = "\tlinux-vdso.so.1 (0x00007ffd)\n\
                    \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f)\n\
                    \tlibmissing.so => not found\n\
                    \t/lib64/ld-linux-x86-64.so.2 (0x00007f)\n";
        assert_eq!(
            parse_ldd(text),
            [PathBuf::from("/lib/x86_64-linux-gnu/libc.so.6"), PathBuf::from("/lib64/ld-linux-x86-64.so.2")]
        );
    }
}
