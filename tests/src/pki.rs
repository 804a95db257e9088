//! A throwaway certificate authority for TLS tests, made with Debian's `openssl`: a CA, a
//! server certificate for etcd (its IP addresses as subject alternative names), a client
//! certificate, and a second CA with its own client certificate (the wrong one).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

pub struct Pki {
    dir: tempfile::TempDir,
}

/// A certificate and its key.
pub struct CertPair {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl Pki {
    /// `server_ips`: the addresses etcd's certificate is valid for.
    pub fn new(server_ips: &[&str]) -> anyhow::Result<Pki> {
        let dir = tempfile::Builder::new().prefix("tessera-pki").tempdir()?;
        let pki = Pki { dir };
        pki.make_ca("ca")?;
        pki.make_ca("rogue-ca")?;
        let san = server_ips
            .iter()
            .map(|ip| format!("IP:{ip}"))
            .collect::<Vec<_>>()
            .join(",");
        pki.leaf(
            "ca",
            "server",
            "etcd",
            &format!("subjectAltName={san}\nextendedKeyUsage=serverAuth,clientAuth\n"),
        )?;
        pki.leaf("ca", "client", "tessera", "extendedKeyUsage=clientAuth\n")?;
        pki.leaf(
            "rogue-ca",
            "rogue-client",
            "tessera",
            "extendedKeyUsage=clientAuth\n",
        )?;
        Ok(pki)
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
    /// The CA that signed the server and client certificates.
    pub fn ca(&self) -> PathBuf {
        self.path("ca.pem")
    }
    pub fn server(&self) -> CertPair {
        self.pair("server")
    }
    pub fn client(&self) -> CertPair {
        self.pair("client")
    }
    /// A client certificate from another CA: etcd must refuse it.
    pub fn rogue_client(&self) -> CertPair {
        self.pair("rogue-client")
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
    fn pair(&self, name: &str) -> CertPair {
        CertPair {
            cert: self.path(&format!("{name}.pem")),
            key: self.path(&format!("{name}-key.pem")),
        }
    }

    fn make_ca(&self, name: &str) -> anyhow::Result<()> {
        openssl(
            self.dir(),
            &[
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-keyout",
                &format!("{name}-key.pem"),
                "-out",
                &format!("{name}.pem"),
                "-days",
                "2",
                "-subj",
                &format!("/CN=tessera-test-{name}"),
            ],
        )
    }

    fn leaf(&self, ca: &str, name: &str, cn: &str, extensions: &str) -> anyhow::Result<()> {
        let ext = format!("{name}.ext");
        std::fs::write(self.path(&ext), extensions)?;
        openssl(
            self.dir(),
            &[
                "req",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-keyout",
                &format!("{name}-key.pem"),
                "-out",
                &format!("{name}.csr"),
                "-subj",
                &format!("/CN={cn}"),
            ],
        )?;
        openssl(
            self.dir(),
            &[
                "x509",
                "-req",
                "-in",
                &format!("{name}.csr"),
                "-CA",
                &format!("{ca}.pem"),
                "-CAkey",
                &format!("{ca}-key.pem"),
                "-CAcreateserial",
                "-out",
                &format!("{name}.pem"),
                "-days",
                "2",
                "-extfile",
                &ext,
            ],
        )
    }
}

fn openssl(dir: &Path, args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "openssl {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}
