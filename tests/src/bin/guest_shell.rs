//! `guest-shell <addr:port>`: the test bed's way into a QEMU guest. Each connection sends
//! one line, a shell command; the guest runs it with `sh -c` and sends back its stdout and
//! stderr, then a last line `__exit=<code>`. Commands run concurrently (one thread each).
//! Only ever started inside the test bed's guests, on their private underlay.

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Command, Stdio};

fn serve(stream: TcpStream) -> std::io::Result<()> {
    let mut line = String::new();
    BufReader::new(stream.try_clone()?).read_line(&mut line)?;
    let out = Command::new("sh")
        .args(["-c", line.trim_end()])
        .stdin(Stdio::null())
        .output()?;
    let mut w = stream;
    w.write_all(&out.stdout)?;
    w.write_all(&out.stderr)?;
    writeln!(w, "\n__exit={}", out.status.code().unwrap_or(-1))?;
    Ok(())
}

fn main() -> std::process::ExitCode {
    let addr = match std::env::args().nth(1) {
        Some(v) if v == "--version" => {
            println!("guest-shell {}", tessera_datastore::VERSION);
            return std::process::ExitCode::SUCCESS;
        }
        Some(addr) => addr,
        None => {
            eprintln!("usage: guest-shell <addr:port>");
            return std::process::ExitCode::from(2);
        }
    };
    let listener = match TcpListener::bind(&addr) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("guest-shell: bind {addr}: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    for stream in listener.incoming().flatten() {
        std::thread::spawn(move || {
            if let Err(e) = serve(stream) {
                eprintln!("guest-shell: {e}");
            }
        });
    }
    std::process::ExitCode::SUCCESS
}
