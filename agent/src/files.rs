//! Files that hold secrets: state directories are kept 0700 and private key files
//! 0600. Found open to other users at start, they are made private with a warning (the
//! agent still starts: it is the file's readers, not the agent, that were at fault).

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use anyhow::Context;
use tracing::warn;

/// Creates `dir` if needed and makes it 0700 (warning when it was open to others).
pub fn private_dir(dir: &Path) -> anyhow::Result<()> {
    let existed = dir.exists();
    fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mode = fs::metadata(dir)?.permissions().mode() & 0o777;
    if mode != 0o700 {
        if existed && mode & 0o077 != 0 {
            warn!(
                dir = %dir.display(),
                mode = format!("{mode:o}"),
                "the state directory was open to other users; setting it to 0700"
            );
        }
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
            .with_context(|| format!("cannot set 0700 on {}", dir.display()))?;
    }
    Ok(())
}

/// Warns about and fixes a private key file that other users may read or write;
/// `field` names the setting that points at it. A file the agent cannot change (not
/// its owner, read-only mount) is reported and left alone.
pub fn keep_private(path: &Path, field: &str) {
    let Ok(meta) = fs::metadata(path) else {
        return; // reading it reports the problem
    };
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 == 0 {
        return;
    }
    let fixed = fs::set_permissions(path, fs::Permissions::from_mode(mode & 0o700));
    match fixed {
        Ok(()) => warn!(
            field,
            file = %path.display(),
            mode = format!("{mode:o}"),
            "private key file was open to other users; set to 0600"
        ),
        Err(e) => warn!(
            field,
            file = %path.display(),
            mode = format!("{mode:o}"),
            error = %e,
            "private key file is open to other users and cannot be changed; restrict it to 0600"
        ),
    }
}

/// Reads a private key file after [`keep_private`].
pub fn read_private(path: &Path, field: &str) -> anyhow::Result<String> {
    keep_private(path, field);
    fs::read_to_string(path).with_context(|| format!("{field}: cannot read {}", path.display()))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn open_key_files_and_directories_are_made_private() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("key.pem");
        fs::write(&key, "-----BEGIN PRIVATE KEY-----\n").unwrap();
        fs::set_permissions(&key, fs::Permissions::from_mode(0o644)).unwrap();
        assert!(
            read_private(&key, "proxy.tls.key_file")
                .unwrap()
                .starts_with("-----")
        );
        assert_eq!(mode(&key), 0o600);
        fs::set_permissions(&key, fs::Permissions::from_mode(0o400)).unwrap();
        keep_private(&key, "f");
        assert_eq!(mode(&key), 0o400, "a private file is left as it is");

        let state = dir.path().join("state");
        private_dir(&state).unwrap();
        assert_eq!(mode(&state), 0o700);
        fs::set_permissions(&state, fs::Permissions::from_mode(0o755)).unwrap();
        private_dir(&state).unwrap();
        assert_eq!(mode(&state), 0o700);

        let missing = read_private(&dir.path().join("nope.pem"), "admin.tls.key_file");
        let message = format!("{:#}", missing.unwrap_err());
        assert!(
            message.starts_with("admin.tls.key_file: cannot read"),
            "{message}"
        );
    }
}
